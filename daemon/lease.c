/* Leases (lease.h). */
#include "daemon/lease.h"
#include "common/fault.h"

#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/random.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static uint64_t next_lease_id = 1;

/* The peer's process name, as ps shows it; "?" when it cannot be read (a
 * process of another PID namespace). */
static void process_name(pid_t pid, char *buf, size_t len)
{
    char path[64];
    ssize_t n = -1;
    int fd;

    snprintf(path, sizeof path, "/proc/%d/comm", (int)pid);
    if (pid > 0 && (fd = open(path, O_RDONLY | O_CLOEXEC)) >= 0) {
        n = read(fd, buf, len - 1);
        close(fd);
    }
    if (n <= 0) {
        snprintf(buf, len, "?");
        return;
    }
    buf[n] = '\0';
    buf[strcspn(buf, "\n")] = '\0';
    wd_text_clean(buf); /* shown in JSON and logs */
}

/* 128 random bits, as hex. */
static int new_token(char out[33], wd_error *err)
{
    uint64_t bits[2];

    if (getrandom(bits, sizeof bits, 0) != (ssize_t)sizeof bits)
        return wd_error_set(err, -EIO, "getrandom: %s", strerror(errno));
    snprintf(out, 33, "%016" PRIx64 "%016" PRIx64, bits[0], bits[1]);
    return 0;
}

static void link_model(wd_lease *l, wd_model *m)
{
    l->model = m;
    l->model_next = m->leases;
    m->leases = l;
}

static void link_conn(wd_lease *l, wd_conn *c)
{
    l->conn = c;
    l->conn_next = c->leases;
    c->leases = l;
    c->peer->leases++;
    l->pid = c->pid;
    l->uid = c->uid;
    process_name(c->pid, l->process, sizeof l->process);
    wd_conn_watch_peer(c);
}

/* 0 when c may hold one lease more; else -ENOSPC naming the bound. Each
 * lease holds a model in memory and, under systemd, an entry of the fd store
 * (FileDescriptorStoreMax= is shared by all): a worker needs one per model or
 * device, not thousands. Administrators have no per-uid bound, as for
 * max_clients_per_uid. */
static int lease_room(wd_server *s, const wd_conn *c, const char *op, wd_error *err)
{
    size_t mine = wd_conn_lease_count(c);
    int rc = 0;

    if ((int64_t)mine >= s->conf->max_leases_per_client)
        rc = wd_error_set(err, -ENOSPC, "this connection holds %zu lease%s (max_leases_per_client %lld); "
                          "detach one first", mine, mine == 1 ? "" : "s", (long long)s->conf->max_leases_per_client);
    else if (c->role != WD_ROLE_ADMIN && (int64_t)c->peer->leases >= s->conf->max_leases_per_uid)
        rc = wd_error_set(err, -ENOSPC, "uid %u holds %zu lease%s (max_leases_per_uid %lld); detach one first",
                          (unsigned)c->uid, c->peer->leases, c->peer->leases == 1 ? "" : "s",
                          (long long)s->conf->max_leases_per_uid);
    if (rc)
        wd_log_peer(WD_LOG_info, "client %llu (uid %u): refused %s: %s", (unsigned long long)c->serial,
                    (unsigned)c->uid, op, wd_error_text(err));
    return rc;
}

int wd_lease_new(wd_server *s, wd_request *r, wd_model *m, int device, bool writable, wd_lease **out,
                 wd_error *err)
{
    wd_conn *c = r->conn;
    wd_lease *l;
    int rc;

    if ((rc = lease_room(s, c, "attach", err)))
        return rc;
    if (!(l = wd_calloc(1, sizeof *l)))
        return wd_error_set(err, -ENOMEM, "out of memory");
    if ((rc = new_token(l->token, err))) {
        free(l);
        return rc;
    }
    l->id = next_lease_id++;
    l->device = device;
    l->writable = writable;
    l->since = wd_now();
    link_conn(l, c);
    link_model(l, m);
    wd_fdstore_lease(s, l, true);
    /* rate-limited: any reader can attach and detach in a loop */
    wd_log_peer(WD_LOG_info, "lease %llu: %s attached by pid %d (%s, uid %u)%s", (unsigned long long)l->id, m->name,
           (int)l->pid, l->process, (unsigned)l->uid, writable ? ", writable" : "");
    *out = l;
    return 0;
}

int wd_lease_restore(wd_server *s, wd_model *m, const char *token, uid_t uid, pid_t pid, const char *process,
                     int device, bool writable, wd_error *err)
{
    wd_lease *l;

    if (strlen(token) != 32 || strspn(token, "0123456789abcdef") != 32)
        return wd_error_set(err, -EBADMSG, "a lease token is 32 hex digits");
    if (!(l = wd_calloc(1, sizeof *l)))
        return wd_error_set(err, -ENOMEM, "out of memory");
    memcpy(l->token, token, 33);
    l->id = next_lease_id++;
    l->device = device;
    l->writable = writable;
    l->uid = uid;
    l->pid = pid;
    snprintf(l->process, sizeof l->process, "%s", process);
    wd_text_clean(l->process);
    l->since = wd_now();
    l->orphan_until = wd_now() + (double)s->conf->lease_grace;
    l->stored = true; /* it came from there, and stays until it ends */
    link_model(l, m);
    wd_log(WD_LOG_info, "lease %llu: %s, held by pid %d (%s, uid %u) before the restart, waits %lld s for it",
           (unsigned long long)l->id, m->name, (int)pid, l->process, (unsigned)uid, (long long)s->conf->lease_grace);
    return 0;
}

int wd_lease_reattach(wd_server *s, wd_request *r, const char *token, wd_lease **out, wd_error *err)
{
    wd_conn *c = r->conn;
    int rc;

    for (wd_model *m = s->models; m; m = m->next)
        for (wd_lease *l = m->leases; l; l = l->model_next) {
            if (strcmp(l->token, token) != 0)
                continue;
            /* A token is a secret, but only its own user's worker may use it. */
            if (l->uid != c->uid)
                break;
            if (l->conn)
                return wd_error_set(err, -EBUSY, "lease %llu is held by a connection already",
                                    (unsigned long long)l->id);
            if ((rc = lease_room(s, c, "reattach", err)))
                return rc;
            link_conn(l, c);
            l->orphan_until = 0;
            wd_log_peer(WD_LOG_info, "lease %llu: %s taken again by pid %d (%s, uid %u) after the restart",
                        (unsigned long long)l->id, m->name, (int)l->pid, l->process, (unsigned)l->uid);
            *out = l;
            return 0;
        }
    return wd_error_set(err, -ENOENT, "no lease has this token: its model was unloaded, or it waited more than "
                        "--lease-grace for its worker after a restart, or the daemon restarted without its fd store");
}

void wd_leases_tick(wd_server *s)
{
    double now = wd_now();

    for (wd_model *m = s->models; m; m = m->next)
        for (wd_lease *l = m->leases, *next; l; l = next) {
            next = l->model_next;
            if (!l->conn && l->orphan_until && now >= l->orphan_until)
                wd_lease_end(s, l, "its worker did not come back within --lease-grace of the restart");
        }
}

void wd_leases_end_orphans(wd_server *s, wd_model *m, const char *why)
{
    for (wd_lease *l = m->leases, *next; l; l = next) {
        next = l->model_next;
        if (!l->conn)
            wd_lease_end(s, l, why);
    }
}

void wd_lease_end(wd_server *s, wd_lease *l, const char *why)
{
    wd_model *m = l->model;
    wd_lease **link;

    if (l->conn) {
        for (link = &l->conn->leases; *link && *link != l; link = &(*link)->conn_next)
            ;
        if (*link)
            *link = l->conn_next;
        l->conn->peer->leases--;
    }
    for (link = &m->leases; *link && *link != l; link = &(*link)->model_next)
        ;
    if (*link)
        *link = l->model_next;
    wd_log_peer(WD_LOG_info, "lease %llu of %s (pid %d) ended: %s", (unsigned long long)l->id, m->name, (int)l->pid, why);
    /* A stopping daemon's leases stay in the store: its workers take them
     * again from the next one. */
    if (!s->stopping)
        wd_fdstore_lease(s, l, false);
    free(l);
    wd_model_released(s, m);
}

void wd_leases_conn_gone(wd_server *s, wd_conn *c, const char *why)
{
    while (c->leases)
        wd_lease_end(s, c->leases, why);
}

wd_lease *wd_lease_find(const wd_conn *c, uint64_t id)
{
    for (wd_lease *l = c->leases; l; l = l->conn_next)
        if (l->id == id)
            return l;
    return NULL;
}

size_t wd_conn_lease_count(const wd_conn *c)
{
    size_t n = 0;

    for (const wd_lease *l = c->leases; l; l = l->conn_next)
        n++;
    return n;
}

cJSON *wd_lease_json(const wd_lease *l)
{
    cJSON *o = cJSON_CreateObject();

    cJSON_AddNumberToObject(o, "lease", (double)l->id);
    cJSON_AddStringToObject(o, "model", l->model->name);
    cJSON_AddNumberToObject(o, "pid", (double)l->pid);
    cJSON_AddNumberToObject(o, "uid", (double)l->uid);
    cJSON_AddStringToObject(o, "process", l->process);
    cJSON_AddNumberToObject(o, "age", wd_now() - l->since);
    if (l->device >= 0)
        cJSON_AddNumberToObject(o, "device", l->device);
    else
        cJSON_AddNullToObject(o, "device");
    cJSON_AddBoolToObject(o, "writable", l->writable);
    if (!l->conn)
        cJSON_AddNumberToObject(o, "waits_for_worker", l->orphan_until - wd_now());
    return o;
}

bool wd_lease_visible(const wd_lease *l, const wd_conn *viewer)
{
    return !viewer || viewer->role == WD_ROLE_ADMIN || viewer->uid == l->uid;
}

cJSON *wd_model_leases_json(const wd_model *m, const wd_conn *viewer, size_t max)
{
    cJSON *arr = cJSON_CreateArray();
    size_t n = 0;

    for (const wd_lease *l = m->leases; l && n < max; l = l->model_next)
        if (wd_lease_visible(l, viewer)) {
            cJSON_AddItemToArray(arr, wd_lease_json(l));
            n++;
        }
    return arr;
}

size_t wd_model_lease_count(const wd_model *m)
{
    size_t n = 0;

    for (const wd_lease *l = m->leases; l; l = l->model_next)
        n++;
    return n;
}

void wd_leases_describe(const wd_model *m, char *buf, size_t len)
{
    size_t n = wd_model_lease_count(m), used;

    used = (size_t)snprintf(buf, len, "%zu worker%s:", n, n == 1 ? "" : "s");
    for (const wd_lease *l = m->leases; l && used < len; l = l->model_next)
        used += (size_t)snprintf(buf + used, len - used, "%s pid %d (%s, uid %u, lease %llu%s)",
                                 l == m->leases ? "" : ",", (int)l->pid, l->process, (unsigned)l->uid,
                                 (unsigned long long)l->id, l->conn ? "" : ", not back since the restart");
}

void wd_leases_revoke(wd_server *s, wd_model *m, const char *reason)
{
    (void)s;
    /* wd_conn_event only queues: no connection closes, no lease ends, while
     * this walks the list. */
    for (wd_lease *l = m->leases; l; l = l->model_next) {
        cJSON *ev;
        if (!l->conn)
            continue; /* nobody to ask: a forced unload ends them */
        ev = cJSON_CreateObject();
        cJSON_AddStringToObject(ev, "event", "revoke");
        cJSON_AddNumberToObject(ev, "lease", (double)l->id);
        cJSON_AddStringToObject(ev, "name", m->name);
        cJSON_AddStringToObject(ev, "reason", reason);
        wd_conn_event(l->conn, ev);
    }
}
