/* Loads and verifies. File work runs on libuv's thread pool; everything that
 * touches the allocator or the registry runs on the loop thread, in the
 * after-work callbacks and, while a load reads, its allocation steps.
 *
 * A load: open the checkpoint (headers only, worker) -> push the load policy,
 * place every tensor and pack them into slabs (loop) -> read the bytes in
 * (worker) while the loop allocates the slabs, in order, a step at a time ->
 * mark the model ready and pop the policy (loop), then encode what attach
 * will send. Allocating beside the reads hides its cost (10
 * to 70 ms for 12.8 GB on an H200, 4 to 22 % of a warm load) and lets the
 * loop serve other clients between steps of a few milliseconds. Any failure or a cancel frees every
 * block the load took, gives cached segments back and pops the policy, so the
 * device's figures return to what they were before the load. */
#include "daemon/daemon.h"

#include <stdlib.h>
#include <string.h>

#include "common/checksum.h"
#include "common/fault.h"
#include "common/size.h"


/* One allocation step on the loop thread: 256 MiB of slabs or 2 ms,
 * whichever comes first (a slab is one allocation, so a step is at least
 * one). On an H200 256 MiB take 0.2 ms in steady state and 1.2 ms the
 * first time, far ahead of the readers (1.3 and 0.2 TB/s against 50 GB/s);
 * the time bound is for slower backends (the host backend on a small VM took
 * up to 0.5 s for 256 MiB). */
#define ALLOC_STEP_BYTES (256ull << 20)
#define ALLOC_STEP_SECONDS 0.002

/* Loads, sleeps (offloads) and wakes (refills) take the daemon's pipeline
 * in turn, in the order asked; verifies have pipelines of their own. */
typedef enum job_kind { JOB_LOAD, JOB_VERIFY, JOB_OFFLOAD, JOB_REFILL } job_kind;
typedef enum job_state { JOB_QUEUED, JOB_RUNNING } job_state;

struct wd_job {
    wd_server *srv;
    job_kind kind;
    job_state state;
    wd_request *req;          /* NULL once the client is gone */
    wd_model *model;
    wl_checkpoint ckpt;       /* load: opened by the worker, then moved into the model */
    char **files;             /* load: the files its client opened, and their descriptors (-1 once taken) */
    int *fds;
    size_t n_files;
    wl_job io;
    uv_work_t work;
    bool policy_pushed;
    int rc;
    wd_error err;
    int alloc_rc;             /* load: an allocation that failed while the reads ran */
    wd_error alloc_err;
    double t0;
    double t_opened, t_allocated; /* load: when the headers were read, the last tensor allocated */
    const wl_checkpoint *src; /* offload: the files written; refill: the files read */
    wl_checkpoint *pin;       /* offload: src, its shards pinned once written when pinning (sleep_pin) */
    bool pinning;
    size_t pinned, n_pin;     /* offload: shards pinned, of those to pin */
    uint64_t pinned_bytes;
    double pin_seconds;
    wd_error pin_err;
    size_t replaced, first_replaced; /* load: wl_checkpoint_replaced's, once read */
    uint64_t *sums;           /* refill: the checksums of what it read, to compare with the load's */
    wd_move_done done;        /* offload, refill: told on the loop how it ended */
    wd_job *prev, *next;
};

#define VERIFIES_RUNNING 1 /* at once: each holds a thread of the pool that loads need too */
#define JOBS_PAGE 200       /* jobs a stats reply lists */

static void job_link(wd_server *s, wd_job *j)
{
    j->prev = s->jobs_tail;
    j->next = NULL;
    if (s->jobs_tail)
        s->jobs_tail->next = j;
    else
        s->jobs = j;
    s->jobs_tail = j;
}

static void job_unlink(wd_server *s, wd_job *j)
{
    if (j->prev)
        j->prev->next = j->next;
    else
        s->jobs = j->next;
    if (j->next)
        j->next->prev = j->prev;
    else
        s->jobs_tail = j->prev;
    j->prev = j->next = NULL;
}

/* The job's request is answered, or its client gone: they part. */
static void job_detach_request(wd_job *j)
{
    if (j->req)
        j->req->job = NULL;
    j->req = NULL;
}

static void job_free(wd_server *s, wd_job *j)
{
    job_detach_request(j);
    job_unlink(s, j);
    wl_checkpoint_close(&j->ckpt);
    for (size_t i = 0; i < j->n_files; i++) {
        free(j->files[i]);
        if (j->fds && j->fds[i] >= 0)
            close(j->fds[i]);
    }
    free(j->files);
    free(j->fds);
    free(j);
}

static const char *kind_name(const wd_job *j)
{
    static const char *const names[] = {"load", "verify", "sleep", "wake"};
    return names[j->kind];
}

static const char *phase_name(const wd_job *j)
{
    if (j->kind == JOB_VERIFY)
        return "verifying";
    if (j->kind == JOB_OFFLOAD || j->kind == JOB_REFILL)
        return j->state == JOB_QUEUED ? "queued" : j->kind == JOB_OFFLOAD ? "offloading" : "refilling";
    if (j->state == JOB_QUEUED)
        return "queued";
    return j->io.ckpt ? "reading" : "opening";
}

static cJSON *progress_event(const wd_job *j)
{
    cJSON *ev = wp_event_new(j->req->id, "progress");
    /* Tensors on devices: a model on two devices has twice the work. */
    uint64_t total = j->model->device_bytes, tensors = j->model->n_dest;

    if (!ev)
        return NULL;
    cJSON_AddStringToObject(ev, "phase", phase_name(j));
    cJSON_AddNumberToObject(ev, "bytes_done", (double)atomic_load(&j->io.bytes_done));
    cJSON_AddNumberToObject(ev, "bytes_total", (double)total);
    cJSON_AddNumberToObject(ev, "tensors_done", (double)atomic_load(&j->io.tensors_done));
    cJSON_AddNumberToObject(ev, "tensors_total", (double)tensors);
    cJSON_AddNumberToObject(ev, "elapsed", wd_now() - j->t0);
    return ev;
}

/* A progress event, for a client that asked for them. Sent at every tick and
 * once more at the end, so that the client sees the end however short the
 * job was. */
static void send_progress(wd_job *j)
{
    if (j->req && j->req->want_events)
        wd_request_event(j->req, progress_event(j));
}

static void start_next_load(wd_server *s);

/* A job of the pipeline ended (freed): the next one may start. */
static void pipeline_next(wd_server *s)
{
    wd_systemd_status(s);
    start_next_load(s);
    wd_server_maybe_finish(s);
}

static wd_job *job_new(wd_server *s, job_kind kind, job_state state, wd_request *r, wd_error *err)
{
    wd_job *j = wd_calloc(1, sizeof *j);

    if (!j) {
        wd_error_set(err, -ENOMEM, "out of memory");
        return NULL;
    }
    j->srv = s;
    j->kind = kind;
    j->state = state;
    j->req = r;
    if (r)
        r->job = j;
    j->work.data = j;
    j->t0 = wd_now();
    return j;
}

/* A cancel that came after the worker's last look still ends the job. */
static void settle_cancel(wd_job *j)
{
    if (j->rc == 0 && atomic_load(&j->io.cancel))
        j->rc = wd_error_set(&j->err, -ECANCELED, "cancelled");
}

/* Runs j's reads on p (on a worker thread). */
static void run_io(wd_job *j, wl_pipeline *p)
{
    if ((j->rc = wl_job_run(p, &j->io)))
        j->err = j->io.err;
}

/* ---- load ------------------------------------------------------------------ */

static void finish_load(wd_job *j)
{
    wd_server *s = j->srv;
    wd_model *m = j->model;
    char size[32], rate[32], devs[128];

    settle_cancel(j);
    if (j->rc == 0) {
        m->state = WD_MODEL_READY;
        m->load_seconds = wd_now() - j->t0;
        m->loaded_at = wd_wall();
        if ((m->shards_replaced = j->replaced))
            wd_log(WD_LOG_warning, "%s: %zu of its shards (%s first) were replaced at their paths during the load; "
                   "it holds the files the load opened: load it again for the new ones", m->name, m->shards_replaced,
                   m->ckpt.shards[j->first_replaced].path);
        wd_log(WD_LOG_notice, "loaded %s: %zu tensors, %s in %.2f s (%s) on device %s (%s)", m->name,
               m->ckpt.n_tensors, wd_size_format(m->ckpt.total_bytes, size, sizeof size), m->load_seconds,
               wd_rate_format(m->load_seconds > 0 ? (double)m->ckpt.total_bytes / m->load_seconds : 0, rate, sizeof rate),
               wd_model_devices_text(m, devs, sizeof devs), wl_placement_name(m->placement));
        send_progress(j);
        if (j->req) {
            cJSON *res = cJSON_CreateObject(), *phases;
            cJSON_AddStringToObject(res, "name", m->name);
            cJSON_AddStringToObject(res, "path", m->path);
            cJSON_AddItemToObject(res, "devices", wd_model_devices_json(m));
            cJSON_AddStringToObject(res, "placement", wl_placement_name(m->placement));
            cJSON_AddNumberToObject(res, "device_bytes", (double)m->device_bytes);
            cJSON_AddNumberToObject(res, "tensors", (double)m->ckpt.n_tensors);
            cJSON_AddNumberToObject(res, "shards", (double)m->ckpt.n_shards);
            cJSON_AddNumberToObject(res, "bytes", (double)m->ckpt.total_bytes);
            cJSON_AddNumberToObject(res, "seconds", m->load_seconds);
            /* Where the time went: reading the headers, then reading and
             * copying the data, with allocating inside that. */
            phases = cJSON_AddObjectToObject(res, "phases");
            cJSON_AddNumberToObject(phases, "open", j->t_opened - j->t0);
            cJSON_AddNumberToObject(phases, "allocate", j->t_allocated - j->t_opened);
            cJSON_AddNumberToObject(phases, "read", j->t0 + m->load_seconds - j->t_opened);
            wd_reply_ok(j->req, res);
            j->req = NULL;
        }
        /* After the reply: the load's client need not wait for these. */
        wd_attach_prepare(s, m);
        wd_fdstore_sync(s);
    } else {
        wd_log(j->rc == -ECANCELED ? WD_LOG_info : WD_LOG_warning, "load of %s failed: %s%s", m->name,
               wd_error_text(&j->err), j->policy_pushed ? "; everything it took is freed" : "");
        /* Give back the segments the load made, so the devices look as before. */
        wd_registry_remove(s, m, j->policy_pushed);
        if (j->req)
            wd_reply_err(j->req, &j->err);
        j->req = NULL;
    }
    if (j->policy_pushed)
        wa_policy_pop(s->alloc);
    job_free(s, j);
    pipeline_next(s);
}

static void read_work(uv_work_t *w)
{
    wd_job *j = w->data;

    run_io(j, j->srv->pipeline);
    /* The paths are stat()ed with the daemon's rights, files a client
     * passed too: that tells an administrator no more than whether a path
     * it named still names the file it opened itself. Here, off the loop:
     * a stat may wait on a network file system. */
    if (j->kind == JOB_LOAD && j->rc == 0)
        j->replaced = wl_checkpoint_replaced(j->io.ckpt, &j->first_replaced);
}

/* A verify reads with a pipeline of its own, with plain buffers: it may run
 * while a load has the daemon's. */
static void verify_work(uv_work_t *w)
{
    wd_job *j = w->data;
    wl_pipeline_opts po = {.threads = 4, .staging = 64u << 20, .direct = WL_DIRECT_OFF, .plain = true};
    wl_pipeline *p;

    if ((j->rc = wl_pipeline_create(j->srv->backend, &po, &p, &j->err)))
        return;
    run_io(j, p);
    wl_pipeline_destroy(p);
}

/* The dests and slabs of the model (registry.c) under the load policy;
 * their memory comes later (allocate_step). */
static int place_tensors(wd_server *s, wd_job *j)
{
    int rc;

    if ((rc = wa_policy_push(s->alloc, s->load_policy, &j->err)))
        return rc;
    j->policy_pushed = true;
    return wd_model_place(j->model, s->conf->slab_size, s->conf->checksums, &j->err);
}

/* Allocates the next slabs, in order, until `bytes` are given or `seconds`
 * have passed (at least one), and tells the readers which dests have their
 * memory now. */
static int allocate_step(wd_server *s, wd_job *j, uint64_t bytes, double seconds, wd_error *err)
{
    wd_model *m = j->model;
    double until = wd_now() + seconds;
    uint64_t done = 0;
    int rc = 0;

    while (m->slabs_allocated < m->n_slabs && (done == 0 || (done < bytes && wd_now() < until))) {
        done += m->slabs[m->slabs_allocated].bytes;
        if ((rc = wd_model_allocate_slab(s, m, err)))
            break;
    }
    atomic_store_explicit(&j->io.dests_ready, m->slabs_allocated == m->n_slabs ? m->n_dest : m->dests_ready,
                          memory_order_release);
    if (!rc && m->slabs_allocated == m->n_slabs)
        j->t_allocated = wd_now();
    return rc;
}

static void allocation_done(wd_server *s)
{
    uv_idle_stop(&s->alloc_idle);
    s->allocating = NULL;
}

/* The loop's idle turns: the running load's next allocation step. A failure
 * cancels the reads; after_read reports it. */
static void on_alloc_idle(uv_idle_t *h)
{
    wd_server *s = h->data;
    wd_job *j = s->allocating;

    if (atomic_load(&j->io.cancel)) {
        allocation_done(s);
        return;
    }
    if ((j->alloc_rc = allocate_step(s, j, ALLOC_STEP_BYTES, ALLOC_STEP_SECONDS, &j->alloc_err)))
        atomic_store(&j->io.cancel, true);
    if (j->alloc_rc || j->model->slabs_allocated == j->model->n_slabs)
        allocation_done(s);
}

static void finish_refill(wd_job *j);

static void after_read(uv_work_t *w, int status)
{
    wd_job *j = w->data;
    wd_server *s = j->srv;
    (void)status;

    s->jobs_running--;
    if (s->allocating == j)
        allocation_done(s);
    if (j->alloc_rc) {
        j->rc = j->alloc_rc;
        j->err = j->alloc_err;
    }
    if (j->kind == JOB_REFILL)
        finish_refill(j);
    else
        finish_load(j);
}

static void open_work(uv_work_t *w)
{
    wd_job *j = w->data;

    if (j->n_files)
        j->rc = wl_checkpoint_open_files(j->model->path, j->files, j->fds, j->n_files, &j->ckpt, &j->err);
    else
        j->rc = wl_checkpoint_open(j->model->path, &j->ckpt, &j->err);
}

static void after_open(uv_work_t *w, int status)
{
    wd_job *j = w->data;
    wd_server *s = j->srv;
    (void)status;

    s->jobs_running--;
    settle_cancel(j);
    if (j->rc) {
        finish_load(j);
        return;
    }
    j->t_opened = wd_now();
    j->model->ckpt = j->ckpt;
    memset(&j->ckpt, 0, sizeof j->ckpt);
    /* The first step before the readers start, so that they find work. */
    if ((j->rc = place_tensors(s, j)) ||
        (j->rc = allocate_step(s, j, ALLOC_STEP_BYTES, ALLOC_STEP_SECONDS, &j->err))) {
        finish_load(j);
        return;
    }
    j->io.mode = WL_LOAD;
    j->io.sums = j->model->sums;
    j->io.ckpt = &j->model->ckpt;
    j->io.dest = j->model->dest;
    j->io.n_dest = j->model->n_dest;
    s->jobs_running++;
    uv_queue_work(s->loop, &j->work, read_work, after_read);
    if (j->model->slabs_allocated < j->model->n_slabs) {
        s->allocating = j;
        uv_idle_start(&s->alloc_idle, on_alloc_idle);
    }
}

static void start_offload(wd_server *s, wd_job *j);
static void start_refill(wd_server *s, wd_job *j);

static void start_next_load(wd_server *s)
{
    wd_job *next = NULL;

    for (wd_job *j = s->jobs; j; j = j->next) {
        if (j->kind == JOB_VERIFY)
            continue;
        if (j->state == JOB_RUNNING)
            return;
        if (!next)
            next = j;
    }
    if (!next || s->stopping)
        return;
    next->state = JOB_RUNNING;
    next->t0 = wd_now();
    if (next->kind == JOB_OFFLOAD) {
        start_offload(s, next);
        return;
    }
    if (next->kind == JOB_REFILL) {
        start_refill(s, next);
        return;
    }
    {
        char devs[128];
        wd_log(WD_LOG_info, "loading %s from %s onto device %s", next->model->name, next->model->path,
               wd_model_devices_text(next->model, devs, sizeof devs));
    }
    s->jobs_running++;
    uv_queue_work(s->loop, &next->work, open_work, after_open);
    wd_systemd_status(s);
}

int wd_load_start(wd_server *s, wd_request *r, const char *path, const char *name, const int *devices,
                  size_t n_devices, wl_placement placement, char *const *files, size_t n_files, wd_error *err)
{
    wd_job *j;
    int rc;

    if (s->stopping)
        return wd_error_set(err, -ECANCELED, "weightd is stopping");
    if (!(j = job_new(s, JOB_LOAD, JOB_QUEUED, r, err)))
        return -ENOMEM;
    if ((rc = wd_registry_add(s, name, path, devices, n_devices, placement, &j->model, err))) {
        job_detach_request(j);
        free(j);
        return rc;
    }
    /* The request's descriptors go with the job. */
    if (n_files) {
        if (!(j->files = wd_calloc(n_files, sizeof *j->files))) {
            wd_registry_remove(s, j->model, false);
            job_detach_request(j);
            free(j);
            return wd_error_set(err, -ENOMEM, "out of memory");
        }
        j->n_files = n_files;
        for (size_t i = 0; i < n_files; i++)
            j->files[i] = wd_strdup(files[i]);
        j->fds = r->fds;
        r->fds = NULL;
        r->n_fds = 0;
        for (size_t i = 0; i < n_files; i++)
            if (!j->files[i]) {
                wd_model *m = j->model;
                job_link(s, j);
                job_free(s, j);
                wd_registry_remove(s, m, false);
                return wd_error_set(err, -ENOMEM, "out of memory");
            }
    }
    job_link(s, j);
    start_next_load(s);
    return 0;
}

/* ---- sleep and wake: a model's bytes moved off its devices and back ------- */

static void end_move(wd_job *j)
{
    wd_server *s = j->srv;
    wd_model *m = j->model;
    wd_move_done done = j->done;
    int rc = j->rc;
    wd_error err = j->err;

    free(j->sums);
    job_free(s, j);
    done(s, m, rc, &err);
    pipeline_next(s);
}

/* Copies the devices into the host copy; then, with sleep_pin, pins it,
 * shard by shard, where the backend stages its copies: a wake then copies
 * it straight to the devices (through the staging buffers it ran at 86 %
 * of the copy rate on the H200). The pinning takes its time here, on the
 * pool's thread. Off by default until measured against staging. */
static void offload_work(uv_work_t *w)
{
    wd_job *j = w->data;
    wa_backend *b = j->srv->backend;

    double t0;

    run_io(j, j->srv->pipeline);
    if (j->rc || !j->pinning || !b->host_register)
        return;
    t0 = wd_now();
    for (size_t i = 0; i < j->pin->n_shards; i++) {
        wl_shard *sh = &j->pin->shards[i];
        if (!sh->host)
            continue;
        j->n_pin++;
        if (j->pin_err.code || b->host_register(b, sh->host, sh->file_size, &j->pin_err))
            continue;
        sh->host_pinned = true;
        j->pinned++;
        j->pinned_bytes += sh->file_size;
    }
    j->pin_seconds = wd_now() - t0;
}

static void after_offload(uv_work_t *w, int status)
{
    wd_job *j = w->data;
    (void)status;

    j->srv->jobs_running--;
    settle_cancel(j);
    if (j->pin_err.code)
        wd_log(WD_LOG_info, "%s: %zu of %zu shards of its host copy pinned (then: %s): a wake copies the others "
               "through the staging buffers", j->model->name, j->pinned, j->n_pin, wd_error_text(&j->pin_err));
    else if (j->pinned) {
        char size[32];
        wd_log(WD_LOG_info, "%s: its host copy pinned (%s in %.2f s): a wake copies straight from it",
               j->model->name, wd_size_format(j->pinned_bytes, size, sizeof size), j->pin_seconds);
    }
    end_move(j);
}

static void start_offload(wd_server *s, wd_job *j)
{
    wd_model *m = j->model;

    j->io.mode = WL_OFFLOAD;
    j->io.ckpt = j->src;
    j->pinning = s->conf->sleep_pin; /* (read here, on the loop, where a reload sets it) */
    j->io.dest = m->dest;
    j->io.n_dest = m->n_dest;
    atomic_store(&j->io.dests_ready, m->n_dest);
    s->jobs_running++;
    uv_queue_work(s->loop, &j->work, offload_work, after_offload);
}

/* Under the load policy, as a load: the slabs again (the same plan, so the
 * same sizes in the same order), allocated beside the reads. */
static void start_refill(wd_server *s, wd_job *j)
{
    wd_model *m = j->model;

    if ((j->rc = wa_policy_push(s->alloc, s->load_policy, &j->err)))
        goto fail;
    j->policy_pushed = true;
    wd_model_free_memory(s, m);
    if ((j->rc = allocate_step(s, j, ALLOC_STEP_BYTES, ALLOC_STEP_SECONDS, &j->err)))
        goto fail;
    if (m->sums && !(j->sums = wd_calloc(m->ckpt.n_tensors ? m->ckpt.n_tensors : 1, sizeof *j->sums))) {
        j->rc = wd_error_set(&j->err, -ENOMEM, "out of host memory");
        goto fail;
    }
    j->io.mode = WL_LOAD;
    j->io.sums = j->sums;
    j->io.ckpt = j->src;
    j->io.dest = m->dest;
    j->io.n_dest = m->n_dest;
    s->jobs_running++;
    uv_queue_work(s->loop, &j->work, read_work, after_read);
    if (m->slabs_allocated < m->n_slabs) {
        s->allocating = j;
        uv_idle_start(&s->alloc_idle, on_alloc_idle);
    }
    return;
fail:
    finish_refill(j);
}

static void finish_refill(wd_job *j)
{
    wd_server *s = j->srv;
    wd_model *m = j->model;

    settle_cancel(j);
    /* What came back is what was loaded, tensor by tensor. */
    for (size_t t = 0; j->rc == 0 && j->sums && t < m->ckpt.n_tensors; t++)
        if (j->sums[t] != m->sums[t]) {
            char have[17], want[17];
            j->rc = wd_error_set(&j->err, -EIO, "tensor \"%s\" came back with checksum %s, loaded with %s",
                                 m->ckpt.tensors[t].st->name, wd_sum_format(j->sums[t], have),
                                 wd_sum_format(m->sums[t], want));
        }
    if (j->rc)
        wd_model_free_memory(s, m);
    if (j->policy_pushed)
        wa_policy_pop(s->alloc);
    j->policy_pushed = false;
    end_move(j);
}

static int move_start(wd_server *s, job_kind kind, wd_model *m, const wl_checkpoint *src, wl_checkpoint *pin,
                      wd_move_done done, wd_error *err)
{
    wd_job *j;

    if (s->stopping)
        return wd_error_set(err, -ECANCELED, "weightd is stopping");
    if (!(j = job_new(s, kind, JOB_QUEUED, NULL, err)))
        return -ENOMEM;
    j->model = m;
    j->src = src;
    j->pin = pin;
    j->done = done;
    job_link(s, j);
    start_next_load(s);
    return 0;
}

int wd_offload_start(wd_server *s, wd_model *m, wl_checkpoint *image, wd_move_done done, wd_error *err)
{
    return move_start(s, JOB_OFFLOAD, m, image, image, done, err);
}

int wd_refill_start(wd_server *s, wd_model *m, const wl_checkpoint *src, wd_move_done done, wd_error *err)
{
    return move_start(s, JOB_REFILL, m, src, NULL, done, err);
}

/* ---- verify ---------------------------------------------------------------- */

static void start_next_verify(wd_server *s);

static void after_verify(uv_work_t *w, int status)
{
    wd_job *j = w->data;
    wd_server *s = j->srv;
    wd_model *m = j->model;
    double seconds = wd_now() - j->t0;
    (void)status;

    s->jobs_running--;
    settle_cancel(j);
    if (j->rc) {
        wd_log_peer(j->rc == -ECANCELED ? WD_LOG_info : WD_LOG_warning, "verify of %s failed: %s", m->name,
               wd_error_text(&j->err));
        if (j->req)
            wd_reply_err(j->req, &j->err);
    } else {
        wd_log(j->io.mismatched_tensors ? WD_LOG_warning : WD_LOG_info, "verified %s: %llu of %zu tensors differ%s%s",
               m->name, (unsigned long long)j->io.mismatched_tensors, m->ckpt.n_tensors,
               j->io.mismatched_tensors ? "; " : "", j->io.first_mismatch);
        send_progress(j);
        if (j->req) {
            cJSON *res = cJSON_CreateObject();
            cJSON_AddStringToObject(res, "name", m->name);
            cJSON_AddBoolToObject(res, "quick", j->io.mode == WL_QUICK);
            cJSON_AddBoolToObject(res, "match", j->io.mismatched_tensors == 0);
            cJSON_AddNumberToObject(res, "tensors", (double)m->ckpt.n_tensors);
            cJSON_AddNumberToObject(res, "bytes", (double)atomic_load(&j->io.bytes_done));
            cJSON_AddNumberToObject(res, "mismatched_tensors", (double)j->io.mismatched_tensors);
            if (j->io.mismatched_tensors)
                cJSON_AddStringToObject(res, "first_mismatch", j->io.first_mismatch);
            cJSON_AddNumberToObject(res, "seconds", seconds);
            cJSON_AddNumberToObject(res, "rate", seconds > 0 ? (double)atomic_load(&j->io.bytes_done) / seconds : 0);
            wd_reply_ok(j->req, res);
        }
    }
    j->req = NULL;
    job_free(s, j);
    m->busy--;
    wd_model_released(s, m); /* an unload may wait for it */
    start_next_verify(s);
    wd_server_maybe_finish(s);
}

static void start_next_verify(wd_server *s)
{
    wd_job *next = NULL;
    unsigned running = 0;

    for (wd_job *j = s->jobs; j; j = j->next) {
        if (j->kind != JOB_VERIFY)
            continue;
        if (j->state == JOB_RUNNING)
            running++;
        else if (!next)
            next = j;
    }
    if (!next || running >= VERIFIES_RUNNING || s->stopping)
        return;
    next->state = JOB_RUNNING;
    next->t0 = wd_now();
    s->jobs_running++;
    uv_queue_work(s->loop, &next->work, verify_work, after_verify);
}

int wd_verify_start(wd_server *s, wd_request *r, wd_model *m, bool quick, wd_error *err)
{
    wd_job *j;

    if (s->stopping)
        return wd_error_set(err, -ECANCELED, "weightd is stopping");
    if (quick && !m->sums)
        return wd_error_set(err, -EINVAL, "model \"%s\" was loaded without checksums (--checksums off): verify "
                            "it against its files instead", m->name);
    if (!(j = job_new(s, JOB_VERIFY, JOB_QUEUED, r, err)))
        return -ENOMEM;
    j->model = m;
    j->io.mode = quick ? WL_QUICK : WL_VERIFY;
    j->io.sums = quick ? m->sums : NULL;
    j->io.ckpt = &m->ckpt;
    j->io.dest = m->dest;
    j->io.n_dest = m->n_dest;
    atomic_store(&j->io.dests_ready, m->n_dest);
    m->busy++;
    job_link(s, j);
    start_next_verify(s);
    return 0;
}

/* ---- cancellation and progress -------------------------------------------- */

static void cancel_job(wd_server *s, wd_job *j, const char *why)
{
    if (j->state == JOB_QUEUED) {
        /* Nothing was taken yet: drop it here. */
        wd_model *m = j->model;
        wd_log_peer(WD_LOG_info, "%s of %s cancelled before it started", kind_name(j), m->name);
        if (j->kind == JOB_OFFLOAD || j->kind == JOB_REFILL) {
            j->rc = wd_error_set(&j->err, -ECANCELED, "cancelled before it started: %s", why);
            end_move(j);
            return;
        }
        if (j->req)
            wd_reply_error(j->req, -ECANCELED, "cancelled before it started: %s", why);
        j->req = NULL;
        if (j->kind == JOB_LOAD) {
            job_free(s, j);
            wd_registry_remove(s, m, false);
        } else {
            job_free(s, j);
            m->busy--;
            wd_model_released(s, m);
        }
        return;
    }
    atomic_store(&j->io.cancel, true);
}

void wd_jobs_request_gone(wd_server *s, wd_request *r)
{
    wd_job *j = r->job;

    if (!j)
        return;
    /* The caller frees r; the job ends without a reply. */
    job_detach_request(j);
    wd_log_peer(WD_LOG_info, "client gone: cancelling the %s of %s", kind_name(j), j->model->name);
    cancel_job(s, j, "its client went away");
}

void wd_jobs_cancel_all(wd_server *s)
{
    for (wd_job *j = s->jobs, *next; j; j = next) {
        next = j->next;
        cancel_job(s, j, "weightd is stopping");
    }
}

void wd_jobs_cancel_verifies(wd_server *s, wd_model *m, const char *why)
{
    for (wd_job *j = s->jobs, *next; j; j = next) {
        next = j->next;
        if (j->kind == JOB_VERIFY && j->model == m)
            cancel_job(s, j, why);
    }
}

/* Every job that asked for events, queued ones too: a client that waits
 * with a timeout then hears from the daemon while its load waits its turn. */
void wd_jobs_progress(wd_server *s)
{
    for (wd_job *j = s->jobs; j; j = j->next)
        send_progress(j);
}

bool wd_jobs_load_active(const wd_server *s)
{
    for (const wd_job *j = s->jobs; j; j = j->next)
        if ((j->kind == JOB_LOAD || j->kind == JOB_REFILL) && j->state == JOB_RUNNING)
            return true;
    return false;
}

void wd_jobs_describe(const wd_server *s, cJSON *out, size_t offset)
{
    cJSON *arr = cJSON_AddArrayToObject(out, "jobs");
    size_t i = 0, total = 0;

    for (const wd_job *j = s->jobs; j; j = j->next, i++) {
        total++;
        if (i < offset || i >= offset + JOBS_PAGE)
            continue;
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "kind", kind_name(j));
        cJSON_AddStringToObject(o, "model", j->model->name);
        cJSON_AddStringToObject(o, "phase", phase_name(j));
        cJSON_AddNumberToObject(o, "bytes_done", (double)atomic_load(&j->io.bytes_done));
        cJSON_AddNumberToObject(o, "bytes_total", (double)j->model->device_bytes);
        cJSON_AddItemToArray(arr, o);
    }
    cJSON_AddNumberToObject(out, "jobs_total", (double)total);
    if (total > offset + JOBS_PAGE)
        cJSON_AddNumberToObject(out, "jobs_next", (double)(offset + JOBS_PAGE));
    else
        cJSON_AddNullToObject(out, "jobs_next");
}
