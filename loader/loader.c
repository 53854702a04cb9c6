/* The read pipeline (loader.h says what it is). */
#include "loader/loader.h"

#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "common/checksum.h"
#include "common/fault.h"
#include "common/grow.h"

#define ALIGN 4096u
#define MAX_THREADS 256
#define MIN_CHUNK (1u << 20)
#define MAX_CHUNK (64u << 20)
/* Staging buffers small enough to stay in the CPU's last-level cache: the
 * CPU writes them there and the GPU reads them from there, and neither goes
 * to DRAM. On the H200 machine (16 CPUs, 300 MiB of L3), readers with two
 * 4 MiB buffers each loaded warm at 47-50 GB/s, with 16 MiB buffers at 34-39;
 * a plain parallel read ran at 83-96 GB/s with 2 MiB pieces and 45 with 16 MiB
 * ones, and 4 MiB copies run near the bus's speed. */
#define DEFAULT_CHUNK (4u << 20)
#define DEFAULT_MAX_THREADS 12
/* How far ahead of a read that waits for the disk the kernel is asked to
 * read: enough requests in flight to keep a disk busy, whatever the number
 * of readers. On the GPU machine's disk, 64 and 128 MiB did as well (its
 * speed varies by 10 % from run to run) and 1 GiB worse. */
#define READAHEAD (256u << 20)

static uint64_t align_down(uint64_t v) { return v & ~(uint64_t)(ALIGN - 1); }
static uint64_t align_up(uint64_t v) { return (v + ALIGN - 1) & ~(uint64_t)(ALIGN - 1); }

/* A run of one dest's bytes inside a chunk. */
typedef struct piece {
    uint32_t dest;
    uint64_t at;         /* offset in the chunk's buffer */
    uint64_t dest_off;   /* offset within the dest */
    uint64_t len;
} piece;

/* A range of one shard's file, read with one pread. */
typedef struct chunk {
    uint32_t shard;
    uint64_t read_off;   /* aligned down */
    uint64_t read_len;   /* up to the chunk's end */
    size_t first, n;     /* its pieces */
    bool shard_start;    /* the shard's first chunk */
} chunk;

typedef struct worker {
    wl_pipeline *p;
    unsigned index;
    void *buf[2];        /* staging: pinned for device backends */
    void *cmp;           /* verify: what the device holds */
    wd_summer *sum;      /* load: the checksum block being hashed */
    uint64_t busy_devices[2]; /* devices with copies in flight from buf[k] */
    pthread_t thread;
} worker;

struct wl_pipeline {
    wa_backend *backend;
    unsigned threads;
    uint64_t chunk;      /* bytes read at once, and each staging buffer's size: a multiple of ALIGN, so an
                          * O_DIRECT read of a chunk, aligned at both ends, fits its buffer */
    wl_direct direct;
    bool pinned, stage_host;
    worker *workers;
    /* the job in progress */
    wl_job *job;
    chunk *chunks;
    piece *pieces;
    size_t n_chunks;
    int *fd, *fd_direct; /* per shard */
    unsigned char *mismatched; /* verify: per tensor, already counted */
    uint64_t *blocks;    /* load with checksums: every tensor's block hashes, ... */
    size_t *block_base;  /* ... tensor t's from block_base[t] */
    size_t *tensor_dests; /* quick: tensor t's dests from tensor_dests[t] */
    _Atomic size_t next;
    pthread_mutex_t err_lock;
};

/* ---- life cycle ------------------------------------------------------------ */

static void *buffer_alloc(wl_pipeline *p, size_t size, wd_error *err)
{
    void *b = NULL;

    if (p->pinned) {
        if (p->backend->pinned_alloc(p->backend, size, &b, err))
            return NULL;
    } else if (posix_memalign(&b, ALIGN, size)) {
        wd_error_set(err, -ENOMEM, "out of host memory for a %zu-byte read buffer", size);
        return NULL;
    }
    return b;
}

static void buffer_free(wl_pipeline *p, void *b, size_t size)
{
    if (!b)
        return;
    if (p->pinned)
        p->backend->pinned_free(p->backend, b, size);
    else
        free(b);
}

void wl_pipeline_destroy(wl_pipeline *p)
{
    if (!p)
        return;
    for (unsigned i = 0; p->workers && i < p->threads; i++) {
        for (int k = 0; k < 2; k++)
            buffer_free(p, p->workers[i].buf[k], p->chunk);
        free(p->workers[i].cmp);
        wd_summer_free(p->workers[i].sum);
    }
    free(p->workers);
    pthread_mutex_destroy(&p->err_lock);
    free(p);
}

int wl_pipeline_create(wa_backend *backend, const wl_pipeline_opts *opts, wl_pipeline **out, wd_error *err)
{
    wl_pipeline *p = wd_calloc(1, sizeof *p);
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int rc = 0;

    if (!p)
        return wd_error_set(err, -ENOMEM, "out of host memory");
    pthread_mutex_init(&p->err_lock, NULL);
    p->backend = backend;
    p->direct = opts->direct;
    p->stage_host = opts->stage_host;
    /* Three threads for every four CPUs, leaving some to the loop (which
     * allocates beside the reads) and the driver, and at least two, so that
     * one reads while another waits: with 4 MiB buffers on the GPU machine
     * (16 CPUs), 12 readers loaded warm at 47.9-49.4 GB/s, 16 at 46.5-49.3
     * and 32 at 39.4-42.0. */
    if (!(p->threads = opts->threads)) {
        long n = cpus * 3 / 4;
        p->threads = (unsigned)(n < 2 ? 2 : n > DEFAULT_MAX_THREADS ? DEFAULT_MAX_THREADS : n);
    }
    if (p->threads > MAX_THREADS)
        p->threads = MAX_THREADS;
    p->pinned = !opts->plain && backend->pinned_alloc && backend->copy_async;
    /* Two staging buffers a thread, within the staging budget. */
    p->chunk = opts->staging ? align_down(opts->staging / (2ULL * p->threads)) : DEFAULT_CHUNK;
    if (p->chunk < MIN_CHUNK)
        p->chunk = MIN_CHUNK;
    if (p->chunk > MAX_CHUNK)
        p->chunk = MAX_CHUNK;
    if (!(p->workers = wd_calloc(p->threads, sizeof *p->workers))) {
        rc = wd_error_set(err, -ENOMEM, "out of host memory");
        goto fail;
    }
    for (unsigned i = 0; i < p->threads; i++) {
        worker *w = &p->workers[i];
        w->p = p;
        w->index = i;
        /* Pinned staging is taken now, so that no load pays for it; plain
         * buffers (verify on the host backend) when first needed. */
        for (int k = 0; k < 2 && p->pinned; k++)
            if (!(w->buf[k] = buffer_alloc(p, p->chunk, err))) {
                rc = err->code ? err->code : -ENOMEM;
                goto fail;
            }
    }
    /* Every lane's stream now, not at some later load: what a load takes from
     * the device is then the same every time. */
    for (int d = 0; p->pinned && d < backend->n_devices; d++)
        for (unsigned lane = 0; lane < 2 * p->threads; lane++)
            if ((rc = backend->copy_wait(backend, d, lane, err)))
                goto fail;
    *out = p;
    return 0;
fail:
    wl_pipeline_destroy(p);
    return rc;
}

unsigned wl_pipeline_threads(const wl_pipeline *p) { return p->threads; }
uint64_t wl_pipeline_chunk(const wl_pipeline *p) { return p->chunk; }

/* ---- planning: chunks and their pieces -------------------------------------- */

static int add_piece(wl_pipeline *p, size_t *n, size_t *cap, piece pc)
{
    if (WD_GROW(p->pieces, *cap, *n + 1, 256))
        return -ENOMEM;
    p->pieces[(*n)++] = pc;
    return 0;
}

/* Cuts the data into chunks and each chunk into pieces: the parts of the
 * dests that the chunk's bytes feed. */
static int plan(wl_pipeline *p, const wl_job *job, wd_error *err)
{
    const wl_checkpoint *ck = job->ckpt;
    size_t cap_chunks = 0, cap_pieces = 0, n_pieces = 0, t = 0, d0 = 0;

    p->n_chunks = 0;
    p->chunks = NULL;
    p->pieces = NULL;
    for (uint32_t s = 0; s < ck->n_shards; s++) {
        const st_file *st = &ck->shards[s].st;
        uint64_t start = st->data_offset, end = st->data_offset + st->data_len;
        /* ck->tensors lists shard by shard, each in data order: t walks along,
         * and d0 with it, at the tensor's first dest. */
        while (start < end) {
            uint64_t cend = align_down(start) + p->chunk;
            chunk *c;
            if (cend > end)
                cend = end;
            /* A tensor that goes on past the chunk is cut at a checksum
             * block's boundary, so that each block is hashed whole by one
             * reader (chunks are at least a block and a page: each cut
             * moves on). */
            for (size_t x = t; x < ck->n_tensors && ck->tensors[x].shard == s; x++) {
                uint64_t tb = st->data_offset + ck->tensors[x].st->begin, te = st->data_offset + ck->tensors[x].st->end;
                if (te <= cend)
                    continue;
                if (tb < cend)
                    cend = tb + (cend - tb) / WD_SUM_BLOCK * WD_SUM_BLOCK;
                break;
            }
            if (WD_GROW(p->chunks, cap_chunks, p->n_chunks + 1, 64))
                goto nomem;
            c = &p->chunks[p->n_chunks++];
            c->shard = s;
            c->shard_start = start == st->data_offset;
            c->read_off = align_down(start);
            c->read_len = cend - c->read_off;
            c->first = n_pieces;
            c->n = 0;
            while (t < ck->n_tensors && ck->tensors[t].shard == s) {
                const st_tensor *x = ck->tensors[t].st;
                uint64_t tb = st->data_offset + x->begin, te = st->data_offset + x->end;
                uint64_t a = tb > start ? tb : start, b = te < cend ? te : cend;
                while (d0 < job->n_dest && job->dest[d0].tensor < t)
                    d0++;
                for (size_t di = d0; a < b && di < job->n_dest && job->dest[di].tensor == t; di++) {
                    /* The overlap of [a, b) with this dest, in tensor offsets. */
                    const wl_dest *dd = &job->dest[di];
                    uint64_t lo = a - tb, hi = b - tb;
                    if (dd->tensor_off > lo)
                        lo = dd->tensor_off;
                    if (dd->tensor_off + dd->len < hi)
                        hi = dd->tensor_off + dd->len;
                    if (lo < hi) {
                        if (add_piece(p, &n_pieces, &cap_pieces,
                                      (piece){(uint32_t)di, tb + lo - c->read_off, lo - dd->tensor_off, hi - lo}))
                            goto nomem;
                        c->n++;
                    }
                }
                if (te > cend)
                    break; /* the tensor goes on in the next chunk */
                t++;
            }
            start = cend;
        }
        while (t < ck->n_tensors && ck->tensors[t].shard == s)
            t++; /* empty tensors at the very end */
    }
    return 0;
nomem:
    return wd_error_set(err, -ENOMEM, "out of host memory planning the reads");
}

/* ---- the workers ------------------------------------------------------------ */

static void fail_job(wl_pipeline *p, int rc, const wd_error *e)
{
    pthread_mutex_lock(&p->err_lock);
    if (!p->job->err.code)
        p->job->err = *e;
    if (!p->job->err.code)
        p->job->err.code = rc;
    pthread_mutex_unlock(&p->err_lock);
    atomic_store(&p->job->cancel, true);
}

static int read_full(int fd, void *buf, size_t len, uint64_t off, const char *path, bool allow_short,
                     wd_error *err)
{
    size_t got = 0;

    while (got < len) {
        /* (test builds: an injected error, or a read of half what was asked) */
        size_t ask = wd_fault(WD_FAULT_short_read) ? (len - got + 1) / 2 : len - got;
        ssize_t n = wd_fault(WD_FAULT_read) ? (errno = EIO, -1) : pread(fd, (char *)buf + got, ask, (off_t)(off + got));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return wd_error_set(err, -errno, "%s: read at byte %llu: %s", path, (unsigned long long)(off + got),
                                strerror(errno));
        if (n == 0) {
            if (allow_short)
                return 0;
            return wd_error_set(err, -EIO, "%s: file ends at byte %llu, before the data its header describes", path,
                                (unsigned long long)(off + got));
        }
        got += (size_t)n;
    }
    return 0;
}

static int pwrite_full(int fd, const void *buf, uint64_t len, uint64_t off, const char *path, wd_error *err)
{
    for (uint64_t done = 0; done < len;) {
        ssize_t n = pwrite(fd, (const char *)buf + done, len - done, (off_t)(off + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return wd_error_set(err, n < 0 ? -errno : -EIO, "%s: write at byte %llu: %s", path,
                                (unsigned long long)(off + done), n < 0 ? strerror(errno) : "nothing written");
        done += (uint64_t)n;
    }
    return 0;
}

/* Through the page cache. A read that would wait for the disk (RWF_NOWAIT
 * says so) first asks the kernel for the chunk READAHEAD bytes on, and the
 * shard's first chunk for all of the READAHEAD bytes after it: a cold load
 * then keeps the disk busy with large requests (4 MiB reads from 12 readers
 * alone ran at 90 % of the disk's speed), while a warm one, whose reads never
 * wait, pays nothing for it. */
static int read_cached(wl_pipeline *p, const chunk *c, void *buf, wd_error *err)
{
    int fd = p->fd[c->shard];
    struct iovec iov = {buf, c->read_len};
    /* with faults armed, every read goes through read_full, where they are */
    ssize_t n = wd_fault_armed() ? 0 : preadv2(fd, &iov, 1, (off_t)c->read_off, RWF_NOWAIT);

    if (n == (ssize_t)c->read_len)
        return 0;
    if (n < 0)
        n = 0; /* EAGAIN, or RWF_NOWAIT not supported: read_full reads it all */
    if (c->shard_start)
        posix_fadvise(fd, (off_t)(c->read_off + c->read_len), READAHEAD, POSIX_FADV_WILLNEED);
    else
        posix_fadvise(fd, (off_t)(c->read_off + READAHEAD), (off_t)c->read_len, POSIX_FADV_WILLNEED);
    return read_full(fd, (char *)buf + n, c->read_len - (size_t)n, c->read_off + (uint64_t)n,
                     p->job->ckpt->shards[c->shard].path, false, err);
}

/* Bytes [off, off + len) of shard s into dst: from its mapping if it has
 * one, else read. */
static int read_at(wl_pipeline *p, uint32_t s, void *dst, uint64_t len, uint64_t off, wd_error *err)
{
    const wl_shard *sh = &p->job->ckpt->shards[s];

    if (sh->host) {
        memcpy(dst, (const char *)sh->host + off, len);
        return 0;
    }
    return read_full(p->fd[s], dst, len, off, sh->path, false, err);
}

/* ... and written there from src. */
static int write_at(wl_pipeline *p, uint32_t s, const void *src, uint64_t len, uint64_t off, wd_error *err)
{
    const wl_shard *sh = &p->job->ckpt->shards[s];

    if (sh->host) {
        memcpy((char *)sh->host + off, src, len);
        return 0;
    }
    return pwrite_full(p->fd[s], src, len, off, sh->path, err);
}

/* Reads a chunk into buf: through the page cache, or with O_DIRECT in whole
 * aligned blocks when asked for. */
static int read_chunk(worker *w, const chunk *c, void *buf, wd_error *err)
{
    wl_pipeline *p = w->p;
    const char *path = p->job->ckpt->shards[c->shard].path;
    int dfd = p->fd_direct[c->shard];

    if (p->job->ckpt->shards[c->shard].host)
        return read_at(p, c->shard, buf, c->read_len, c->read_off, err);

    if (dfd >= 0) {
        /* The length rounds up to whole blocks; the file may end sooner. */
        int rc = read_full(dfd, buf, align_up(c->read_len), c->read_off, path, true, err);
        if (rc != -EINVAL)
            return rc;
        /* O_DIRECT refused (a filesystem that cannot): plain reads instead. */
    }
    return read_cached(p, c, buf, err);
}

/* Hashes bytes [off, off + n) of tensor t (len bytes in all), at src, into
 * its checksum blocks: a block whole in them at once, else fed on from
 * where the reader left it (one block is open at a time per reader). */
static void sum_bytes(worker *w, uint32_t t, uint64_t len, uint64_t off, const char *src, uint64_t n)
{
    uint64_t *blocks = w->p->blocks + w->p->block_base[t];

    for (uint64_t end = off + n; off < end;) {
        uint64_t index = off / WD_SUM_BLOCK, bend = (index + 1) * WD_SUM_BLOCK, step;
        if (bend > len)
            bend = len;
        step = (bend < end ? bend : end) - off;
        if (off % WD_SUM_BLOCK == 0 && off + step == bend) {
            blocks[index] = wd_sum_block(src, (size_t)step, index);
        } else {
            if (off % WD_SUM_BLOCK == 0)
                wd_summer_block_start(w->sum, index);
            wd_summer_block_feed(w->sum, src, (size_t)step);
            if (off + step == bend)
                blocks[index] = wd_summer_block_end(w->sum);
        }
        off += step;
        src += step;
    }
}

/* Staged loads hash each tensor's bytes from the chunk's buffer, a step at
 * a time right after reading it, while the step is in the CPU's cache:
 * [lo, hi) of the buffer. Tensors are whole blocks in a chunk (plan), and
 * a reader goes through its chunk in file order, so one block is open at a
 * time. */
#define SUM_STEP (512u << 10)

static void sum_range(worker *w, const chunk *c, const char *buf, uint64_t lo, uint64_t hi)
{
    wl_pipeline *p = w->p;
    const wl_job *job = p->job;

    for (size_t j = 0; j < c->n;) {
        const piece *pc = &p->pieces[c->first + j];
        uint32_t t = job->dest[pc->dest].tensor;
        uint64_t from = job->dest[pc->dest].tensor_off + pc->dest_off, to = from + pc->len;
        uint64_t len = st_tensor_nbytes(job->ckpt->tensors[t].st), at0 = pc->at, a, b;
        /* the tensor's bytes in this chunk: its pieces' union (a copy on
         * each device, or its parts), contiguous in the buffer */
        for (j++; j < c->n && job->dest[p->pieces[c->first + j].dest].tensor == t; j++) {
            const piece *q = &p->pieces[c->first + j];
            uint64_t qf = job->dest[q->dest].tensor_off + q->dest_off;
            if (qf < from) {
                at0 = q->at;
                from = qf;
            }
            if (qf + q->len > to)
                to = qf + q->len;
        }
        a = at0 > lo ? at0 : lo;
        b = at0 + (to - from) < hi ? at0 + (to - from) : hi;
        if (a < b) /* buffer offset a holds the tensor's byte from + (a - at0) */
            sum_bytes(w, t, len, from + (a - at0), buf + a, b - a);
    }
}

/* read_chunk in steps, each hashed as soon as it is in. */
static int read_and_sum(worker *w, const chunk *c, char *buf, wd_error *err)
{
    for (uint64_t off = 0; off < c->read_len; off += SUM_STEP) {
        chunk step = *c;
        int rc;
        step.read_off = c->read_off + off;
        step.read_len = c->read_len - off < SUM_STEP ? c->read_len - off : SUM_STEP;
        step.shard_start = c->shard_start && off == 0;
        if ((rc = read_chunk(w, &step, buf + off, err)))
            return rc;
        sum_range(w, c, buf, off, off + step.read_len);
    }
    return 0;
}

static int wait_buffer(worker *w, int k, wd_error *err)
{
    wa_backend *b = w->p->backend;

    for (int d = 0; d < 64 && w->busy_devices[k]; d++)
        if (w->busy_devices[k] & (1ULL << d)) {
            int rc = b->copy_wait(b, d, w->index * 2 + (unsigned)k, err);
            if (rc)
                return rc;
            w->busy_devices[k] &= ~(1ULL << d);
        }
    return 0;
}

static int compare(worker *w, const piece *pc, const void *have_file, wd_error *err)
{
    wl_job *job = w->p->job;
    const wl_dest *d = &job->dest[pc->dest];
    const unsigned char *want = have_file, *have;
    int rc;

    if (d->mem->host) {
        have = (const unsigned char *)d->mem->host + d->offset + pc->dest_off;
    } else {
        if (!w->cmp && !(w->cmp = wd_malloc(w->p->chunk)))
            return wd_error_set(err, -ENOMEM, "out of host memory");
        if ((rc = w->p->backend->read(w->p->backend, d->device, d->mem, d->offset + pc->dest_off, w->cmp, pc->len,
                                      err)))
            return rc;
        have = w->cmp;
    }
    if (memcmp(want, have, pc->len) != 0) {
        uint64_t at = 0;
        while (want[at] == have[at])
            at++;
        pthread_mutex_lock(&w->p->err_lock);
        /* Count each tensor once, however many of its pieces differ. */
        if (!w->p->mismatched[d->tensor]) {
            w->p->mismatched[d->tensor] = 1;
            if (!job->mismatched_tensors)
                snprintf(job->first_mismatch, sizeof job->first_mismatch,
                         "tensor \"%s\": first difference at byte %llu (on device %d)",
                         job->ckpt->tensors[d->tensor].st->name,
                         (unsigned long long)(d->tensor_off + pc->dest_off + at), d->device);
            job->mismatched_tensors++;
        }
        pthread_mutex_unlock(&w->p->err_lock);
    }
    return 0;
}

/* Waits until the dests up to `need` have their memory (wl_job.dests_ready).
 * They are normally ready long before: the loop thread allocates many times
 * faster than the readers read. The pause doubles from 20 us to 1 ms, so that
 * readers waiting on a slow allocation leave the CPUs to it. False when the
 * job was cancelled. */
static bool wait_dests(wl_job *job, size_t need)
{
    struct timespec pause = {0, 20000};

    while (atomic_load_explicit(&job->dests_ready, memory_order_acquire) < need) {
        if (atomic_load_explicit(&job->cancel, memory_order_relaxed))
            return false;
        nanosleep(&pause, NULL);
        if (pause.tv_nsec < 1000000)
            pause.tv_nsec *= 2;
    }
    return true;
}

/* Hashes the checksum blocks of the tensors in chunk c (each whole in it:
 * plan cuts at block boundaries) from the host memory each piece was read
 * into. A tensor on several devices appears in several pieces: each byte is
 * hashed once. */
static void sum_chunk(worker *w, const chunk *c)
{
    wl_pipeline *p = w->p;
    const wl_job *job = p->job;
    uint32_t tensor = UINT32_MAX;
    uint64_t pos = 0, len = 0;

    for (size_t j = 0; j < c->n; j++) {
        const piece *pc = &p->pieces[c->first + j];
        const wl_dest *d = &job->dest[pc->dest];
        uint64_t from = d->tensor_off + pc->dest_off;
        const char *src = (const char *)d->mem->host + d->offset + pc->dest_off;
        if (d->tensor != tensor) {
            tensor = d->tensor;
            pos = from;
            len = st_tensor_nbytes(job->ckpt->tensors[tensor].st);
        }
        if (from > pos || from + pc->len <= pos)
            continue; /* a copy of bytes hashed already */
        sum_bytes(w, tensor, len, pos, src + (pos - from), from + pc->len - pos);
        pos = from + pc->len;
    }
}

/* Offload: one copy of the bytes the chunk's pieces hold, from the devices
 * to the chunk's place in its file: a replicated tensor's first copy, a
 * split one's parts in turn (as sum_chunk walks them). Memory the CPU
 * addresses is written from where it is; device memory is copied into the
 * staging buffer first, at the chunk's layout, and written in one go. */
static int offload_chunk(worker *w, const chunk *c, wd_error *err)
{
    wl_pipeline *p = w->p;
    const wl_job *job = p->job;
    uint32_t tensor = UINT32_MAX;
    uint64_t pos = 0, lo = UINT64_MAX, hi = 0;
    char *buf = NULL;
    int rc;

    for (size_t j = 0; j < c->n; j++) {
        const piece *pc = &p->pieces[c->first + j];
        const wl_dest *d = &job->dest[pc->dest];
        uint64_t from = d->tensor_off + pc->dest_off, skip, len;
        if (d->tensor != tensor) {
            tensor = d->tensor;
            pos = from;
        }
        if (from > pos || from + pc->len <= pos)
            continue; /* a copy of bytes written already */
        skip = pos - from;
        len = pc->len - skip;
        pos = from + pc->len;
        if (d->mem->host && !p->stage_host) {
            if (write_at(p, c->shard, (const char *)d->mem->host + d->offset + pc->dest_off + skip, len,
                         c->read_off + pc->at + skip, err))
                return err->code;
            continue;
        }
        if (!buf && !(buf = w->buf[0]) && !(buf = w->buf[0] = buffer_alloc(p, p->chunk, err)))
            return err->code ? err->code : -ENOMEM;
        if ((rc = p->backend->read(p->backend, d->device, d->mem, d->offset + pc->dest_off + skip,
                                   buf + pc->at + skip, len, err))) {
            wd_error_prefix(err, "tensor \"%s\"", job->ckpt->tensors[tensor].st->name);
            return rc;
        }
        if (pc->at + skip < lo)
            lo = pc->at + skip;
        if (pc->at + skip + len > hi)
            hi = pc->at + skip + len;
    }
    return lo < hi ? write_at(p, c->shard, buf + lo, hi - lo, c->read_off + lo, err) : 0;
}

static int run_chunk(worker *w, const chunk *c, int *k, wd_error *err)
{
    wl_pipeline *p = w->p;
    wl_job *job = p->job;
    const wl_checkpoint *ck = job->ckpt;
    bool direct_to_host = job->mode == WL_LOAD && !p->stage_host;
    uint64_t useful = 0, finished = 0;
    size_t i = 0; /* the piece being worked on, for the error */
    int rc = 0;

    /* A chunk's pieces go to rising dests: its last piece's is the highest.
     * Cancelled while waiting: the worker's loop stops at its next look. */
    if (c->n && !wait_dests(job, p->pieces[c->first + c->n - 1].dest + 1))
        return 0;
    if (job->mode == WL_OFFLOAD) {
        if ((rc = offload_chunk(w, c, err)))
            return rc;
        for (size_t j = 0; j < c->n; j++) {
            const piece *pc = &p->pieces[c->first + j];
            useful += pc->len;
            finished += pc->dest_off + pc->len == job->dest[pc->dest].len;
        }
        goto out;
    }
    for (size_t j = 0; j < c->n; j++) {
        const piece *pc = &p->pieces[c->first + j];
        direct_to_host &= job->dest[pc->dest].mem->host != NULL;
        useful += pc->len;
        finished += pc->dest_off + pc->len == job->dest[pc->dest].len;
    }
    if (direct_to_host) {
        /* Host memory the CPU can address: read each piece where it goes. */
        for (; i < c->n; i++) {
            const piece *pc = &p->pieces[c->first + i];
            const wl_dest *d = &job->dest[pc->dest];
            if ((rc = read_at(p, c->shard, (char *)d->mem->host + d->offset + pc->dest_off, pc->len,
                              c->read_off + pc->at, err)))
                goto out;
        }
    } else {
        const wl_shard *sh = &ck->shards[c->shard];
        void *buf;
        if (p->pinned && sh->host_pinned && job->mode == WL_LOAD) {
            /* Pinned memory of the caller's: copied from where it is. The
             * buffer's lane still bounds the copies in flight. */
            buf = (char *)sh->host + c->read_off;
            if ((rc = wait_buffer(w, *k, err)))
                goto out;
            if (p->blocks)
                sum_range(w, c, buf, 0, c->read_len);
        } else {
            if (!w->buf[*k] && !(w->buf[*k] = buffer_alloc(p, p->chunk, err))) {
                rc = err->code ? err->code : -ENOMEM;
                goto out;
            }
            buf = w->buf[*k];
            if ((rc = wait_buffer(w, *k, err)) ||
                (rc = p->blocks ? read_and_sum(w, c, buf, err) : read_chunk(w, c, buf, err)))
                goto out;
        }
        for (; i < c->n; i++) {
            const piece *pc = &p->pieces[c->first + i];
            const wl_dest *d = &job->dest[pc->dest];
            const char *src = (const char *)buf + pc->at;
            if (job->mode == WL_VERIFY) {
                rc = compare(w, pc, src, err);
            } else if (p->pinned) {
                rc = p->backend->copy_async(p->backend, d->device, d->mem, d->offset + pc->dest_off, src, pc->len,
                                            w->index * 2 + (unsigned)*k, err);
                w->busy_devices[*k] |= 1ULL << d->device;
            } else {
                rc = p->backend->write(p->backend, d->device, d->mem, d->offset + pc->dest_off, src, pc->len, err);
            }
            if (rc)
                goto out;
        }
        /* Copies still in flight from this buffer: the next chunk takes the other. */
        if (p->pinned)
            *k ^= 1;
    }
    if (p->blocks && direct_to_host)
        sum_chunk(w, c); /* staged chunks were hashed as they were read */
out:
    if (rc) {
        if (i < c->n)
            wd_error_prefix(err, "tensor \"%s\"",
                            ck->tensors[job->dest[p->pieces[c->first + i].dest].tensor].st->name);
        return rc;
    }
    atomic_fetch_add_explicit(&job->bytes_done, useful, memory_order_relaxed);
    atomic_fetch_add_explicit(&job->tensors_done, finished, memory_order_relaxed);
    return 0;
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    wl_pipeline *p = w->p;
    wd_error err = {0};
    int k = 0, rc = 0;

    memset(w->busy_devices, 0, sizeof w->busy_devices);
    while (!atomic_load_explicit(&p->job->cancel, memory_order_relaxed)) {
        size_t i = atomic_fetch_add(&p->next, 1);
        if (i >= p->n_chunks)
            break;
        if ((rc = run_chunk(w, &p->chunks[i], &k, &err)))
            break;
    }
    /* Every copy from this thread's buffers is done before the job is. */
    for (int b = 0; b < 2; b++) {
        wd_error e2 = {0};
        int r2 = p->pinned ? wait_buffer(w, b, &e2) : 0;
        if (r2 && !rc) {
            rc = r2;
            err = e2;
        }
    }
    if (rc)
        fail_job(p, rc, &err);
    return NULL;
}

/* ---- a job ------------------------------------------------------------------- */

/* A shard is what it was when its header was read: its size (the data
 * must be there) and, for a load, its modification time (a file rewritten
 * in place, even at the same size, would mix old and new bytes). */
static int shard_unchanged(const wl_shard *sh, const struct stat *st, bool loading, const char *when,
                           wd_error *err)
{
    if ((uint64_t)st->st_size != sh->file_size)
        return wd_error_set(err, -EIO, "%s: the file changed size %s (%llu bytes, was %llu)", sh->path, when,
                            (unsigned long long)st->st_size, (unsigned long long)sh->file_size);
    /* (a verify compares with the file as it is now, changed or not) */
    if (loading && (st->st_mtim.tv_sec != sh->mtime.tv_sec || st->st_mtim.tv_nsec != sh->mtime.tv_nsec))
        return wd_error_set(err, -EIO, "%s: the file was modified %s", sh->path, when);
    return 0;
}

/* Each job reads through duplicates of the descriptors the checkpoint
 * opened at discovery: a path renamed or replaced since reads nothing new,
 * and a checkpoint a client opened is read with what it could read. */
static int open_shards(wl_pipeline *p, const wl_checkpoint *ck, wd_error *err)
{
    int rc;

    if (!(p->fd = wd_malloc(ck->n_shards * sizeof *p->fd)) || !(p->fd_direct = wd_malloc(ck->n_shards * sizeof *p->fd)))
        return wd_error_set(err, -ENOMEM, "out of host memory");
    for (size_t s = 0; s < ck->n_shards; s++)
        p->fd[s] = p->fd_direct[s] = -1;
    for (size_t s = 0; s < ck->n_shards; s++) {
        const wl_shard *sh = &ck->shards[s];
        struct stat st;
        if (sh->host)
            continue; /* the daemon's own memory, read and written where it is */
        if ((p->fd[s] = fcntl(sh->fd, F_DUPFD_CLOEXEC, 3)) < 0)
            return wd_error_set(err, -errno, "%s: %s", sh->path, strerror(errno));
        if (fstat(p->fd[s], &st) < 0 || !S_ISREG(st.st_mode))
            return wd_error_set(err, -EINVAL, "%s: not a regular file", sh->path);
        if ((rc = shard_unchanged(sh, &st, p->job->mode == WL_LOAD, "since its header was read", err)))
            return rc;
        posix_fadvise(p->fd[s], 0, 0, POSIX_FADV_SEQUENTIAL);
        /* Staged reads only: reading straight into host segments stays
         * buffered. O_DIRECT is a new open of the same file (through
         * /proc, not its path); where the daemon may not, reads stay buffered. */
        if (p->pinned && p->direct == WL_DIRECT_ON) {
            char self[64];
            snprintf(self, sizeof self, "/proc/self/fd/%d", sh->fd);
            p->fd_direct[s] = open(self, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_DIRECT);
        }
    }
    return 0;
}

static void close_shards(wl_pipeline *p, const wl_checkpoint *ck)
{
    for (size_t s = 0; p->fd && s < ck->n_shards; s++) {
        if (p->fd[s] >= 0)
            close(p->fd[s]);
        if (p->fd_direct && p->fd_direct[s] >= 0)
            close(p->fd_direct[s]);
    }
    free(p->fd);
    free(p->fd_direct);
    p->fd = p->fd_direct = NULL;
}

/* ---- quick: the devices' copies against the checksums ---------------------- */

/* One copy of tensor t: from offset 0, each run the first dest not taken yet
 * that starts where the last ended (a replicated tensor has one copy per
 * device, a split one its parts on several). Feeds w->sum; how far it got. */
static uint64_t sum_copy(worker *w, size_t first, size_t end, bool *taken, uint64_t len, int *device,
                         wd_error *err)
{
    wl_pipeline *p = w->p;
    const wl_job *job = p->job;
    uint64_t pos = 0;

    wd_summer_start(w->sum, len);
    while (pos < len) {
        size_t d;
        for (d = first; d < end && (taken[d - first] || job->dest[d].tensor_off != pos || !job->dest[d].len); d++)
            ;
        if (d == end)
            break;
        taken[d - first] = true;
        if (pos == 0)
            *device = job->dest[d].device;
        const wl_dest *dd = &job->dest[d];
        for (uint64_t off = 0; off < dd->len;) {
            size_t n = dd->len - off < p->chunk ? (size_t)(dd->len - off) : (size_t)p->chunk;
            if (dd->mem->host) {
                wd_summer_feed(w->sum, (const char *)dd->mem->host + dd->offset + off, n);
            } else {
                if ((!w->cmp && !(w->cmp = wd_malloc(p->chunk))) ||
                    p->backend->read(p->backend, dd->device, dd->mem, dd->offset + off, w->cmp, n, err)) {
                    if (!err->code)
                        wd_error_set(err, -ENOMEM, "out of host memory");
                    return UINT64_MAX;
                }
                wd_summer_feed(w->sum, w->cmp, n);
            }
            off += n;
        }
        pos += dd->len;
    }
    return pos;
}

static void *quick_main(void *arg)
{
    worker *w = arg;
    wl_pipeline *p = w->p;
    wl_job *job = p->job;
    const wl_checkpoint *ck = job->ckpt;
    wd_error err = {0};

    for (size_t t; !atomic_load_explicit(&job->cancel, memory_order_relaxed) &&
                   (t = atomic_fetch_add(&p->next, 1)) < ck->n_tensors;) {
        size_t first = p->tensor_dests[t], end = p->tensor_dests[t + 1];
        uint64_t len = st_tensor_nbytes(ck->tensors[t].st);
        bool taken[end - first + 1];
        memset(taken, 0, sizeof taken);
        for (unsigned copy = 0;; copy++) {
            int device = -1;
            uint64_t got = sum_copy(w, first, end, taken, len, &device, &err), sum;
            if (got == UINT64_MAX) {
                fail_job(p, err.code, &err);
                return NULL;
            }
            if (len && got == 0 && copy > 0)
                break; /* every copy was checked */
            sum = wd_summer_end(w->sum, NULL);
            if (got != len || sum != job->sums[t]) {
                char have[17], want[17];
                pthread_mutex_lock(&p->err_lock);
                if (!job->mismatched_tensors && got != len)
                    snprintf(job->first_mismatch, sizeof job->first_mismatch,
                             "tensor \"%s\": the copy on device %d holds %llu of its %llu bytes",
                             ck->tensors[t].st->name, device, (unsigned long long)got, (unsigned long long)len);
                else if (!job->mismatched_tensors)
                    snprintf(job->first_mismatch, sizeof job->first_mismatch,
                             "tensor \"%s\": the copy on device %d has checksum %s, loaded with %s",
                             ck->tensors[t].st->name, device, wd_sum_format(sum, have),
                             wd_sum_format(job->sums[t], want));
                job->mismatched_tensors++;
                pthread_mutex_unlock(&p->err_lock);
            }
            atomic_fetch_add_explicit(&job->bytes_done, got, memory_order_relaxed);
            if (!len)
                break;
        }
        atomic_fetch_add_explicit(&job->tensors_done, end - first, memory_order_relaxed);
    }
    return NULL;
}

/* Room for every tensor's block hashes, and a hasher for each reader. */
static int sums_begin(wl_pipeline *p, const wl_checkpoint *ck, wd_error *err)
{
    size_t n = 0;

    if (!(p->block_base = wd_malloc((ck->n_tensors + 1) * sizeof *p->block_base)))
        return wd_error_set(err, -ENOMEM, "out of host memory");
    for (size_t t = 0; t < ck->n_tensors; t++) {
        p->block_base[t] = n;
        n += (size_t)wd_sum_blocks(st_tensor_nbytes(ck->tensors[t].st));
    }
    p->block_base[ck->n_tensors] = n;
    if (!(p->blocks = wd_calloc(n ? n : 1, sizeof *p->blocks)))
        return wd_error_set(err, -ENOMEM, "out of host memory for %zu checksum blocks", n);
    for (unsigned i = 0; i < p->threads; i++)
        if (!p->workers[i].sum && !(p->workers[i].sum = wd_summer_new()))
            return wd_error_set(err, -ENOMEM, "out of host memory");
    return 0;
}

/* Runs fn on n of the readers and waits for them: 0, the job's error, or
 * -ECANCELED. */
static int run_workers(wl_pipeline *p, wl_job *job, void *(*fn)(void *), unsigned n)
{
    unsigned started = 0;
    int rc = 0;

    for (; started < n; started++)
        if (pthread_create(&p->workers[started].thread, NULL, fn, &p->workers[started])) {
            rc = wd_error_set(&job->err, -EAGAIN, "cannot start a reader thread");
            atomic_store(&job->cancel, true);
            break;
        }
    for (unsigned i = 0; i < started; i++)
        pthread_join(p->workers[i].thread, NULL);
    if (!rc && job->err.code)
        rc = job->err.code;
    if (!rc && atomic_load(&job->cancel))
        rc = wd_error_set(&job->err, -ECANCELED, "cancelled");
    return rc;
}

/* Each reader takes tensors in turn and checks every copy of each. */
static int run_quick(wl_pipeline *p, wl_job *job)
{
    const wl_checkpoint *ck = job->ckpt;
    int rc = 0;

    if (!job->sums || !(p->tensor_dests = wd_malloc((ck->n_tensors + 1) * sizeof *p->tensor_dests))) {
        rc = wd_error_set(&job->err, job->sums ? -ENOMEM : -EINVAL,
                          job->sums ? "out of host memory" : "no checksums to check against");
        goto out;
    }
    for (size_t t = 0, d = 0; t <= ck->n_tensors; t++) {
        p->tensor_dests[t] = d;
        while (t < ck->n_tensors && d < job->n_dest && job->dest[d].tensor == t)
            d++;
    }
    for (unsigned i = 0; i < p->threads; i++)
        if (!p->workers[i].sum && !(p->workers[i].sum = wd_summer_new())) {
            rc = wd_error_set(&job->err, -ENOMEM, "out of host memory");
            goto out;
        }
    rc = run_workers(p, job, quick_main, p->threads);
out:
    free(p->tensor_dests);
    p->tensor_dests = NULL;
    p->job = NULL;
    return rc;
}

int wl_job_run(wl_pipeline *p, wl_job *job)
{
    const wl_checkpoint *ck = job->ckpt;
    int rc;

    p->job = job;
    atomic_store(&p->next, 0);
    if (job->mode == WL_QUICK)
        return run_quick(p, job);
    if ((rc = plan(p, job, &job->err)) || (rc = open_shards(p, ck, &job->err)))
        goto out;
    if (job->mode == WL_VERIFY && !(p->mismatched = wd_calloc(ck->n_tensors ? ck->n_tensors : 1, 1))) {
        rc = wd_error_set(&job->err, -ENOMEM, "out of host memory");
        goto out;
    }
    if (job->mode == WL_LOAD && job->sums && (rc = sums_begin(p, ck, &job->err)))
        goto out;
    /* Empty dests are done before anything is read. */
    {
        uint64_t empty = 0;
        for (size_t d = 0; d < job->n_dest; d++)
            empty += !job->dest[d].len;
        atomic_fetch_add(&job->tensors_done, empty);
    }
    rc = run_workers(p, job, worker_main, p->n_chunks < p->threads ? (unsigned)p->n_chunks : p->threads);
    for (size_t s = 0; !rc && s < ck->n_shards; s++) {
        struct stat st;
        if (ck->shards[s].host)
            continue;
        if (fstat(p->fd[s], &st) < 0)
            rc = wd_error_set(&job->err, -errno, "%s: %s", ck->shards[s].path, strerror(errno));
        else
            rc = shard_unchanged(&ck->shards[s], &st, job->mode == WL_LOAD,
                                 job->mode == WL_LOAD ? "while it was loaded" : "while it was verified", &job->err);
    }
    if (!rc && p->blocks)
        for (size_t t = 0; t < ck->n_tensors; t++)
            job->sums[t] = wd_sum_of_blocks(p->blocks + p->block_base[t], p->block_base[t + 1] - p->block_base[t]);
out:
    free(p->blocks);
    free(p->block_base);
    p->blocks = NULL;
    p->block_base = NULL;
    close_shards(p, ck);
    free(p->chunks);
    free(p->pieces);
    free(p->mismatched);
    p->chunks = NULL;
    p->pieces = NULL;
    p->mismatched = NULL;
    p->job = NULL;
    return rc;
}
