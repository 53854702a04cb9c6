/* Every exchange with systemd: the sockets and stored descriptors it
 * passes (LISTEN_FDS), what the daemon tells it (sd_notify: READY,
 * STATUS, the watchdog, RELOADING, STOPPING), and the fd store, where each
 * model's memory, its checkpoint's files and a record of the registry
 * (record.c) outlive the daemon: systemd hands them back to the next one
 * after a crash or a restart, and drops them on stop. Outside systemd each
 * call does nothing. */
#include "daemon/daemon.h"
#include "daemon/lease.h"

#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <systemd/sd-daemon.h>

#include "common/size.h"

#define NAME_PREFIX "wd-"
#define RECORD_PREFIX "wd-rec-"
#define LEASE_PREFIX "wd-lease-"

int wd_systemd_listen(wd_server *s, wd_error *err)
{
    struct sockaddr_un addr;
    socklen_t len = sizeof addr;
    char **names = NULL;
    int n = sd_listen_fds_with_names(1, &names), rc = 0;

    s->listen_fd = -1;
    if (n < 0)
        return wd_error_set(err, n, "LISTEN_FDS: %s", strerror(-n));
    if (n > 0 && (!(s->passed.fds = calloc((size_t)n, sizeof *s->passed.fds)) ||
                  !(s->passed.names = calloc((size_t)n, sizeof *s->passed.names)))) {
        rc = wd_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    for (int i = 0; i < n; i++) {
        int fd = SD_LISTEN_FDS_START + i;
        const char *name = names && names[i] ? names[i] : "";
        if (strncmp(name, NAME_PREFIX, strlen(NAME_PREFIX)) == 0) {
            /* Ours, from the store: the restore takes them. */
            fcntl(fd, F_SETFD, FD_CLOEXEC);
            s->passed.fds[s->passed.n] = fd;
            s->passed.names[s->passed.n++] = names[i];
            names[i] = NULL;
        } else if (s->listen_fd < 0 && sd_is_socket_unix(fd, SOCK_STREAM, 1, NULL, 0) > 0) {
            s->listen_fd = fd;
        } else {
            wd_log(WD_LOG_warning, "systemd passed descriptor %d (\"%s\"), which is neither a listening Unix "
                   "stream socket nor one of weightd's: closed", fd, name);
            close(fd);
        }
    }
    if (s->listen_fd >= 0) {
        fcntl(s->listen_fd, F_SETFL, fcntl(s->listen_fd, F_GETFL) | O_NONBLOCK);
        fcntl(s->listen_fd, F_SETFD, FD_CLOEXEC);
        if (getsockname(s->listen_fd, (struct sockaddr *)&addr, &len) == 0)
            snprintf(s->socket_path, sizeof s->socket_path, "%s", addr.sun_path);
    }
out:
    for (int i = 0; names && i < n; i++)
        free(names[i]);
    free(names);
    return rc;
}

/* ---- the fd store ------------------------------------------------------------ */

static int add_name(wd_fdstore *st, const char *name)
{
    if (st->n_names == st->cap) {
        size_t cap = st->cap ? st->cap * 2 : 64;
        char **names = realloc(st->names, cap * sizeof *names);
        if (!names)
            return -ENOMEM;
        st->names = names;
        st->cap = cap;
    }
    if (!(st->names[st->n_names] = strdup(name)))
        return -ENOMEM;
    st->n_names++;
    return 0;
}

/* FDSTORE=1 with one descriptor under name; false when systemd did not get
 * it. (Whether it kept it, FileDescriptorStoreMax= decides: nobody says.) */
static bool store_fd(wd_fdstore *st, const char *name, int fd)
{
    char msg[128];

    snprintf(msg, sizeof msg, "FDSTORE=1\nFDNAME=%s", name);
    if (sd_pid_notify_with_fds(0, 0, msg, &fd, 1) <= 0 || add_name(st, name))
        return false;
    return true;
}

static void remove_name(wd_fdstore *st, size_t i)
{
    char msg[128];

    snprintf(msg, sizeof msg, "FDSTOREREMOVE=1\nFDNAME=%s", st->names[i]);
    sd_notify(0, msg);
    free(st->names[i]);
    st->names[i] = st->names[--st->n_names];
}

/* The pieces of m's slabs, slab by slab: each slab must be whole physical
 * allocations of its own, or a restart could not give it back alone. */
static int model_pieces(const wd_model *m, int **fds, size_t *n, wd_error *err)
{
    const wa_mem *backing[64];
    size_t cap = 0;

    *fds = NULL;
    *n = 0;
    for (size_t i = 0; i < m->n_slabs; i++) {
        wa_region reg;
        size_t k = wa_block_backing(m->slabs[i].block, backing, 64);
        uint64_t at;
        wa_block_region(m->slabs[i].block, &reg);
        if (k > 64)
            return wd_error_set(err, -E2BIG, "slab %zu lies on %zu allocations", i + 1, k);
        at = reg.addr;
        for (size_t p = 0; p < k; p++) {
            if (backing[p]->addr != at || backing[p]->fd < 0)
                return wd_error_set(err, -ENOTUNIQ, "slab %zu shares its memory with other blocks", i + 1);
            at += backing[p]->size;
        }
        if (at != reg.addr + reg.size)
            return wd_error_set(err, -ENOTUNIQ, "slab %zu shares its memory with other blocks", i + 1);
        if (*n + k > cap) {
            int *grown = realloc(*fds, (cap = (*n + k) * 2) * sizeof *grown);
            if (!grown)
                return wd_error_set(err, -ENOMEM, "out of memory");
            *fds = grown;
        }
        for (size_t p = 0; p < k; p++)
            (*fds)[(*n)++] = backing[p]->fd;
    }
    return 0;
}

/* m's descriptors into the store, each under a name of this generation,
 * and its part of the record. */
static int store_model(wd_server *s, wd_model *m, wd_error *err)
{
    wd_fdstore *st = &s->fdstore;
    int *fds = NULL;
    size_t n = 0, total;
    char **names = NULL;
    int rc;

    if ((rc = model_pieces(m, &fds, &n, err)))
        goto out;
    total = n + m->ckpt.n_shards;
    if (!(names = calloc(total, sizeof *names))) {
        rc = wd_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < total; i++) {
        char name[64];
        int fd = i < n ? fds[i] : m->ckpt.shards[i - n].fd;
        snprintf(name, sizeof name, NAME_PREFIX "%s-%" PRIu64 "-%zu", i < n ? "mem" : "file", st->generation, i);
        if (!(names[i] = strdup(name)) || !store_fd(st, name, fd)) {
            rc = wd_error_set(err, -EIO, "systemd did not take descriptor %s", name);
            goto out;
        }
    }
    if ((rc = wd_record_model(m, names, err)))
        goto out;
    m->stored = names;
    m->n_stored = total;
    names = NULL;
out:
    /* What went to the store for a model that is not in the record goes
     * at the end of the sync, with everything nobody names. */
    for (size_t i = 0; names && i < n + m->ckpt.n_shards; i++)
        free(names[i]);
    free(names);
    free(fds);
    return rc;
}

static bool named(const wd_server *s, const char *name)
{
    bool lease = strncmp(name, LEASE_PREFIX, strlen(LEASE_PREFIX)) == 0;

    if (s->fdstore.record && strcmp(s->fdstore.record, name) == 0)
        return true;
    for (const wd_model *m = s->models; m; m = m->next) {
        for (size_t i = 0; !lease && i < m->n_stored; i++)
            if (strcmp(m->stored[i], name) == 0)
                return true;
        for (const wd_lease *l = m->leases; lease && m->record && l; l = l->model_next)
            if (strcmp(l->token, name + strlen(LEASE_PREFIX)) == 0)
                return true;
    }
    return false;
}

static void lease_name(const wd_lease *l, char name[64])
{
    snprintf(name, 64, LEASE_PREFIX "%s", l->token);
}

void wd_fdstore_lease(wd_server *s, wd_lease *l, bool add)
{
    wd_fdstore *st = &s->fdstore;
    wd_error err = {0};
    char name[64];
    int fd;

    if (!st->on || !l->model->record || add == l->stored)
        return;
    lease_name(l, name);
    if (!add) {
        for (size_t i = 0; i < st->n_names; i++)
            if (strcmp(st->names[i], name) == 0) {
                remove_name(st, i);
                break;
            }
        l->stored = false;
        return;
    }
    if (wd_record_lease(l, &fd, &err)) {
        wd_log(WD_LOG_warning, "fd store: lease %llu: %s", (unsigned long long)l->id, wd_error_text(&err));
        return;
    }
    l->stored = store_fd(st, name, fd);
    close(fd);
}

void wd_fdstore_sync(wd_server *s)
{
    wd_fdstore *st = &s->fdstore;
    wd_error err = {0};
    char name[64];
    int fd = -1;

    if (!st->on)
        return;
    st->generation++;
    for (wd_model *m = s->models; m; m = m->next) {
        if (m->state != WD_MODEL_READY || m->record || m->unstorable)
            continue;
        if (store_model(s, m, &err)) {
            wd_log(WD_LOG_warning, "fd store: %s will not outlive the daemon: %s", m->name, wd_error_text(&err));
            m->unstorable = true;
            continue;
        }
        for (wd_lease *l = m->leases; l; l = l->model_next)
            wd_fdstore_lease(s, l, true);
    }
    snprintf(name, sizeof name, RECORD_PREFIX "%" PRIu64, st->generation);
    if (wd_record_write(s, st->generation, &fd, &err) || !store_fd(st, name, fd)) {
        wd_log(WD_LOG_warning, "fd store: the record did not go to systemd (%s): a restart reads the "
               "checkpoints again", err.code ? wd_error_text(&err) : "sd_notify failed");
    } else {
        free(st->record);
        st->record = strdup(name);
    }
    if (fd >= 0)
        close(fd);
    /* The new record is in before the old goes: a crash between the two
     * leaves two, and the newer wins. */
    for (size_t i = st->n_names; i-- > 0;)
        if (!named(s, st->names[i]))
            remove_name(st, i);
}

void wd_fdstore_drop(wd_server *s, wd_model *m)
{
    if (!m->record && !m->n_stored)
        return;
    for (size_t i = 0; i < m->n_stored; i++)
        free(m->stored[i]);
    free(m->stored);
    m->stored = NULL;
    m->n_stored = 0;
    free(m->record);
    m->record = NULL;
    for (wd_lease *l = m->leases; l; l = l->model_next)
        l->stored = false;
    wd_fdstore_sync(s); /* a record without m, and its descriptors out */
}

/* Newest first: "wd-rec-G" by G. */
static int by_generation(const void *a, const void *b)
{
    uint64_t ga = strtoull(*(char *const *)a + strlen(RECORD_PREFIX), NULL, 10);
    uint64_t gb = strtoull(*(char *const *)b + strlen(RECORD_PREFIX), NULL, 10);
    return ga < gb ? 1 : ga > gb ? -1 : 0;
}

void wd_fdstore_restore(wd_server *s)
{
    wd_fdstore *st = &s->fdstore;
    wd_passed *p = &s->passed;
    char **records = NULL;
    size_t n_records = 0;

    st->on = false;
    if (!getenv("NOTIFY_SOCKET"))
        st->off_why = "not under systemd";
    else if (!s->backend->import)
        st->off_why = "this backend's memory dies with the daemon";
    else
        st->on = true;
    if (!st->on && strcmp(s->backend->name, "cuda-ipc") == 0)
        wd_log(WD_LOG_notice, "fd store off: cuda-ipc memory (cuMemAlloc) dies with the daemon, so models are read "
               "again after a restart (the cuda backend keeps them)");
    /* Every name passed is in the store until the first sync says otherwise. */
    for (size_t i = 0; i < p->n; i++)
        if (add_name(st, p->names[i]))
            break;
    if (p->n && (records = calloc(p->n, sizeof *records))) {
        for (size_t i = 0; i < p->n; i++)
            if (strncmp(p->names[i], RECORD_PREFIX, strlen(RECORD_PREFIX)) == 0)
                records[n_records++] = p->names[i];
        qsort(records, n_records, sizeof *records, by_generation);
    }
    for (size_t r = 0; r < n_records; r++) {
        wd_error err = {0};
        uint64_t generation = 0;
        int fd = -1, rc;
        for (size_t i = 0; i < p->n; i++)
            if (p->names[i] == records[r]) {
                fd = p->fds[i];
                p->fds[i] = -1;
            }
        rc = wd_record_restore(s, fd, p, &generation, &err);
        close(fd);
        if (rc < 0) {
            wd_log(WD_LOG_warning, "fd store: record %s dropped: %s", records[r], wd_error_text(&err));
            continue;
        }
        st->generation = generation;
        break; /* the older ones are what it replaced */
    }
    free(records);
    wd_record_restore_leases(s, p, LEASE_PREFIX);
    for (size_t i = 0; i < p->n; i++) {
        if (p->fds[i] >= 0)
            close(p->fds[i]);
        free(p->names[i]);
    }
    free(p->fds);
    free(p->names);
    memset(p, 0, sizeof *p);
    for (wd_model *m = s->models; m; m = m->next)
        wd_attach_prepare(s, m);
    if (st->on && st->n_names)
        wd_fdstore_sync(s);
    else if (!st->on)
        for (size_t i = st->n_names; i-- > 0;) /* nothing of an earlier daemon can be served */
            remove_name(st, i);
}

cJSON *wd_fdstore_json(const wd_server *s)
{
    cJSON *o = cJSON_CreateObject();
    size_t models = 0;

    for (const wd_model *m = s->models; m; m = m->next)
        models += m->record != NULL;
    cJSON_AddBoolToObject(o, "enabled", s->fdstore.on);
    if (!s->fdstore.on)
        cJSON_AddStringToObject(o, "why_not", s->fdstore.off_why ? s->fdstore.off_why : "");
    cJSON_AddBoolToObject(o, "survives_restart", s->backend->import != NULL);
    cJSON_AddNumberToObject(o, "models", (double)models);
    cJSON_AddNumberToObject(o, "descriptors", (double)s->fdstore.n_names);
    cJSON_AddNumberToObject(o, "generation", (double)s->fdstore.generation);
    return o;
}

void wd_fdstore_free(wd_server *s)
{
    wd_fdstore *st = &s->fdstore;

    for (size_t i = 0; i < st->n_names; i++)
        free(st->names[i]);
    free(st->names);
    free(st->record);
    memset(st, 0, sizeof *st);
}

void wd_systemd_status(wd_server *s)
{
    char size[32];
    uint64_t bytes = 0;
    size_t n = 0;

    for (wd_model *m = s->models; m; m = m->next)
        if (m->state == WD_MODEL_READY) {
            n++;
            bytes += m->ckpt.total_bytes;
        }
    sd_notifyf(0, "STATUS=%zu model%s loaded (%s)%s, listening on %s", n, n == 1 ? "" : "s",
               wd_size_format(bytes, size, sizeof size), wd_jobs_load_active(s) ? ", loading" : "", s->socket_path);
}

void wd_systemd_ready(wd_server *s)
{
    if (sd_watchdog_enabled(0, &s->watchdog_usec) <= 0)
        s->watchdog_usec = 0;
    sd_notify(0, "READY=1");
    wd_systemd_status(s);
}

void wd_systemd_watchdog(wd_server *s)
{
    if (s->watchdog_usec && wd_now() - s->watchdog_last >= (double)s->watchdog_usec / 2e6) {
        sd_notify(0, "WATCHDOG=1");
        s->watchdog_last = wd_now();
    }
}

void wd_systemd_reloading(wd_server *s)
{
    (void)s;
    /* MONOTONIC_USEC: systemd 253's Type=notify-reload wants it; 252 ignores it. */
    sd_notifyf(0, "RELOADING=1\nMONOTONIC_USEC=%llu", (unsigned long long)(wd_now() * 1e6));
}

void wd_systemd_reloaded(wd_server *s)
{
    sd_notify(0, "READY=1");
    wd_systemd_status(s);
}

void wd_systemd_stopping(wd_server *s)
{
    (void)s;
    sd_notify(0, "STOPPING=1");
}
