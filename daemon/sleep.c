/* sleep and wake: a model's device memory given back, and taken again.
 *
 * sleep NAME [offload|discard] [force]     ready -> sleeping -> asleep
 *   Each holder of a lease gets {"event": "sleep", "lease", "name"}; its
 *   client unmaps the model's physical memory, keeps its address
 *   reservations, and says so with the op "slept". Once every holder has
 *   (or sleep_timeout passes: the sleep is refused, naming those that did
 *   not, and those that did get "wake" with the memory that never went;
 *   with force they lose their leases instead), an offload copies each
 *   tensor once into memfds laid out as the shards' files are, then every
 *   slab is freed and its segments go back to the devices, not to the
 *   allocator's cache. A discard keeps nothing but each shard's header.
 * wake NAME                                asleep -> waking -> ready
 *   A discarded model's files must be as they were (size, modification
 *   time, header). The slabs are allocated again under the load policy (the
 *   same plan: the same sizes in the same order) and filled from the memfds
 *   or the files, checksums compared with the load's; then each holder gets
 *   "wake" events with the new descriptors, which its client maps at the
 *   addresses it kept, so that its tensors, and CUDA graphs over them, work
 *   again unchanged. A wake that fails leaves the model asleep.
 *
 * The daemon's fd store lets go of a model while it sleeps: a restart then
 * does not keep it (its memfds could go to the store; not done yet). */
#include "daemon/daemon.h"
#include "daemon/lease.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/grow.h"
#include "common/size.h"
#include "common/fault.h"

typedef enum sleep_mode { SLEEP_OFFLOAD, SLEEP_DISCARD } sleep_mode;

/* An offloaded model's bytes: each shard's data where its file has it, in
 * an address range of the daemon's into which memfds of SEGMENT bytes are
 * mapped side by side. Many memfds rather than one a shard: a memfd takes
 * its pages one at a time under its own lock, so the readers that fill one
 * wait on each other (one memfd a shard: 4.6 GB/s on the H200 machine). */
#define SEGMENT (256u << 20)
#define HUGE_PAGE (2u << 20)
typedef struct host_copy {
    wl_checkpoint image;      /* a view of the model's checkpoint (its tensors are m->ckpt's), shards mapped */
    struct reserved {
        void *base;
        size_t len;
    } *ranges;                /* per shard: the range its memfds are mapped into */
    int *fds;
    size_t n_fds, cap_fds;
    wa_backend *backend;      /* that pinned shards (host_pinned) */
} host_copy;

struct wd_sleep {
    sleep_mode mode;
    host_copy copy;           /* offload */
    char **headers;           /* discard: each shard's header when it went to sleep */
    size_t *header_lens;
    wd_request *req;          /* the sleep or wake to answer; NULL once its client is gone */
    bool force;
    double deadline;          /* sleeping: when waiting for the holders gives up */
    double t0;
    uint64_t reserved_before; /* the model's devices, for the reply */
    uint64_t free_before;
};

static const char *mode_name(sleep_mode mode)
{
    return mode == SLEEP_OFFLOAD ? "host" : "checkpoint";
}

const char *wd_sleep_where(const wd_model *m)
{
    return m->sleep ? mode_name(m->sleep->mode) : NULL;
}

static void copy_free(host_copy *hc)
{
    for (size_t i = 0; hc->image.shards && i < hc->image.n_shards; i++)
        if (hc->image.shards[i].host_pinned)
            hc->backend->host_unregister(hc->backend, hc->image.shards[i].host);
    for (size_t i = 0; hc->ranges && i < hc->image.n_shards; i++)
        if (hc->ranges[i].base)
            munmap(hc->ranges[i].base, hc->ranges[i].len);
    for (size_t i = 0; i < hc->n_fds; i++)
        close(hc->fds[i]);
    for (size_t i = 0; hc->image.shards && i < hc->image.n_shards; i++)
        free(hc->image.shards[i].path);
    free(hc->image.shards);
    free(hc->ranges);
    free(hc->fds);
    memset(hc, 0, sizeof *hc);
}

/* Giving back tens of gigabytes of host memory takes a while (unmapping,
 * then freeing every page): off the loop, on a thread of its pool. */
typedef struct copy_release {
    uv_work_t work;
    wd_server *srv;
    host_copy copy;
} copy_release;

static void release_work(uv_work_t *w)
{
    copy_free(&((copy_release *)w->data)->copy);
}

/* Counted with the jobs: a pinned copy is unpinned through the backend,
 * which a stopping daemon destroys only once this is done. */
static void release_done(uv_work_t *w, int status)
{
    wd_server *s = ((copy_release *)w->data)->srv;

    (void)status;
    free(w->data);
    s->jobs_running--;
    wd_server_maybe_finish(s);
}

static void copy_release_later(wd_server *s, host_copy *hc)
{
    copy_release *r;

    if (!hc->image.shards)
        return;
    if (s->stopping || !(r = wd_calloc(1, sizeof *r))) {
        copy_free(hc);
        return;
    }
    r->copy = *hc;
    r->srv = s;
    r->work.data = r;
    memset(hc, 0, sizeof *hc);
    s->jobs_running++;
    uv_queue_work(s->loop, &r->work, release_work, release_done);
}

void wd_sleep_free(wd_server *s, wd_model *m)
{
    wd_sleep *sl = m->sleep;

    if (!sl)
        return;
    copy_release_later(s, &sl->copy);
    for (size_t i = 0; sl->headers && i < m->ckpt.n_shards; i++)
        free(sl->headers[i]);
    free(sl->headers);
    free(sl->header_lens);
    free(sl);
    m->sleep = NULL;
}

/* What the model's devices have reserved, and have free, now. */
static void device_figures(wd_server *s, const wd_model *m, uint64_t *reserved, uint64_t *free_bytes)
{
    *reserved = *free_bytes = 0;
    for (size_t i = 0; i < m->n_devices; i++) {
        wa_stats st;
        wa_get_stats(s->alloc, m->devices[i], &st);
        *reserved += st.reserved_bytes.current;
        *free_bytes += s->backend->free_bytes(s->backend, m->devices[i]);
    }
}

static cJSON *figures_json(wd_server *s, const wd_model *m, double seconds)
{
    cJSON *res = cJSON_CreateObject();
    uint64_t reserved, free_bytes;

    device_figures(s, m, &reserved, &free_bytes);
    cJSON_AddStringToObject(res, "name", m->name);
    cJSON_AddStringToObject(res, "state", wd_model_state_name(m->state));
    if (m->sleep)
        cJSON_AddStringToObject(res, "sleeps_in", mode_name(m->sleep->mode));
    cJSON_AddNumberToObject(res, "device_bytes", (double)m->device_bytes);
    cJSON_AddNumberToObject(res, "seconds", seconds);
    cJSON_AddNumberToObject(res, "rate", seconds > 0 ? (double)m->device_bytes / seconds : 0);
    cJSON_AddNumberToObject(res, "reserved_bytes_before", (double)m->sleep->reserved_before);
    cJSON_AddNumberToObject(res, "reserved_bytes_after", (double)reserved);
    cJSON_AddNumberToObject(res, "free_bytes_before", (double)m->sleep->free_before);
    cJSON_AddNumberToObject(res, "free_bytes_after", (double)free_bytes);
    return res;
}

static void reply_err(wd_sleep *sl, const wd_error *err)
{
    if (sl->req)
        wd_reply_err(sl->req, err);
    sl->req = NULL;
}

/* The holders that unmapped take the memory again (a sleep that did not
 * happen, or a wake). */
static void wake_holders(wd_server *s, wd_model *m)
{
    for (wd_lease *l = m->leases; l; l = l->model_next) {
        wd_error err = {0};
        if (!l->unmapped)
            continue;
        l->unmapped = false;
        if (wd_attach_send_wake(s, l, &err)) {
            wd_log(WD_LOG_warning, "%s: lease %llu cannot be woken: %s", m->name, (unsigned long long)l->id,
                   wd_error_text(&err));
            wd_lease_end(s, l, "its model's memory could not be sent again");
        }
    }
}

/* ---- sleep -------------------------------------------------------------------- */

/* The sleep did not happen: the model is as it was, its holders map again. */
static void sleep_undone(wd_server *s, wd_model *m, const wd_error *err)
{
    wd_sleep *sl = m->sleep;

    wd_log(WD_LOG_warning, "sleep of %s failed: %s", m->name, wd_error_text(err));
    reply_err(sl, err);
    m->state = WD_MODEL_READY;
    wd_sleep_free(s, m);
    wake_holders(s, m);
    wd_model_released(s, m);
}

/* Every byte of the model leaves its devices: asleep. */
static void fall_asleep(wd_server *s, wd_model *m)
{
    wd_sleep *sl = m->sleep;
    char size[32];

    wd_attach_forget(m);
    wd_model_free_memory(s, m);
    m->state = WD_MODEL_ASLEEP;
    wd_log(WD_LOG_notice, "%s is asleep (%s, in %s) after %.2f s", m->name,
           wd_size_format(m->device_bytes, size, sizeof size), mode_name(sl->mode), wd_now() - sl->t0);
    if (sl->req)
        wd_reply_ok(sl->req, figures_json(s, m, wd_now() - sl->t0));
    sl->req = NULL;
    wd_fdstore_drop(s, m);
    wd_systemd_status(s);
}

static void offloaded(wd_server *s, wd_model *m, int rc, const wd_error *err)
{
    wd_sleep *sl = m->sleep;

    /* The memfds are the model's bytes from now on: read-only here, and
     * their sizes sealed (a shrink would fault the mapping). */
    for (size_t i = 0; rc == 0 && i < sl->copy.image.n_shards; i++)
        mprotect(sl->copy.image.shards[i].host, sl->copy.image.shards[i].file_size, PROT_READ);
    for (size_t i = 0; rc == 0 && i < sl->copy.n_fds; i++)
        fcntl(sl->copy.fds[i], F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
    if (rc)
        sleep_undone(s, m, err);
    else
        fall_asleep(s, m);
}

/* Shard sh's range: reserved, then its memfds mapped in, SEGMENT bytes
 * each, the range aligned for huge pages (taken where the system allows
 * them for memfds, transparent_hugepage/shmem_enabled "advise": a 512th of
 * the page faults and lookups, writing and reading). */
static int map_shard(host_copy *hc, size_t i, wd_error *err)
{
    wl_shard *sh = &hc->image.shards[i];
    struct reserved *r = &hc->ranges[i];
    uintptr_t at;

    r->len = sh->file_size + HUGE_PAGE;
    if ((r->base = mmap(NULL, r->len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)) == MAP_FAILED) {
        r->base = NULL;
        return wd_error_set(err, -errno, "reserving %zu bytes of address space: %s", r->len, strerror(errno));
    }
    at = ((uintptr_t)r->base + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1);
    sh->host = (void *)at;
    for (uint64_t off = 0; off < sh->file_size; off += SEGMENT) {
        uint64_t len = sh->file_size - off < SEGMENT ? sh->file_size - off : SEGMENT;
        int fd;
        if (WD_GROW(hc->fds, hc->cap_fds, hc->n_fds + 1, 64))
            return wd_error_set(err, -ENOMEM, "out of host memory");
        if ((fd = memfd_create("weightd-asleep", MFD_CLOEXEC | MFD_ALLOW_SEALING)) < 0)
            return wd_error_set(err, -errno, "memfd_create: %s", strerror(errno));
        hc->fds[hc->n_fds++] = fd;
        if (ftruncate(fd, (off_t)len) < 0 ||
            mmap((char *)sh->host + off, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) == MAP_FAILED)
            return wd_error_set(err, -errno, "a memfd of %llu bytes for %s: %s", (unsigned long long)len,
                                sh->path, strerror(errno));
    }
    madvise(sh->host, sh->file_size, MADV_HUGEPAGE);
    return 0;
}

/* The host copy's memory, laid out as m's shards are. */
static int copy_make(wd_server *s, wd_model *m, host_copy *hc, wd_error *err)
{
    const wl_checkpoint *ck = &m->ckpt;
    size_t n = ck->n_shards ? ck->n_shards : 1;
    int rc = 0;

    memset(hc, 0, sizeof *hc);
    hc->backend = s->backend;
    hc->image = *ck;
    hc->image.by_name = NULL;
    if (!(hc->image.shards = wd_calloc(n, sizeof *hc->image.shards)) || !(hc->ranges = wd_calloc(n, sizeof *hc->ranges))) {
        free(hc->image.shards); /* ours (or NULL), not m's: the calloc replaced the view */
        free(hc->ranges);
        memset(hc, 0, sizeof *hc);
        return wd_error_set(err, -ENOMEM, "out of host memory");
    }
    for (size_t i = 0; i < ck->n_shards && !rc; i++) {
        wl_shard *sh = &hc->image.shards[i];
        *sh = ck->shards[i];
        sh->fd = -1;
        sh->host = NULL;
        sh->host_pinned = false;
        if (!(sh->path = wd_malloc(strlen(ck->shards[i].path) + 32)))
            rc = wd_error_set(err, -ENOMEM, "out of host memory");
        else
            sprintf(sh->path, "%s (in host memory)", ck->shards[i].path);
        if (!rc)
            rc = map_shard(hc, i, err);
    }
    if (rc)
        copy_free(hc);
    return rc;
}

static int save_headers(wd_model *m, wd_sleep *sl, wd_error *err)
{
    size_t n = m->ckpt.n_shards;

    if (!(sl->headers = wd_calloc(n ? n : 1, sizeof *sl->headers)) ||
        !(sl->header_lens = wd_calloc(n ? n : 1, sizeof *sl->header_lens)))
        return wd_error_set(err, -ENOMEM, "out of host memory");
    for (size_t i = 0; i < n; i++) {
        int rc = wl_shard_header(&m->ckpt.shards[i], &sl->headers[i], &sl->header_lens[i], err);
        if (rc)
            return rc;
    }
    return 0;
}

/* Every holder unmapped (or none was left to ask): the bytes go. */
static void holders_done(wd_server *s, wd_model *m)
{
    wd_sleep *sl = m->sleep;
    wd_error err = {0};
    int rc;

    if (sl->mode == SLEEP_DISCARD) {
        if ((rc = save_headers(m, sl, &err)))
            sleep_undone(s, m, &err);
        else
            fall_asleep(s, m);
        return;
    }
    if ((rc = copy_make(s, m, &sl->copy, &err)) || (rc = wd_offload_start(s, m, &sl->copy.image, offloaded, &err)))
        sleep_undone(s, m, &err);
}

static bool holders_pending(const wd_model *m)
{
    for (const wd_lease *l = m->leases; l; l = l->model_next)
        if (!l->unmapped)
            return true;
    return false;
}

static void describe_pending(const wd_model *m, char *buf, size_t len)
{
    size_t used = 0, n = 0;

    buf[0] = '\0';
    for (const wd_lease *l = m->leases; l && used + 1 < len; l = l->model_next)
        if (!l->unmapped)
            used += (size_t)snprintf(buf + used, len - used, "%spid %d (%s, uid %u, lease %llu)", n++ ? ", " : "",
                                     (int)l->pid, l->process, (unsigned)l->uid, (unsigned long long)l->id);
}

/* A holder answered, detached or went: the sleep may go on. */
void wd_sleep_released(wd_server *s, wd_model *m)
{
    if (m->state == WD_MODEL_SLEEPING && m->sleep->deadline && !holders_pending(m)) {
        m->sleep->deadline = 0;
        holders_done(s, m);
    }
}

/* {"name", "mode"?: "offload" | "discard", "force"?} */
int wd_op_sleep(wd_server *s, wd_request *r)
{
    const char *name, *mode = "offload";
    bool force = false, ipc = s->backend->share == WA_SHARE_IPC, orphans = false;
    char holders[512];
    wd_model *m;
    wd_sleep *sl;
    int rc;

    if ((rc = wp_arg_string(r->args, "name", true, &name, &r->err)) ||
        (rc = wp_arg_string(r->args, "mode", false, &mode, &r->err)) == -EINVAL ||
        (rc = wp_arg_bool(r->args, "force", &force, &r->err)) == -EINVAL)
        return rc;
    if (strcmp(mode, "offload") != 0 && strcmp(mode, "discard") != 0)
        return wd_error_set(&r->err, -EINVAL, "mode must be \"offload\" or \"discard\", not \"%s\"", mode);
    if (!(m = wd_registry_find(s, name)))
        return wd_error_set(&r->err, -ENOENT, "no model named \"%s\" is loaded", name);
    if (m->state == WD_MODEL_ASLEEP)
        return wd_error_set(&r->err, -EBUSY, "model \"%s\" is asleep already", name);
    if (m->state != WD_MODEL_READY)
        return wd_error_set(&r->err, -EBUSY, "model \"%s\" is %s", name, wd_model_state_name(m->state));
    if (m->busy)
        return wd_error_set(&r->err, -EBUSY, "model \"%s\" is being verified; sleep once that is done", name);
    if (s->backend->share == WA_SHARE_NONE)
        return wd_error_set(&r->err, -ENOTSUP, "the %s backend holds no memory to give back", s->backend->name);
    /* Holders that cannot keep their addresses, or cannot be asked. */
    for (wd_lease *l = m->leases; l; l = l->model_next)
        orphans |= !l->conn;
    if (m->leases && (ipc || orphans) && !force) {
        wd_leases_describe(m, holders, sizeof holders);
        return wd_error_set(&r->err, -EBUSY, "model \"%s\" is attached by %s, who cannot %s; detach them first, "
                            "or sleep --force", name, holders,
                            ipc ? "keep their addresses across a sleep on cuda-ipc"
                                : "be asked to unmap (their workers are not back since the restart)");
    }
    if (!(sl = wd_calloc(1, sizeof *sl)))
        return wd_error_set(&r->err, -ENOMEM, "out of memory");
    sl->mode = strcmp(mode, "discard") == 0 ? SLEEP_DISCARD : SLEEP_OFFLOAD;
    sl->req = r;
    sl->force = force;
    sl->t0 = wd_now();
    device_figures(s, m, &sl->reserved_before, &sl->free_before);
    m->sleep = sl;
    m->state = WD_MODEL_SLEEPING;
    if (force) {
        wd_leases_end_orphans(s, m, "a forced sleep (its worker is not back since the restart)");
        if (ipc) {
            wd_leases_revoke(s, m, "sleep");
            while (m->leases)
                wd_lease_end(s, m->leases, "a forced sleep (cuda-ipc mappings cannot keep their addresses)");
        }
    }
    if (!holders_pending(m)) {
        holders_done(s, m);
        return 0;
    }
    describe_pending(m, holders, sizeof holders);
    wd_log(WD_LOG_notice, "putting %s to sleep: asking %s to unmap (%lld s at most)", m->name, holders,
           (long long)s->conf->sleep_timeout);
    sl->deadline = wd_now() + (double)s->conf->sleep_timeout;
    for (wd_lease *l = m->leases; l; l = l->model_next) {
        cJSON *ev = cJSON_CreateObject();
        cJSON_AddStringToObject(ev, "event", "sleep");
        cJSON_AddNumberToObject(ev, "lease", (double)l->id);
        cJSON_AddStringToObject(ev, "name", m->name);
        wd_conn_event(l->conn, ev);
    }
    return 0;
}

/* {"lease"}: this connection's holder has unmapped the model for its sleep. */
int wd_op_slept(wd_server *s, wd_request *r)
{
    int64_t id;
    wd_lease *l;
    int rc;

    if ((rc = wp_arg_int(r->args, "lease", true, 1, INT64_MAX, &id, &r->err)))
        return rc;
    if (!(l = wd_lease_find(r->conn, (uint64_t)id)))
        return wd_error_set(&r->err, -ENOENT, "this connection holds no lease %lld", (long long)id);
    if (l->model->state != WD_MODEL_SLEEPING)
        return wd_error_set(&r->err, -EINVAL, "model \"%s\" is %s, not going to sleep", l->model->name,
                            wd_model_state_name(l->model->state));
    l->unmapped = true;
    wd_reply_ok(r, NULL);
    wd_sleep_released(s, l->model);
    return 0;
}

/* Sleeps whose holders did not all answer in time (the tick). */
void wd_sleep_tick(wd_server *s)
{
    double now = wd_now();

    for (wd_model *m = s->models; m; m = m->next) {
        wd_sleep *sl = m->sleep;
        char holders[512];
        wd_error err = {0};
        if (m->state != WD_MODEL_SLEEPING || !sl->deadline || now < sl->deadline)
            continue;
        sl->deadline = 0;
        describe_pending(m, holders, sizeof holders);
        if (!sl->force) {
            wd_error_set(&err, -ETIMEDOUT, "model \"%s\": %s did not unmap it within %lld s (sleep_timeout); it "
                         "stays awake (sleep --force would end their leases)", m->name, holders,
                         (long long)s->conf->sleep_timeout);
            sleep_undone(s, m, &err);
            continue;
        }
        /* Their mappings keep what they map alive until they unmap or
         * exit: those bytes come back only then. */
        wd_log(WD_LOG_warning, "sleep of %s: %s did not unmap it in time; their leases end (--force)", m->name,
               holders);
        for (wd_lease *l = m->leases, *next; l; l = next) {
            next = l->model_next;
            if (!l->unmapped)
                wd_lease_end(s, l, "it did not unmap its model for a forced sleep");
        }
        holders_done(s, m);
    }
}

/* ---- wake --------------------------------------------------------------------- */

static void woken(wd_server *s, wd_model *m, int rc, const wd_error *err)
{
    wd_sleep *sl = m->sleep;
    double seconds = wd_now() - sl->t0;
    char size[32], rate[32];

    if (rc) {
        wd_log(rc == -ECANCELED ? WD_LOG_info : WD_LOG_warning, "wake of %s failed: %s; it stays asleep", m->name,
               wd_error_text(err));
        reply_err(sl, err);
        m->state = WD_MODEL_ASLEEP;
        wd_model_released(s, m); /* an unload may wait */
        return;
    }
    m->state = WD_MODEL_READY;
    wd_log(WD_LOG_notice, "%s is awake (%s from %s in %.2f s, %s)", m->name,
           wd_size_format(m->device_bytes, size, sizeof size), mode_name(sl->mode), seconds,
           wd_rate_format(seconds > 0 ? (double)m->device_bytes / seconds : 0, rate, sizeof rate));
    if (sl->req) {
        cJSON *res = figures_json(s, m, seconds);
        cJSON_AddStringToObject(res, "from", mode_name(sl->mode));
        cJSON_DeleteItemFromObject(res, "sleeps_in");
        wd_reply_ok(sl->req, res);
    }
    sl->req = NULL;
    wd_sleep_free(s, m);
    wd_attach_prepare(s, m);
    wake_holders(s, m);
    wd_fdstore_sync(s);
}

/* A discarded model's checkpoint is read again only if it is what was
 * loaded: the same size, modification time and header for every shard. */
static int files_unchanged(wd_model *m, wd_error *err)
{
    for (size_t i = 0; i < m->ckpt.n_shards; i++) {
        const wl_shard *sh = &m->ckpt.shards[i];
        struct stat st;
        char *header = NULL;
        size_t len = 0;
        int rc;
        if (fstat(sh->fd, &st) < 0)
            return wd_error_set(err, -errno, "%s: %s", sh->path, strerror(errno));
        if ((uint64_t)st.st_size != sh->file_size || st.st_mtim.tv_sec != sh->mtime.tv_sec ||
            st.st_mtim.tv_nsec != sh->mtime.tv_nsec)
            return wd_error_set(err, -ESTALE, "%s changed since it was loaded (%s); unload the model and load it "
                                "again", sh->path, (uint64_t)st.st_size != sh->file_size ? "its size" : "modified");
        if ((rc = wl_shard_header(sh, &header, &len, err)))
            return rc;
        rc = len != m->sleep->header_lens[i] || memcmp(header, m->sleep->headers[i], len) != 0;
        free(header);
        if (rc)
            return wd_error_set(err, -ESTALE, "%s: its header changed since it was loaded; unload the model and "
                                "load it again", sh->path);
    }
    return 0;
}

/* {"name"} */
int wd_op_wake(wd_server *s, wd_request *r)
{
    const char *name;
    wd_model *m;
    wd_sleep *sl;
    int rc;

    if ((rc = wp_arg_string(r->args, "name", true, &name, &r->err)))
        return rc;
    if (!(m = wd_registry_find(s, name)))
        return wd_error_set(&r->err, -ENOENT, "no model named \"%s\" is loaded", name);
    if (m->state == WD_MODEL_READY)
        return wd_error_set(&r->err, -EINVAL, "model \"%s\" is awake", name);
    if (m->state != WD_MODEL_ASLEEP)
        return wd_error_set(&r->err, -EBUSY, "model \"%s\" is %s", name, wd_model_state_name(m->state));
    sl = m->sleep;
    if (sl->mode == SLEEP_DISCARD && (rc = files_unchanged(m, &r->err)))
        return rc;
    /* Waking from here: a refill that fails at once answers r itself. */
    sl->req = r;
    sl->t0 = wd_now();
    device_figures(s, m, &sl->reserved_before, &sl->free_before);
    m->state = WD_MODEL_WAKING;
    if ((rc = wd_refill_start(s, m, sl->mode == SLEEP_OFFLOAD ? &sl->copy.image : &m->ckpt, woken, &r->err))) {
        sl->req = NULL;
        m->state = WD_MODEL_ASLEEP;
    }
    return rc;
}

void wd_sleep_request_gone(wd_server *s, wd_request *r)
{
    for (wd_model *m = s->models; m; m = m->next)
        if (m->sleep && m->sleep->req == r)
            m->sleep->req = NULL; /* the sleep or wake goes on without it */
}
