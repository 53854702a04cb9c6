/* Leases (lease.h). */
#include "daemon/lease.h"

#include <fcntl.h>
#include <stdio.h>
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

int wd_lease_new(wd_server *s, wd_request *r, wd_model *m, int device, bool writable, wd_lease **out,
                 wd_error *err)
{
    wd_conn *c = r->conn;
    wd_lease *l;

    if (wd_conn_lease_count(c) >= WD_LEASES_PER_CONN)
        return wd_error_set(err, -ENOSPC, "this connection holds %d leases already; detach some first",
                            WD_LEASES_PER_CONN);
    if (!(l = calloc(1, sizeof *l)))
        return wd_error_set(err, -ENOMEM, "out of memory");
    l->id = next_lease_id++;
    l->conn = c;
    l->model = m;
    l->device = device;
    l->writable = writable;
    l->pid = c->pid;
    l->uid = c->uid;
    l->since = wd_now();
    process_name(c->pid, l->process, sizeof l->process);
    l->conn_next = c->leases;
    c->leases = l;
    l->model_next = m->leases;
    m->leases = l;
    wd_conn_watch_peer(c);
    /* rate-limited: any reader can attach and detach in a loop */
    wd_log_peer(WD_LOG_info, "lease %llu: %s attached by pid %d (%s, uid %u)%s", (unsigned long long)l->id, m->name,
           (int)l->pid, l->process, (unsigned)l->uid, writable ? ", writable" : "");
    (void)s;
    *out = l;
    return 0;
}

void wd_lease_end(wd_server *s, wd_lease *l, const char *why)
{
    wd_model *m = l->model;
    wd_lease **link;

    for (link = &l->conn->leases; *link && *link != l; link = &(*link)->conn_next)
        ;
    if (*link)
        *link = l->conn_next;
    for (link = &m->leases; *link && *link != l; link = &(*link)->model_next)
        ;
    if (*link)
        *link = l->model_next;
    wd_log_peer(WD_LOG_info, "lease %llu of %s (pid %d) ended: %s", (unsigned long long)l->id, m->name, (int)l->pid, why);
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
        used += (size_t)snprintf(buf + used, len - used, "%s pid %d (%s, uid %u, lease %llu)",
                                 l == m->leases ? "" : ",", (int)l->pid, l->process, (unsigned)l->uid,
                                 (unsigned long long)l->id);
}

void wd_leases_revoke(wd_server *s, wd_model *m, const char *reason)
{
    (void)s;
    /* wd_conn_event only queues: no connection closes, no lease ends, while
     * this walks the list. */
    for (wd_lease *l = m->leases; l; l = l->model_next) {
        cJSON *ev = cJSON_CreateObject();
        cJSON_AddStringToObject(ev, "event", "revoke");
        cJSON_AddNumberToObject(ev, "lease", (double)l->id);
        cJSON_AddStringToObject(ev, "name", m->name);
        cJSON_AddStringToObject(ev, "reason", reason);
        wd_conn_event(l->conn, ev);
    }
}
