/* loader.c, the read pipeline, on the host backend: loads whose dests get
 * their memory while the job runs (as the daemon allocates beside the
 * reads), a cancel while readers wait for memory, verifies through
 * staging buffers (the page-cache read path), and a sleep's offload. */
#include "tests/unit/suites.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "allocator/allocator.h"
#include "common/checksum.h"
#include "loader/checkpoint.h"
#include "loader/ckpt_writer.h"
#include "loader/loader.h"
#include "loader/placement.h"

#define MiB (1024ULL * 1024ULL)
#define SEED 11

/* Embedding and head of 100000 x 16 bf16 (3.2 MB each): several 1 MiB chunks. */
static const wl_tensor_tmpl tmpl[] = {
    {WL_HEAD, "embed", ST_BF16, 2, {WL_DIM_VOCAB, 16}},
    {WL_LAYER, "layers.{L}.norm", ST_F32, 1, {16}},
    {WL_EXPERT, "layers.{L}.experts.{X}.up", ST_BF16, 2, {64, 256}},
    {WL_TAIL, "head", ST_BF16, 2, {WL_DIM_VOCAB, 16}},
};
static const wl_preset preset = {"loader-test", "test/loader", 2, 4, 100000, tmpl, sizeof tmpl / sizeof tmpl[0]};

/* A checkpoint on disk, opened, with a dest per tensor in host segments. */
typedef struct fixture {
    wa_backend *backend;
    wl_checkpoint ck;
    wl_dest *dest;
    wa_mem *mem;
    size_t n_dest;
    uint64_t total;
} fixture;

static void setup(fixture *f)
{
    wl_ckpt_options o = {.preset = &preset, .out_dir = wd_test_tmp, .seed = SEED, .shard_size = 4 * MiB};
    wl_target *targets;
    wd_error e = {0};
    int device = 0, rc;

    memset(f, 0, sizeof *f);
    rc = wl_ckpt_write(&o, NULL, &e);
    ck_assert_msg(rc == 0, "write: %s", e.msg);
    rc = wl_checkpoint_open(wd_test_tmp, &f->ck, &e);
    ck_assert_msg(rc == 0, "open: %s", e.msg);
    ck_assert_int_gt(f->ck.n_shards, 1);
    ck_assert_int_eq(wa_backend_host_create(1, 64 * MiB, &f->backend, &e), 0);
    ck_assert_int_eq(wl_place(&f->ck, &device, 1, WL_REPLICATE, &targets, &f->n_dest, &e), 0);
    f->dest = calloc(f->n_dest, sizeof *f->dest);
    f->mem = calloc(f->n_dest, sizeof *f->mem);
    for (size_t i = 0; i < f->n_dest; i++) {
        const wl_target *t = &targets[i];
        ck_assert_int_eq(f->backend->seg_alloc(f->backend, 0, t->len, &f->mem[i], &e), 0);
        f->dest[i] = (wl_dest){.tensor = t->tensor, .tensor_off = t->offset, .len = t->len, .device = 0,
                               .mem = &f->mem[i]};
        f->total += t->len;
    }
    free(targets);
}

static void teardown(fixture *f)
{
    for (size_t i = 0; i < f->n_dest; i++)
        f->backend->seg_free(f->backend, 0, &f->mem[i]);
    free(f->mem);
    free(f->dest);
    wa_backend_destroy(f->backend);
    wl_checkpoint_close(&f->ck);
}

static void job_init(wl_job *job, const fixture *f, wl_mode mode, size_t dests_ready)
{
    memset(job, 0, sizeof *job);
    job->mode = mode;
    job->ckpt = &f->ck;
    job->dest = f->dest;
    job->n_dest = f->n_dest;
    atomic_store(&job->dests_ready, dests_ready);
}

/* Every dest holds its tensor's bytes, as the writer made them. */
static void check_contents(const fixture *f)
{
    for (size_t i = 0; i < f->n_dest; i++) {
        const wl_dest *d = &f->dest[i];
        unsigned char *want = malloc(d->len);
        wl_ckpt_fill(SEED, f->ck.tensors[d->tensor].st->name, d->tensor_off, want, d->len);
        ck_assert_msg(memcmp(want, d->mem->host, d->len) == 0, "tensor %s differs",
                      f->ck.tensors[d->tensor].st->name);
        free(want);
    }
}

/* Plain loads, for readable assertion messages. */
static uint64_t bytes_done(wl_job *job) { return atomic_load(&job->bytes_done); }
static uint64_t tensors_done(wl_job *job) { return atomic_load(&job->tensors_done); }

typedef struct runner {
    pthread_t thread;
    wl_pipeline *p;
    wl_job *job;
    int rc;
} runner;

static void *run_job(void *arg)
{
    runner *r = arg;
    r->rc = wl_job_run(r->p, r->job);
    return NULL;
}

static wl_pipeline *pipeline(const fixture *f, bool plain)
{
    wl_pipeline_opts po = {.threads = 2, .staging = 4 * MiB, .plain = plain};
    wl_pipeline *p;
    wd_error e = {0};

    ck_assert_int_eq(wl_pipeline_create(f->backend, &po, &p, &e), 0);
    ck_assert_int_eq(wl_pipeline_chunk(p), 1 * MiB);
    return p;
}

/* A load with no dest ready yet, running on a thread of its own. */
static void start_load(fixture *f, wl_job *job, runner *r)
{
    setup(f);
    *r = (runner){.p = pipeline(f, false), .job = job};
    job_init(job, f, WL_LOAD, 0);
    ck_assert_int_eq(pthread_create(&r->thread, NULL, run_job, r), 0);
}

START_TEST(dests_that_get_memory_while_the_job_runs)
{
    fixture f;
    wl_job job;
    runner r;

    start_load(&f, &job, &r);
    for (size_t i = 0; i < f.n_dest; i++) {
        usleep(1000);
        /* The chunks that feed the last dest cannot be done before it has
         * memory, so the job is not either. */
        uint64_t done = bytes_done(&job);
        ck_assert_uint_lt(done, f.total);
        atomic_store_explicit(&job.dests_ready, i + 1, memory_order_release);
    }
    pthread_join(r.thread, NULL);
    ck_assert_msg(r.rc == 0, "rc %d: %s", r.rc, job.err.msg);
    ck_assert_uint_eq(bytes_done(&job), f.total);
    ck_assert_uint_eq(tensors_done(&job), f.n_dest);
    check_contents(&f);
    wl_pipeline_destroy(r.p);
    teardown(&f);
}
END_TEST

START_TEST(a_cancel_ends_readers_that_wait_for_memory)
{
    fixture f;
    wl_job job;
    runner r;

    start_load(&f, &job, &r);
    usleep(20000);
    ck_assert_uint_eq(bytes_done(&job), 0);
    atomic_store(&job.cancel, true);
    pthread_join(r.thread, NULL);
    ck_assert_int_eq(r.rc, -ECANCELED);
    ck_assert_uint_eq(bytes_done(&job), 0);
    wl_pipeline_destroy(r.p);
    teardown(&f);
}
END_TEST

START_TEST(verify_through_staging_buffers_finds_a_changed_byte)
{
    fixture f;
    wl_job job;
    wl_pipeline *load, *check;
    size_t victim;

    setup(&f);
    load = pipeline(&f, false);
    check = pipeline(&f, true);
    job_init(&job, &f, WL_LOAD, f.n_dest);
    ck_assert_int_eq(wl_job_run(load, &job), 0);
    job_init(&job, &f, WL_VERIFY, f.n_dest);
    ck_assert_int_eq(wl_job_run(check, &job), 0);
    ck_assert_uint_eq(job.mismatched_tensors, 0);
    ck_assert_uint_eq(bytes_done(&job), f.total);
    /* One byte of the head, far into it, changed on the device. */
    for (victim = 0; strcmp(f.ck.tensors[f.dest[victim].tensor].st->name, "head") != 0; victim++)
        ;
    ((unsigned char *)f.mem[victim].host)[3 * MiB] ^= 0xff;
    job_init(&job, &f, WL_VERIFY, f.n_dest);
    ck_assert_int_eq(wl_job_run(check, &job), 0);
    ck_assert_uint_eq(job.mismatched_tensors, 1);
    ck_assert_str_eq(job.first_mismatch, "tensor \"head\": first difference at byte 3145728 (on device 0)");
    wl_pipeline_destroy(load);
    wl_pipeline_destroy(check);
    teardown(&f);
}
END_TEST

/* Each tensor's checksum read from its file from start to end. */
static void file_sums(const fixture *f, uint64_t *sums)
{
    wd_summer *sum = wd_summer_new();

    for (size_t i = 0; i < f->ck.n_tensors; i++) {
        const wl_shard *sh = &f->ck.shards[f->ck.tensors[i].shard];
        const st_tensor *t = f->ck.tensors[i].st;
        size_t len = (size_t)st_tensor_nbytes(t);
        char *buf = malloc(len + 1);
        ck_assert_int_eq(pread(sh->fd, buf, len, (off_t)(sh->st.data_offset + t->begin)), (ssize_t)len);
        wd_summer_start(sum, len);
        for (size_t at = 0; at < len; at += 4099) /* odd pieces */
            wd_summer_feed(sum, buf + at, len - at < 4099 ? len - at : 4099);
        sums[i] = wd_summer_end(sum, NULL);
        free(buf);
    }
    wd_summer_free(sum);
}

START_TEST(checksums_while_loading_are_the_files_on_either_path)
{
    fixture f;
    wl_job job;
    uint64_t *want, *got;

    setup(&f);
    want = calloc(f.ck.n_tensors, sizeof *want);
    got = calloc(f.ck.n_tensors, sizeof *got);
    file_sums(&f, want);
    for (int staged = 0; staged < 2; staged++) {
        /* 1 MiB chunks: tensors of 3.2 MB span chunks, cut at 256 KiB blocks */
        wl_pipeline_opts po = {.threads = 2, .staging = 4 * MiB, .stage_host = staged};
        wl_pipeline *p;
        wd_error e = {0};
        ck_assert_int_eq(wl_pipeline_create(f.backend, &po, &p, &e), 0);
        ck_assert_uint_eq(wl_pipeline_chunk(p), MiB);
        memset(got, 0, f.ck.n_tensors * sizeof *got);
        for (size_t i = 0; i < f.n_dest; i++)
            memset(f.mem[i].host, 0, f.dest[i].len);
        job_init(&job, &f, WL_LOAD, f.n_dest);
        job.sums = got;
        ck_assert_msg(wl_job_run(p, &job) == 0, "%s", job.err.msg);
        check_contents(&f);
        for (size_t i = 0; i < f.ck.n_tensors; i++)
            ck_assert_msg(got[i] == want[i], "tensor %s, %s", f.ck.tensors[i].st->name, staged ? "staged" : "direct");
        /* and the quick check of the copy agrees, then finds a change */
        job_init(&job, &f, WL_QUICK, f.n_dest);
        job.sums = got;
        ck_assert_int_eq(wl_job_run(p, &job), 0);
        ck_assert_uint_eq(job.mismatched_tensors, 0);
        ((unsigned char *)f.mem[0].host)[f.dest[0].len - 1] ^= 1;
        job_init(&job, &f, WL_QUICK, f.n_dest);
        job.sums = got;
        ck_assert_int_eq(wl_job_run(p, &job), 0);
        ck_assert_uint_eq(job.mismatched_tensors, 1);
        ck_assert_ptr_nonnull(strstr(job.first_mismatch, "has checksum"));
        wl_pipeline_destroy(p);
    }
    free(want);
    free(got);
    teardown(&f);
}
END_TEST

/* A sleep's offload: the devices' bytes into memfds the size of the
 * shards, each where its file has it, written with pwrite or into their
 * mappings (wl_shard.host); and a load back from them. */
START_TEST(offload_writes_each_tensor_where_its_file_has_it_on_either_path)
{
    fixture f;
    wl_job job;
    wl_checkpoint image;

    setup(&f);
    for (int run = 0; run < 4; run++) {
        int staged = run & 1, mapped = run >> 1;
        wl_pipeline_opts po = {.threads = 2, .staging = 4 * MiB, .stage_host = staged};
        wl_pipeline *p;
        wd_error e = {0};
        ck_assert_int_eq(wl_pipeline_create(f.backend, &po, &p, &e), 0);
        job_init(&job, &f, WL_LOAD, f.n_dest);
        ck_assert_int_eq(wl_job_run(p, &job), 0);
        image = f.ck;
        image.shards = calloc(f.ck.n_shards, sizeof *image.shards);
        for (size_t i = 0; i < f.ck.n_shards; i++) {
            image.shards[i] = f.ck.shards[i];
            image.shards[i].fd = memfd_create("offload-test", MFD_CLOEXEC);
            ck_assert_int_eq(ftruncate(image.shards[i].fd, (off_t)image.shards[i].file_size), 0);
            if (mapped) {
                image.shards[i].host = mmap(NULL, image.shards[i].file_size, PROT_READ | PROT_WRITE, MAP_SHARED,
                                            image.shards[i].fd, 0);
                ck_assert_ptr_ne(image.shards[i].host, MAP_FAILED);
            }
        }
        job_init(&job, &f, WL_OFFLOAD, f.n_dest);
        job.ckpt = &image;
        ck_assert_msg(wl_job_run(p, &job) == 0, "%s", job.err.msg);
        ck_assert_uint_eq(bytes_done(&job), f.total);
        ck_assert_uint_eq(tensors_done(&job), f.n_dest);
        for (size_t t = 0; t < f.ck.n_tensors; t++) {
            const wl_shard *sh = &image.shards[f.ck.tensors[t].shard];
            const st_tensor *x = f.ck.tensors[t].st;
            size_t len = (size_t)st_tensor_nbytes(x);
            unsigned char *want = malloc(len + 1), *have = malloc(len + 1);
            wl_ckpt_fill(SEED, x->name, 0, want, len);
            ck_assert_int_eq(pread(sh->fd, have, len, (off_t)(sh->st.data_offset + x->begin)), (ssize_t)len);
            ck_assert_msg(memcmp(want, have, len) == 0, "tensor %s, %s", x->name, staged ? "staged" : "direct");
            free(want);
            free(have);
        }
        /* and back: a load from the memfds, mtime and all as they are now */
        for (size_t i = 0; i < f.n_dest; i++)
            memset(f.mem[i].host, 0, f.dest[i].len);
        for (size_t i = 0; i < f.ck.n_shards; i++) {
            struct stat st;
            ck_assert_int_eq(fstat(image.shards[i].fd, &st), 0);
            image.shards[i].mtime = st.st_mtim;
        }
        job_init(&job, &f, WL_LOAD, f.n_dest);
        job.ckpt = &image;
        ck_assert_msg(wl_job_run(p, &job) == 0, "%s", job.err.msg);
        check_contents(&f);
        for (size_t i = 0; i < f.ck.n_shards; i++) {
            if (mapped)
                munmap(image.shards[i].host, image.shards[i].file_size);
            close(image.shards[i].fd);
        }
        free(image.shards);
        wl_pipeline_destroy(p);
    }
    teardown(&f);
}
END_TEST

Suite *loader_suite(void)
{
    Suite *s = suite_create("loader");
    TCase *tc = tcase_create("pipeline");

    tcase_add_checked_fixture(tc, wd_test_tmp_setup, wd_test_tmp_teardown);
    tcase_add_test(tc, dests_that_get_memory_while_the_job_runs);
    tcase_add_test(tc, a_cancel_ends_readers_that_wait_for_memory);
    tcase_add_test(tc, verify_through_staging_buffers_finds_a_changed_byte);
    tcase_add_test(tc, checksums_while_loading_are_the_files_on_either_path);
    tcase_add_test(tc, offload_writes_each_tensor_where_its_file_has_it_on_either_path);
    suite_add_tcase(s, tc);
    return s;
}
