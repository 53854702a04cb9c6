/* Authorisation: every connection's peer credentials give it a role, and
 * each operation in the table (ops.c) names the role it needs. */
#include "daemon/daemon.h"

#include <grp.h>
#include <pwd.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *const role_names[] = {
#define X(id, name) name,
    WD_ROLES(X)
#undef X
};

const char *wd_role_name(wd_role role)
{
    return role_names[role];
}

/* A uid or gid: digits, or a name the system knows. */
static int resolve_id(const char *word, bool group, unsigned *out)
{
    char *end;
    unsigned long v = strtoul(word, &end, 10);

    if (*word && !*end && v < (unsigned long)(uid_t)-1) {
        *out = (unsigned)v;
        return 0;
    }
    if (group) {
        struct group *g = getgrnam(word);
        if (!g)
            return -ENOENT;
        *out = g->gr_gid;
    } else {
        struct passwd *p = getpwnam(word);
        if (!p)
            return -ENOENT;
        *out = p->pw_uid;
    }
    return 0;
}

/* "a,b, 1001": each word resolved, into a malloc'd array. */
static int resolve_list(const char *text, bool group, unsigned **out, size_t *n, wd_error *err)
{
    char *copy = strdup(text), *save = NULL, *word;
    unsigned *ids = NULL;
    size_t count = 0;
    int rc = 0;

    *out = NULL;
    *n = 0;
    if (!copy)
        return wd_error_set(err, -ENOMEM, "out of memory");
    if (!(ids = calloc(strlen(text) / 2 + 1, sizeof *ids))) {
        free(copy);
        return wd_error_set(err, -ENOMEM, "out of memory");
    }
    for (word = strtok_r(copy, ", \t", &save); word; word = strtok_r(NULL, ", \t", &save))
        if (resolve_id(word, group, &ids[count++])) {
            rc = wd_error_set(err, -EINVAL, "%s: no %s named \"%s\"", group ? "admin_groups" : "admin_uids",
                              group ? "group" : "user", word);
            break;
        }
    free(copy);
    if (rc) {
        free(ids);
        return rc;
    }
    *out = ids;
    *n = count;
    return 0;
}

int wd_auth_init(wd_auth *a, const wd_config *c, wd_error *err)
{
    unsigned *uids, *gids;
    size_t nu, ng;
    int rc;

    memset(a, 0, sizeof *a);
    if ((rc = resolve_list(c->admin_uids, false, &uids, &nu, err))) {
        wd_config_error_origin(c, WD_OPT_admin_uids, err);
        return rc;
    }
    if ((rc = resolve_list(c->admin_groups, true, &gids, &ng, err))) {
        wd_config_error_origin(c, WD_OPT_admin_groups, err);
        free(uids);
        return rc;
    }
    a->uids = (uid_t *)uids;
    a->n_uids = nu;
    a->gids = (gid_t *)gids;
    a->n_gids = ng;
    return 0;
}

void wd_auth_free(wd_auth *a)
{
    free(a->uids);
    free(a->gids);
    memset(a, 0, sizeof *a);
}

static bool in_groups(const wd_auth *a, gid_t g)
{
    for (size_t i = 0; i < a->n_gids; i++)
        if (a->gids[i] == g)
            return true;
    return false;
}

wd_role wd_auth_role(const wd_auth *a, const wd_conn *c)
{
    if (c->uid == (uid_t)-1)
        return WD_ROLE_READER; /* credentials unknown */
    if (c->uid == 0 || c->uid == geteuid())
        return WD_ROLE_ADMIN;
    for (size_t i = 0; i < a->n_uids; i++)
        if (a->uids[i] == c->uid)
            return WD_ROLE_ADMIN;
    if (in_groups(a, c->gid))
        return WD_ROLE_ADMIN;
    for (size_t i = 0; i < c->n_groups; i++)
        if (in_groups(a, c->groups[i]))
            return WD_ROLE_ADMIN;
    return WD_ROLE_READER;
}

void wd_auth_peer(const wd_auth *a, wd_conn *c)
{
    struct ucred cred;
    socklen_t len = sizeof cred;

    c->uid = (uid_t)-1;
    c->gid = (gid_t)-1;
    if (getsockopt(c->fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) {
        c->pid = cred.pid;
        c->uid = cred.uid;
        c->gid = cred.gid;
    }
    /* The supplementary groups the peer had when it connected, whether or
     * not admin_groups names any now: a reload may name some later. */
    len = 0;
    if (getsockopt(c->fd, SOL_SOCKET, SO_PEERGROUPS, NULL, &len) < 0 && errno == ERANGE && len) {
        if ((c->groups = malloc(len)) &&
            getsockopt(c->fd, SOL_SOCKET, SO_PEERGROUPS, c->groups, &len) == 0) {
            c->n_groups = len / sizeof *c->groups;
        } else {
            free(c->groups);
            c->groups = NULL;
        }
    }
    c->role = wd_auth_role(a, c);
}

int wd_auth_require(wd_request *r, wd_role role, const char *what)
{
    wd_conn *c = r->conn;

    if (!c || c->role >= role)
        return 0;
    wd_log_peer(WD_LOG_warning, "client %llu (pid %d, uid %d): refused %s: needs the %s role",
                (unsigned long long)c->serial, (int)c->pid, (int)c->uid, what, wd_role_name(role));
    return wd_error_set(&r->err, -EPERM,
                        "%s needs the %s role (root, the daemon's user, --admin-uids or --admin-groups); "
                        "uid %d is a %s", what, wd_role_name(role), (int)c->uid, wd_role_name(c->role));
}

/* socket_mode and socket_group, read and resolved. */
static int socket_settings(const wd_config *c, mode_t *mode, gid_t *gid, wd_error *err)
{
    char *end;
    unsigned long m = strtoul(c->socket_mode, &end, 8);
    unsigned g = (unsigned)-1;

    if (!*c->socket_mode || *end || m > 0777) {
        wd_error_set(err, -EINVAL, "socket_mode \"%s\" is not an octal mode such as 0660", c->socket_mode);
        wd_config_error_origin(c, WD_OPT_socket_mode, err);
        return -EINVAL;
    }
    if (c->socket_group[0] && resolve_id(c->socket_group, true, &g)) {
        wd_error_set(err, -EINVAL, "socket_group: no group named \"%s\"", c->socket_group);
        wd_config_error_origin(c, WD_OPT_socket_group, err);
        return -EINVAL;
    }
    *mode = (mode_t)m;
    *gid = (gid_t)g;
    return 0;
}

int wd_auth_check_socket(const wd_config *c, wd_error *err)
{
    mode_t mode;
    gid_t gid;

    return socket_settings(c, &mode, &gid, err);
}

int wd_auth_socket(const wd_config *c, const char *path, wd_error *err)
{
    mode_t mode;
    gid_t gid;
    int rc;

    if ((rc = socket_settings(c, &mode, &gid, err)))
        return rc;
    if (c->socket_group[0]) {
        if (chown(path, (uid_t)-1, gid) < 0)
            return wd_error_set(err, -errno, "cannot give %s to group %s: %s", path, c->socket_group,
                                strerror(errno));
    }
    if (chmod(path, mode) < 0)
        return wd_error_set(err, -errno, "cannot set the mode of %s: %s", path, strerror(errno));
    return 0;
}
