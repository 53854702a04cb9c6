/* The configuration at run time: SIGHUP (systemctl reload) reads it again
 * and applies the options the table (daemon.h) marks LIVE. Everything is
 * read, resolved and checked before anything is applied, so that a reload
 * either applies all of its live changes or none of them. */
#include "daemon/daemon.h"

#include <string.h>

/* The configuration a reload would apply and the administrator lists it
 * names, made and checked; on failure nothing is left to free. */
static int prepare(const wd_server *s, wd_config *next, wd_auth *auth, wd_error *err)
{
    int rc;

    memset(auth, 0, sizeof *auth);
    if ((rc = wd_config_reload(s->conf, next, err)))
        return rc;
    /* What the next start would refuse is refused now, though it waits for
     * that start: socket_mode and socket_group, where the daemon binds. */
    if ((rc = wd_auth_init(auth, next, err)) || (s->own_socket && (rc = wd_auth_check_socket(next, err))))
        goto fail;
    return 0;
fail:
    wd_auth_free(auth);
    wd_config_free(next);
    return rc;
}

/* Every connection's role from the lists in force now: an administrator
 * removed from them is a reader for its next request, on the connection it
 * has too. What it asked for before (a load that runs) goes on. */
static size_t reassess_roles(wd_server *s)
{
    size_t changed = 0;

    for (wd_conn *c = s->conns; c; c = c->next) {
        wd_role role = wd_auth_role(&s->auth, c);
        if (c->dead || role == c->role)
            continue;
        wd_log(WD_LOG_notice, "reload: client %llu (pid %d, uid %d): %s -> %s", (unsigned long long)c->serial,
               (int)c->pid, (int)c->uid, wd_role_name(c->role), wd_role_name(role));
        c->role = role;
        changed++;
    }
    return changed;
}

/* "a, b" of the changes that are (or are not) live, cut to fit. */
static void names_of(const wd_option_change *changes, size_t n, bool live, char *buf, size_t len)
{
    size_t used = 0;

    buf[0] = '\0';
    for (size_t i = 0; i < n && used < len; i++)
        if (changes[i].live == live)
            used += (size_t)snprintf(buf + used, len - used, "%s%s", used ? ", " : "", wd_option_name(changes[i].id));
}

static void log_change(const wd_config *next, const wd_option_change *ch)
{
    char where[600];
    const char *name = wd_option_name(ch->id);

    wd_config_origin(next, ch->id, where, sizeof where);
    if (ch->live)
        wd_log(WD_LOG_notice, "reload: %s %s -> %s (%s)", name, ch->from, ch->to, where);
    else if (next->origin[ch->id] == WD_ORIGIN_FILE)
        wd_log(WD_LOG_warning, "reload: %s changed in %s (%s -> %s); it takes effect at the next restart", name,
               where, ch->from, ch->to);
    else /* the file no longer sets it: only the file can change between loads */
        wd_log(WD_LOG_warning, "reload: %s changed in %s (%s -> %s, its default); it takes effect at the next "
               "restart", name, next->config, ch->from, ch->to);
}

void wd_server_reload(wd_server *s)
{
    wd_option_change changes[WD_OPTION_COUNT];
    char live[512], restart[512], file[600];
    wd_config next;
    wd_auth auth;
    wd_error err = {0};
    size_t n, n_live = 0, n_roles;

    if (s->stopping) {
        wd_log(WD_LOG_notice, "SIGHUP: not reloading the configuration: stopping");
        return;
    }
    wd_systemd_reloading(s);
    snprintf(file, sizeof file, "%s", s->conf->config[0] ? s->conf->config : "no config file");
    wd_log(WD_LOG_info, "SIGHUP: reading the configuration again (%s)", file);
    if (prepare(s, &next, &auth, &err)) {
        wd_log(WD_LOG_error, "reload failed; every option keeps its running value: %s", wd_error_text(&err));
        goto out;
    }
    n = wd_config_diff(s->conf, &next, changes);
    /* The lines about the change show at the more verbose of the two levels. */
    wd_log_set_level(next.log_level > s->conf->log_level ? next.log_level : s->conf->log_level);
    for (size_t i = 0; i < n; i++) {
        log_change(&next, &changes[i]);
        n_live += changes[i].live;
    }
    wd_config_take_live(s->conf, &next);
    wd_auth_free(&s->auth);
    s->auth = auth;
    wd_log_set_peer_rate((unsigned)s->conf->log_rate);
    n_roles = reassess_roles(s);
    names_of(changes, n, true, live, sizeof live);
    names_of(changes, n, false, restart, sizeof restart);
    if (!n && !n_roles)
        wd_log(WD_LOG_notice, "reload (%s): nothing changed", file);
    else
        wd_log(WD_LOG_notice, "reload (%s): %zu option%s applied%s%s%s, %zu wait%s for a restart%s%s%s, %zu "
               "connection%s changed role", file, n_live, n_live == 1 ? "" : "s", n_live ? " (" : "", live,
               n_live ? ")" : "", n - n_live, n - n_live == 1 ? "s" : "", n - n_live ? " (" : "", restart,
               n - n_live ? ")" : "", n_roles, n_roles == 1 ? "" : "s");
    wd_log_set_level(s->conf->log_level);
    wd_config_free(&next);
out:
    wd_systemd_reloaded(s);
}
