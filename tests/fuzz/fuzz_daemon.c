/* fuzz_daemon: libFuzzer harness for the daemon itself: every operation of
 * its table (hello, load, unload, verify, list, info, attach, detach, reattach,
 * leases, stats, policy get and set, snapshot, shutdown) through the files of
 * daemon/, on a real wd_server with the host backend, driven over its real
 * socket.
 *
 * LLVMFuzzerInitialize writes two tiny checkpoints under /tmp/weightd-fuzz
 * (a fixed place, so that the corpus can name them; written once under a
 * lock, identical for every process of a -jobs run):
 *   /tmp/weightd-fuzz/m.safetensors   6 tensors, one file (an empty and a
 *                                     0-dim one among them)
 *   /tmp/weightd-fuzz/moe/            an index and 2 shards: per-expert and
 *                                     fused expert tensors, 9 tensors
 *   /tmp/weightd-fuzz/big.safetensors 16 MiB and 16 bytes, a sparse file:
 *                                     a slab this large takes the host
 *                                     backend more than one allocation
 *                                     step (2 ms), so its load allocates
 *                                     beside its reads (jobs.c's
 *                                     on_alloc_idle)
 *   /tmp/weightd-fuzz/huge.safetensors 16 MiB, then 300 MiB (more than a
 *                                     device holds): its second slab fails
 *                                     beside the reads
 *   /tmp/weightd-fuzz/wide.safetensors 1200 tensors of 8 bytes (4 layers
 *                                     of 100 experts of 3): info comes in
 *                                     pages (1000 tensors, 213 KB), and a
 *                                     dozen of them more than a socket holds
 * and starts a wd_server (host backend, 2 devices of 256 MiB, a socket of
 * its own per process, --attach-writable on, --admin-uids 65534) on a uv
 * loop that the harness
 * runs, then loads "m" (device 0), "moe" (devices 0 and 1,
 * expert-parallel) and "wide" (device 1) through wd_load_start, as a load
 * request would.
 *
 * An input is one connection:
 *   byte 0   flags
 *            bits 0-1  descriptors sent (0 to 3), as SCM_RIGHTS
 *            bits 2-3  which: 0 the checkpoints' files (1: m.safetensors;
 *                      2: moe's two shards; 3: moe's index and shards),
 *                      1 /dev/null, 2 pipes holding a few bytes,
 *                      3 m.safetensors, a directory and a memfd
 *            bit 4     the peer reads its replies as they come (else only
 *                      once it has sent everything and shut down)
 *            bit 5     patient: the peer waits until every request is
 *                      answered before it shuts its side (100 ms at most
 *                      for the whole input, or 1 s while loads or
 *                      verifies run; meanwhile the daemon's tick, 200 ms,
 *                      comes every 5 ms, so that a forced unload's wait
 *                      can end in that time)
 *            bit 6     the peer is a reader (the harness marks the daemon's
 *                      connection as uid 65534, role reader, right after the
 *                      accept; it is the daemon's own user otherwise, an
 *                      administrator)
 *            bit 7     one line at a time: each line is written alone and
 *                      the loop runs until the daemon has read it (and, when
 *                      patient, answered it) before the next
 *   byte 1   bits 0-4: the line (its index, modulo the number of lines)
 *            on whose first byte the descriptors travel; bit 5: a lease
 *            of "m" waits for its worker, as after a restart (restored
 *            with the token FZ_TOKEN, for the daemon's own uid, before the
 *            connection; ended after it if nobody took it): the input's
 *            reattach may take it, and no line may show its token unless
 *            the input holds it; bit 6: a slow
 *            reader (once it reads, at most 16 KiB a millisecond: the
 *            daemon makes a big reply faster, so its socket stays full and
 *            its queue grows); bit 7: the peer
 *            is uid 65534, an administrator by --admin-uids (not the
 *            daemon's own user: it may not load a path without its files,
 *            nor attach writable), unless bit 6 of byte 0 makes it a reader
 *   the rest the bytes the peer writes: a stream of request lines.
 * The peer then shuts down its writing side, reads and checks what comes
 * until the daemon closes the connection, and closes it. The loop is run
 * with UV_RUN_NOWAIT, polling the loop's backend fd and the peer's socket,
 * each wait bounded in time.
 *
 * Checks (abort, which libFuzzer reports as a crash):
 * - every line the daemon sends is at most WP_MAX_LINE bytes with its
 *   newline, valid UTF-8, one JSON object: a reply ({"id", "ok": bool, and
 *   "result" or "error": {"code": a name of the errno table, "message": one
 *   line of printable UTF-8}}) or an event ({"event": string, ...});
 * - a reply's or an event's "id" is null or one of the ids of the input's
 *   lines; the stream ends on a whole line, and no message carries more
 *   than WP_MAX_FDS descriptors (each one received is closed);
 * - a daemon that stopped (a shutdown: signals are not routed to it here)
 *   has sent its reply ({"stopping": true}) before it closed;
 * - the daemon closes the connection within 2 s of the peer's shutdown;
 *   once it has, it has no connection, no lease and, within 3 s, no job; no
 *   model is left loading or unloading; the policy stack is empty;
 *   wa_check finds the allocator consistent;
 * - every 50 inputs (env WD_FUZZ_CHECK_EVERY=N: every N; 0: never), with
 *   every model removed and the caches emptied, each device holds no byte
 *   (allocated and reserved) and the process has the descriptors it had at
 *   the start in that state (the same numbers, each the same thing; those
 *   libFuzzer opens itself later, its merge's control file, are left out);
 * - a shutdown stops the daemon completely: every libuv handle is closed
 *   within 5 s (what main() checks with uv_loop_close);
 * - ASan, UBSan and LSan.
 * WD_FUZZ_VERBOSE=1 prints every line the daemon sends (for triage).
 *
 * The harness runs the daemon with --max-leases-per-client 8 and
 * --max-leases-per-uid 6, so that an input reaches both bounds (a reader
 * the second, an administrator has none).
 *
 * Between inputs the harness restores the daemon: lease numbers start at 1
 * again (this file includes daemon/lease.c to reset its counter; there is
 * no lease left by then), models other than "m", "moe" and "wide" as first loaded
 * are removed, missing ones loaded again, the allocator's configuration
 * put back as it was at the start (a policy set changes it). A valid
 * shutdown is not filtered: it is run, the stop is checked to finish, and
 * the server is started again (wd_server_start on the same loop and
 * configuration) with its models. */
#include "daemon/lease.c" /* next_lease_id, reset before each input */

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <sanitizer/common_interface_defs.h>

#include "daemon/daemon.h"
#include "tests/fuzz/fuzz_check.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FZ_DIR "/tmp/weightd-fuzz"
#define CKPT_ONE FZ_DIR "/m.safetensors"
#define CKPT_MOE FZ_DIR "/moe"
#define CKPT_BIG FZ_DIR "/big.safetensors"
#define CKPT_WIDE FZ_DIR "/wide.safetensors"
#define CKPT_HUGE FZ_DIR "/huge.safetensors"
#define BIG_BYTES (16u << 20)
#define MOE_INDEX CKPT_MOE "/model.safetensors.index.json"
#define MOE_SHARD1 CKPT_MOE "/model-00001-of-00002.safetensors"
#define MOE_SHARD2 CKPT_MOE "/model-00002-of-00002.safetensors"

#define F_NFDS 0x03
#define F_KIND 0x0c
#define F_READS 0x10
#define F_PATIENT 0x20
#define F_READER 0x40
#define F_LINES 0x80
#define B_SLOW 0x40      /* in byte 1 */
#define B_OTHER_UID 0x80 /* in byte 1 */
#define B_ORPHAN 0x20    /* in byte 1 */
#define B_LINE 0x1f
#define FZ_TOKEN "0123456789abcdef0123456789abcdef"
#define SLOW_READ 16384 /* bytes a millisecond */

#define PATIENT_SECONDS 0.1  /* in all, per input, while no job runs */
#define PATIENT_MAX_SECONDS 1.0 /* with jobs running */
#define TICK_HURRY_MS 5      /* the daemon's tick while a patient peer waits */
#define CLOSE_SECONDS 2.0    /* the daemon closes a connection whose peer shut down */
#define JOBS_SECONDS 3.0     /* cancelled jobs end */
#define STOP_SECONDS 5.0     /* a stop finishes */

static uv_loop_t loop;
static wd_config conf;
static wd_server srv;
static char sock_path[108];
static wa_config base_policy;
static unsigned long inputs;
static unsigned long check_every = 50;
static bool verbose; /* env WD_FUZZ_VERBOSE: every line received, on stderr */
static uint8_t ckpt_one[1024];
static size_t ckpt_one_len;

/* The models as the harness loads them, and as the daemon holds them then. */
typedef struct want_model {
    const char *name, *path;
    int devices[2];
    size_t n_devices;
    wl_placement placement;
} want_model;

static const want_model wanted[] = {
    {"m", CKPT_ONE, {0}, 1, WL_REPLICATE},
    {"moe", CKPT_MOE, {0, 1}, 2, WL_EXPERT_PARALLEL},
    {"wide", CKPT_WIDE, {1}, 1, WL_REPLICATE},
};
#define N_WANTED (sizeof wanted / sizeof wanted[0])

/* ---- the checkpoints --------------------------------------------------------- */

typedef struct tspec {
    const char *name, *dtype;
    int ndim;
    uint64_t shape[3];
    unsigned elem;
} tspec;

static uint64_t tspec_bytes(const tspec *t)
{
    uint64_t n = t->elem;

    for (int d = 0; d < t->ndim; d++)
        n *= t->shape[d];
    return n;
}

/* A safetensors image of n tensors (in that order in the data), filled with
 * bytes that depend on the seed. */
static size_t st_image(const tspec *t, size_t n, uint8_t seed, uint8_t *out, size_t cap)
{
    char hdr[2048];
    size_t len = 0, data = 0;
    uint64_t off = 0;

    len += (size_t)snprintf(hdr + len, sizeof hdr - len, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (size_t i = 0; i < n; i++) {
        uint64_t b = tspec_bytes(&t[i]);
        len += (size_t)snprintf(hdr + len, sizeof hdr - len, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[", t[i].name,
                                t[i].dtype);
        for (int d = 0; d < t[i].ndim; d++)
            len += (size_t)snprintf(hdr + len, sizeof hdr - len, "%s%llu", d ? "," : "",
                                    (unsigned long long)t[i].shape[d]);
        len += (size_t)snprintf(hdr + len, sizeof hdr - len, "],\"data_offsets\":[%llu,%llu]}",
                                (unsigned long long)off, (unsigned long long)(off + b));
        off += b;
    }
    len += (size_t)snprintf(hdr + len, sizeof hdr - len, "}");
    while (len % 8)
        hdr[len++] = ' ';
    FZ_CHECK(len < sizeof hdr && 8 + len + off <= cap, "checkpoint image too large");
    for (int k = 0; k < 8; k++)
        out[k] = (uint8_t)((uint64_t)len >> (8 * k));
    memcpy(out + 8, hdr, len);
    for (data = 0; data < off; data++)
        out[8 + len + data] = (uint8_t)(data * 131u + seed * 7u + (data >> 5));
    return 8 + len + off;
}

/* path holds exactly data, written under a temporary name and renamed. */
static void put_file(const char *path, const void *data, size_t len)
{
    char tmp[256], *old = malloc(len + 1);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    ssize_t n;

    FZ_CHECK(old, "out of memory");
    if (fd >= 0) {
        n = pread(fd, old, len + 1, 0);
        close(fd);
        if (n == (ssize_t)len && memcmp(old, data, len) == 0) {
            free(old);
            return;
        }
    }
    free(old);
    snprintf(tmp, sizeof tmp, "%s.tmp%d", path, (int)getpid());
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    FZ_CHECK(fd >= 0 && write(fd, data, len) == (ssize_t)len && close(fd) == 0, "cannot write %s", tmp);
    FZ_CHECK(rename(tmp, path) == 0, "cannot rename %s", tmp);
}

/* A checkpoint of two tensors, U8 of a bytes then b bytes, the data a
 * hole (a sparse file). */
static void put_sparse(const char *path, uint64_t a, uint64_t b)
{
    char hdr[256], tmp[300];
    int n = snprintf(hdr, sizeof hdr,
                     "{\"w.a\":{\"dtype\":\"U8\",\"shape\":[%llu],\"data_offsets\":[0,%llu]},"
                     "\"w.b\":{\"dtype\":\"U8\",\"shape\":[%llu],\"data_offsets\":[%llu,%llu]}}",
                     (unsigned long long)a, (unsigned long long)a, (unsigned long long)b, (unsigned long long)a,
                     (unsigned long long)(a + b));
    uint8_t prefix[8 + sizeof hdr];
    off_t total;
    struct stat st;
    int fd;

    while (n % 8)
        hdr[n++] = ' ';
    total = (off_t)(8 + (uint64_t)n + a + b);
    for (int k = 0; k < 8; k++)
        prefix[k] = (uint8_t)((uint64_t)n >> (8 * k));
    memcpy(prefix + 8, hdr, (size_t)n);
    if ((fd = open(path, O_RDONLY | O_CLOEXEC)) >= 0) {
        uint8_t old[sizeof prefix];
        bool same = fstat(fd, &st) == 0 && st.st_size == total && pread(fd, old, (size_t)(8 + n), 0) == 8 + n &&
                    memcmp(old, prefix, (size_t)(8 + n)) == 0;
        close(fd);
        if (same)
            return;
    }
    snprintf(tmp, sizeof tmp, "%s.tmp%d", path, (int)getpid());
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    FZ_CHECK(fd >= 0 && write(fd, prefix, (size_t)(8 + n)) == 8 + n && ftruncate(fd, total) == 0 && close(fd) == 0,
             "cannot write %s", tmp);
    FZ_CHECK(rename(tmp, path) == 0, "cannot rename %s", tmp);
}

/* Sockets of harness processes that are gone (an abort skips atexit). */
static void remove_stale_sockets(void)
{
    DIR *d = opendir(FZ_DIR);
    struct dirent *e;

    while (d && (e = readdir(d))) {
        int pid;
        char path[300];
        if (sscanf(e->d_name, "d%d.sock", &pid) != 1 || kill(pid, 0) == 0 || errno != ESRCH)
            continue;
        snprintf(path, sizeof path, FZ_DIR "/%s", e->d_name);
        unlink(path);
    }
    if (d)
        closedir(d);
}

/* 1200 tensors of 8 bytes, with expert names. */
static void put_wide(void)
{
    size_t cap = 512u << 10, len = 0;
    char *hdr = malloc(cap);
    uint8_t *img;
    uint64_t off = 0;

    FZ_CHECK(hdr, "out of memory");
    len += (size_t)snprintf(hdr + len, cap - len, "{");
    for (int l = 0; l < 4; l++)
        for (int e = 0; e < 100; e++)
            for (int w = 1; w <= 3; w++, off += 8)
                len += (size_t)snprintf(hdr + len, cap - len,
                                        "%s\"model.layers.%d.mlp.experts.%d.w%d.weight\":{\"dtype\":\"BF16\","
                                        "\"shape\":[2,2],\"data_offsets\":[%llu,%llu]}",
                                        len > 1 ? "," : "", l, e, w, (unsigned long long)off,
                                        (unsigned long long)off + 8);
    len += (size_t)snprintf(hdr + len, cap - len, "}");
    while (len % 8)
        hdr[len++] = ' ';
    FZ_CHECK(len < cap, "header too large");
    img = malloc(8 + len + off);
    FZ_CHECK(img, "out of memory");
    for (int k = 0; k < 8; k++)
        img[k] = (uint8_t)((uint64_t)len >> (8 * k));
    memcpy(img + 8, hdr, len);
    for (uint64_t i = 0; i < off; i++)
        img[8 + len + i] = (uint8_t)(i * 17u + 5u);
    put_file(CKPT_WIDE, img, 8 + len + off);
    free(img);
    free(hdr);
}

static void write_checkpoints(void)
{
    static const tspec one[] = {
        {"embed.weight", "BF16", 2, {16, 8}, 2},
        {"layers.0.attn.q.weight", "F16", 2, {8, 8}, 2},
        {"layers.0.norm.weight", "F32", 1, {8}, 4},
        {"layers.0.scales", "U8", 1, {3}, 1},
        {"empty", "F32", 1, {0}, 4},
        {"scalar", "I32", 0, {0}, 4},
    };
    static const tspec s1[] = {
        {"model.embed_tokens.weight", "BF16", 2, {8, 4}, 2},
        {"model.layers.0.mlp.router.weight", "BF16", 2, {4, 4}, 2},
        {"model.layers.0.mlp.experts.0.w1.weight", "BF16", 2, {4, 4}, 2},
        {"model.layers.0.mlp.experts.1.w1.weight", "BF16", 2, {4, 4}, 2},
    };
    static const tspec s2[] = {
        {"model.layers.0.mlp.experts.2.w1.weight", "BF16", 2, {4, 4}, 2},
        {"model.layers.0.mlp.experts.3.w1.weight", "BF16", 2, {4, 4}, 2},
        {"model.layers.1.mlp.experts.gate_up_proj_blocks", "U8", 3, {4, 2, 8}, 1},
        {"model.layers.1.mlp.experts.gate_up_proj_scales", "F8_E8M0", 2, {4, 2}, 1},
        {"model.norm.weight", "F32", 1, {4}, 4},
    };
    uint8_t img[4096];
    char index[4096];
    size_t len, n = 0;
    uint64_t total = 0;
    int lock;

    mkdir(FZ_DIR, 0755);
    mkdir(CKPT_MOE, 0755);
    lock = open(FZ_DIR "/.lock", O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    FZ_CHECK(lock >= 0 && flock(lock, LOCK_EX) == 0, "cannot lock " FZ_DIR "/.lock");
    ckpt_one_len = st_image(one, sizeof one / sizeof one[0], 1, ckpt_one, sizeof ckpt_one);
    put_file(CKPT_ONE, ckpt_one, ckpt_one_len);
    len = st_image(s1, sizeof s1 / sizeof s1[0], 2, img, sizeof img);
    put_file(MOE_SHARD1, img, len);
    len = st_image(s2, sizeof s2 / sizeof s2[0], 3, img, sizeof img);
    put_file(MOE_SHARD2, img, len);
    for (size_t i = 0; i < sizeof s1 / sizeof s1[0]; i++)
        total += tspec_bytes(&s1[i]);
    for (size_t i = 0; i < sizeof s2 / sizeof s2[0]; i++)
        total += tspec_bytes(&s2[i]);
    n += (size_t)snprintf(index + n, sizeof index - n, "{\"metadata\":{\"total_size\":%llu},\"weight_map\":{",
                          (unsigned long long)total);
    for (size_t i = 0; i < sizeof s1 / sizeof s1[0]; i++)
        n += (size_t)snprintf(index + n, sizeof index - n, "%s\"%s\":\"model-00001-of-00002.safetensors\"",
                              i ? "," : "", s1[i].name);
    for (size_t i = 0; i < sizeof s2 / sizeof s2[0]; i++)
        n += (size_t)snprintf(index + n, sizeof index - n, ",\"%s\":\"model-00002-of-00002.safetensors\"",
                              s2[i].name);
    n += (size_t)snprintf(index + n, sizeof index - n, "}}\n");
    FZ_CHECK(n < sizeof index, "index too large");
    put_file(MOE_INDEX, index, n);
    put_sparse(CKPT_BIG, BIG_BYTES, 16);
    put_sparse(CKPT_HUGE, BIG_BYTES, 300u << 20);
    put_wide();
    remove_stale_sockets();
    flock(lock, LOCK_UN);
    close(lock);
}

/* ---- the loop ---------------------------------------------------------------- */

/* The process's descriptors: number and what each is (readlink). */
typedef struct fd_entry {
    int fd;
    char what[128];
} fd_entry;

static fd_entry fd_base[256];
static size_t n_fd_base;

static char merge_control[4096]; /* -merge_control_file, when libFuzzer was given one */

static bool fd_ignored(const char *what)
{
    /* libFuzzer's own files (the merge's control file, fork mode's logs),
     * opened after the baseline; and the listing's own directory. */
    return strncmp(what, "/tmp/libFuzzerTemp", 18) == 0 || strncmp(what, "/proc/", 6) == 0 ||
           (merge_control[0] && strcmp(what, merge_control) == 0);
}

static size_t fd_snapshot(fd_entry *out, size_t cap)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    size_t n = 0;

    while (d && (e = readdir(d))) {
        char path[300];
        ssize_t len;
        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
        FZ_CHECK(n < cap, "more than %zu descriptors open", cap);
        out[n].fd = atoi(e->d_name);
        len = readlink(path, out[n].what, sizeof out[n].what - 1);
        out[n].what[len > 0 ? len : 0] = '\0';
        /* "socket:[123]": the kind, not the inode (a restart's listening
         * socket is a new one at the same number). */
        if (strncmp(out[n].what, "socket:", 7) == 0 || strncmp(out[n].what, "pipe:", 5) == 0)
            out[n].what[strcspn(out[n].what, ":")] = '\0';
        if (!fd_ignored(out[n].what))
            n++;
    }
    if (d)
        closedir(d);
    return n;
}

static bool fd_in(const fd_entry *set, size_t n, const fd_entry *e)
{
    for (size_t i = 0; i < n; i++)
        if (set[i].fd == e->fd && strcmp(set[i].what, e->what) == 0)
            return true;
    return false;
}

/* The descriptors are those of the baseline: none more (a leak), none
 * fewer (closed twice, or closed under someone else). */
static void fd_check(void)
{
    static fd_entry now[4096];
    size_t n = fd_snapshot(now, sizeof now / sizeof now[0]), extra = 0, missing = 0;

    for (size_t i = 0; i < n; i++)
        if (!fd_in(fd_base, n_fd_base, &now[i])) {
            fprintf(stderr, "  fd %d -> %s: not open at the start\n", now[i].fd, now[i].what);
            extra++;
        }
    for (size_t i = 0; i < n_fd_base; i++)
        if (!fd_in(now, n, &fd_base[i])) {
            fprintf(stderr, "  fd %d -> %s: open at the start, closed now\n", fd_base[i].fd, fd_base[i].what);
            missing++;
        }
    FZ_CHECK(!extra && !missing, "with no model: %zu descriptors more than at the start, %zu fewer", extra, missing);
}

/* One turn of the loop: waits at most max_ms for the loop's descriptors
 * (or the peer's socket, when given), then runs what is ready. */
static void turn(int peer, int max_ms)
{
    struct pollfd p[2] = {{.fd = uv_backend_fd(&loop), .events = POLLIN}, {.fd = peer, .events = POLLIN}};
    int t = uv_backend_timeout(&loop);

    if (t < 0 || t > max_ms)
        t = max_ms;
    if (t > 0)
        poll(p, peer >= 0 ? 2 : 1, t);
    uv_run(&loop, UV_RUN_NOWAIT);
}

static bool jobs_idle(void)
{
    return !srv.jobs && !srv.jobs_running;
}

/* Runs the loop until the jobs are done, at most `seconds`. */
static bool run_jobs(double seconds)
{
    double until = wd_now() + seconds;

    while (!jobs_idle() && wd_now() < until)
        turn(-1, 5);
    return jobs_idle();
}

static void load_wanted(const want_model *w)
{
    wd_error err = {0};
    wd_model *m;

    FZ_CHECK(wd_load_start(&srv, NULL, w->path, w->name, w->devices, w->n_devices, w->placement, NULL, 0, &err) == 0,
             "loading %s: %s", w->name, wd_error_text(&err));
    FZ_CHECK(run_jobs(10), "the load of %s did not end", w->name);
    m = wd_registry_find(&srv, w->name);
    FZ_CHECK(m && m->state == WD_MODEL_READY, "%s did not load", w->name);
}

static bool is_wanted(const wd_model *m)
{
    for (size_t i = 0; i < N_WANTED; i++) {
        const want_model *w = &wanted[i];
        if (strcmp(m->name, w->name) || strcmp(m->path, w->path) || m->n_devices != w->n_devices ||
            m->placement != w->placement || memcmp(m->devices, w->devices, w->n_devices * sizeof *w->devices))
            continue;
        return true;
    }
    return false;
}

static void server_start(void)
{
    wd_error err = {0};

    FZ_CHECK(wd_server_start(&srv, &loop, &conf, &err) == 0, "wd_server_start: %s", wd_error_text(&err));
    for (size_t i = 0; i < N_WANTED; i++)
        load_wanted(&wanted[i]);
}

/* Every model removed, every cached segment given back. */
static void strip_models(void)
{
    while (srv.models)
        wd_registry_remove(&srv, srv.models, true);
    for (int d = 0; d < wa_device_count(srv.alloc); d++)
        wa_empty_cache(srv.alloc, d);
}

/* The state the next input starts from. */
static void restore(void)
{
    wd_error err = {0};

    if (srv.stopping) {
        double until = wd_now() + STOP_SECONDS;
        while ((srv.alloc || uv_loop_alive(&loop)) && wd_now() < until)
            turn(-1, 5);
        FZ_CHECK(!srv.alloc, "the stop did not finish in %.0f s", STOP_SECONDS);
        FZ_CHECK(!uv_loop_alive(&loop), "libuv handles still open after the stop");
        server_start();
    }
    FZ_CHECK(wa_policy_depth(srv.alloc) == 0, "the policy stack holds %zu entries between inputs",
             wa_policy_depth(srv.alloc));
    if (!wa_config_equal(wa_get_config(srv.alloc), &base_policy))
        FZ_CHECK(wa_set_config(srv.alloc, &base_policy) == 0, "cannot restore the allocator configuration");
    for (wd_model *m = srv.models, *next; m; m = next) {
        next = m->next;
        /* (asleep is where a sleep ends: the model is loaded again) */
        FZ_CHECK(m->state == WD_MODEL_READY || m->state == WD_MODEL_ASLEEP, "model %s left %s", m->name,
                 wd_model_state_name(m->state));
        FZ_CHECK(!m->leases, "model %s holds a lease with no connection", m->name);
        FZ_CHECK(!m->unload && !m->busy, "model %s still has an unload or a verify", m->name);
        if (!is_wanted(m) || m->state == WD_MODEL_ASLEEP)
            wd_registry_remove(&srv, m, true);
    }
    FZ_CHECK(wa_check(srv.alloc, &err) == 0, "allocator: %s", wd_error_text(&err));
    if (check_every && ++inputs % check_every == 0) {
        strip_models();
        for (int d = 0; d < wa_device_count(srv.alloc); d++) {
            wa_stats st;
            wa_get_stats(srv.alloc, d, &st);
            FZ_CHECK(st.allocated_bytes.current == 0 && st.reserved_bytes.current == 0,
                     "device %d holds %llu bytes allocated, %llu reserved with no model", d,
                     (unsigned long long)st.allocated_bytes.current, (unsigned long long)st.reserved_bytes.current);
        }
        fd_check();
    }
    for (size_t i = 0; i < N_WANTED; i++) {
        wd_model *m = wd_registry_find(&srv, wanted[i].name);
        if (!m)
            load_wanted(&wanted[i]);
    }
}

static void cleanup(void)
{
    unlink(sock_path);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    char *args[] = {"weightd", "--backend", "host", "--host-devices", "2", "--host-capacity", "256MiB",
                    "--socket", sock_path, "--log-level", "error", "--read-threads", "2",
                    "--attach-writable", "on", "--admin-uids", "65534", "--max-leases-per-client", "8",
                    "--max-leases-per-uid", "6", NULL};
    wd_error err = {0};
    const char *every = getenv("WD_FUZZ_CHECK_EVERY");
    for (int i = 1; i < *argc; i++)
        if (strncmp((*argv)[i], "-merge_control_file=", 20) == 0 && !realpath((*argv)[i] + 20, merge_control))
            snprintf(merge_control, sizeof merge_control, "%s", (*argv)[i] + 20);

    signal(SIGPIPE, SIG_IGN);
    if (every)
        check_every = strtoul(every, NULL, 10);
    verbose = getenv("WD_FUZZ_VERBOSE") && *getenv("WD_FUZZ_VERBOSE") == '1';
    write_checkpoints();
    snprintf(sock_path, sizeof sock_path, FZ_DIR "/d%d.sock", (int)getpid());
    unlink(sock_path);
    FZ_CHECK(wd_config_load(&conf, (int)(sizeof args / sizeof args[0]) - 1, args, stderr, &err) == 0,
             "wd_config_load: %s", wd_error_text(&err));
    wd_log_set_level(conf.log_level);
    FZ_CHECK(uv_loop_init(&loop) == 0, "uv_loop_init");
    server_start();
    base_policy = *wa_get_config(srv.alloc);
    atexit(cleanup);
    /* The descriptors of a daemon that has loaded and holds nothing. The
     * sanitizers' symbolizer first: libFuzzer starts it (two pipes, kept
     * open) the first time it prints a new function. */
    {
        char where[256];
        __sanitizer_symbolize_pc(__builtin_return_address(0), "%p %F %L", where, sizeof where);
    }
    strip_models();
    n_fd_base = fd_snapshot(fd_base, sizeof fd_base / sizeof fd_base[0]);
    for (size_t i = 0; i < N_WANTED; i++)
        load_wanted(&wanted[i]);
    return 0;
}

/* ---- the peer ------------------------------------------------------------------ */

typedef struct peer {
    int fd;
    bool eof;
    char *buf;               /* what came and is not a whole line yet */
    size_t len, cap;
    char **ids;              /* the input's ids, as cJSON prints them */
    size_t n_ids;
    size_t lines;            /* lines received */
    bool slow;               /* one recvmsg of at most SLOW_READ bytes a millisecond */
    double next_read;        /* slow: not before then */
    bool stop_reply;         /* {"ok": true, "result": {"stopping": true}} came */
    bool secret;             /* no line may hold FZ_TOKEN: the input never spells it */
} peer;

static bool id_known(const peer *p, const cJSON *id)
{
    char *text;
    bool ok = false;

    if (!id || cJSON_IsNull(id))
        return true;
    if (!(text = cJSON_PrintUnformatted(id)))
        return false;
    for (size_t i = 0; i < p->n_ids && !ok; i++)
        ok = strcmp(p->ids[i], text) == 0;
    free(text);
    return ok;
}

/* One line of text for people: printable UTF-8, not empty. */
static void check_text(const char *s, const char *what)
{
    size_t n = strlen(s);

    FZ_CHECK(n > 0, "%s is empty", what);
    FZ_CHECK(wd_utf8_check(s, n) == n, "%s is not valid UTF-8: %s", what, s);
    for (size_t i = 0; i < n; i++)
        FZ_CHECK((unsigned char)s[i] >= 0x20 && s[i] != 0x7f, "%s holds control byte 0x%02x: %s", what,
                 (unsigned char)s[i], s);
}

static void check_line(peer *p, const char *line, size_t len)
{
    cJSON *msg, *id, *ok, *ev;

    p->lines++;
    if (verbose)
        fprintf(stderr, "< [%zu] %.*s\n", len + 1, (int)(len > 2000 ? 2000 : len), line);
    FZ_CHECK(len + 1 <= WP_MAX_LINE, "a line of %zu bytes", len + 1);
    FZ_CHECK(wd_utf8_check(line, len) == len, "a line that is not valid UTF-8 (at byte %zu): %.300s",
             wd_utf8_check(line, len), line);
    msg = cJSON_ParseWithLength(line, len);
    FZ_CHECK(cJSON_IsObject(msg), "a line that is not a JSON object: %.300s", line);
    FZ_CHECK(!p->secret || !memmem(line, len, FZ_TOKEN, strlen(FZ_TOKEN)),
             "a line shows the token of a lease that waits for its worker: %.300s", line);
    id = cJSON_GetObjectItemCaseSensitive(msg, "id");
    ok = cJSON_GetObjectItemCaseSensitive(msg, "ok");
    ev = cJSON_GetObjectItemCaseSensitive(msg, "event");
    FZ_CHECK(id_known(p, id), "an id the input never sent: %.300s", line);
    if (ok) {
        FZ_CHECK(cJSON_IsBool(ok), "\"ok\" is not a boolean: %.300s", line);
        FZ_CHECK(id != NULL, "a reply without an id: %.300s", line);
        if (cJSON_IsTrue(ok)) {
            const cJSON *res = cJSON_GetObjectItemCaseSensitive(msg, "result");
            FZ_CHECK(!res || cJSON_IsObject(res) || cJSON_IsNull(res), "a result that is not an object: %.300s",
                     line);
            if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(res, "stopping")))
                p->stop_reply = true;
        } else {
            const cJSON *e = cJSON_GetObjectItemCaseSensitive(msg, "error");
            const cJSON *code = cJSON_GetObjectItemCaseSensitive(e, "code");
            const cJSON *text = cJSON_GetObjectItemCaseSensitive(e, "message");
            FZ_CHECK(cJSON_IsString(code) && cJSON_IsString(text), "an error without code or message: %.300s", line);
            FZ_CHECK(wd_errcode(code->valuestring) != -EPROTO || strcmp(code->valuestring, "EPROTO") == 0,
                     "error code %s is not in the table: %.300s", code->valuestring, line);
            check_text(text->valuestring, "an error message");
        }
    } else {
        FZ_CHECK(cJSON_IsString(ev), "neither a reply nor an event: %.300s", line);
    }
    cJSON_Delete(msg);
}

/* Reads what the daemon sent, closing the descriptors that came with it. */
static void peer_read(peer *p)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * WP_MAX_FDS * 2)];
        struct cmsghdr align;
    } control;

    while (!p->eof) {
        struct iovec iov;
        struct msghdr msg = {0};
        ssize_t n;

        if (p->slow) {
            double now = wd_now();
            if (now < p->next_read)
                return;
            p->next_read = now + 0.001;
        }
        if (p->cap - p->len < 65536) {
            p->cap = p->cap ? 2 * p->cap : 131072;
            FZ_CHECK(p->cap <= 4 * (size_t)WP_MAX_LINE, "%zu bytes without a newline", p->len);
            p->buf = realloc(p->buf, p->cap);
            FZ_CHECK(p->buf, "out of memory");
        }
        iov.iov_base = p->buf + p->len;
        iov.iov_len = p->cap - p->len;
        if (p->slow && iov.iov_len > SLOW_READ)
            iov.iov_len = SLOW_READ;
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof control.buf;
        n = recvmsg(p->fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); n >= 0 && c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            int fds[WP_MAX_FDS * 2];
            FZ_CHECK(count <= WP_MAX_FDS, "%zu descriptors on one message", count);
            memcpy(fds, CMSG_DATA(c), count * sizeof(int));
            for (size_t i = 0; i < count; i++)
                close(fds[i]);
        }
        if (n <= 0) {
            p->eof = true; /* 0, or ECONNRESET: the daemon closed */
            return;
        }
        FZ_CHECK(!(msg.msg_flags & MSG_CTRUNC), "descriptors cut");
        p->len += (size_t)n;
        {
            size_t start = 0;
            char *nl;
            while ((nl = memchr(p->buf + start, '\n', p->len - start))) {
                *nl = '\0';
                check_line(p, p->buf + start, (size_t)(nl - (p->buf + start)));
                start = (size_t)(nl - p->buf) + 1;
            }
            memmove(p->buf, p->buf + start, p->len - start);
            p->len -= start;
            FZ_CHECK(p->len <= WP_MAX_LINE, "%zu bytes without a newline", p->len);
        }
        if (p->slow)
            return; /* one read a turn */
    }
}

/* The daemon's side of the peer's connection, while it has one. */
static wd_conn *conn_of(uint64_t serial)
{
    for (wd_conn *c = srv.conns; c; c = c->next)
        if (c->serial == serial && !c->dead)
            return c;
    return NULL;
}

/* The descriptors the flags ask for (the caller closes them). */
static size_t make_fds(uint8_t flags, int *fds)
{
    size_t n = flags & F_NFDS;
    int kind = (flags & F_KIND) >> 2;

    for (size_t i = 0; i < n; i++) {
        int fd = -1, pp[2];
        switch (kind) {
        case 0: {
            static const char *const sets[3][3] = {
                {CKPT_ONE}, {MOE_SHARD1, MOE_SHARD2}, {MOE_INDEX, MOE_SHARD1, MOE_SHARD2}};
            fd = open(sets[n - 1][i], O_RDONLY | O_CLOEXEC);
            break;
        }
        case 1:
            fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
            break;
        case 2:
            if (pipe2(pp, O_CLOEXEC) == 0) {
                FZ_CHECK(write(pp[1], ckpt_one, 64) == 64, "pipe");
                close(pp[1]);
                fd = pp[0];
            }
            break;
        default:
            if (i == 0)
                fd = open(CKPT_ONE, O_RDONLY | O_CLOEXEC);
            else if (i == 1)
                fd = open(FZ_DIR, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            else if ((fd = memfd_create("fuzz", MFD_CLOEXEC)) >= 0)
                FZ_CHECK(write(fd, ckpt_one, ckpt_one_len) == (ssize_t)ckpt_one_len, "memfd");
            break;
        }
        FZ_CHECK(fd >= 0, "cannot make descriptor %zu of kind %d", i, kind);
        fds[i] = fd;
    }
    return n;
}

/* Writes data[0..len) (all of it, unless the daemon closes), the fds on its
 * first byte; runs the loop while the socket is full. */
static void peer_write(peer *p, const uint8_t *data, size_t len, const int *fds, size_t n_fds, bool reads)
{
    size_t sent = 0;
    double until = wd_now() + CLOSE_SECONDS, stuck_since = wd_now();

    while (sent < len && !p->eof) {
        union {
            char buf[CMSG_SPACE(sizeof(int) * 3)];
            struct cmsghdr align;
        } control;
        struct iovec iov = {(void *)(data + sent), len - sent};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
        ssize_t n;

        if (n_fds) {
            struct cmsghdr *cm;
            memset(&control, 0, sizeof control);
            msg.msg_control = control.buf;
            msg.msg_controllen = CMSG_SPACE(sizeof(int) * n_fds);
            cm = CMSG_FIRSTHDR(&msg);
            cm->cmsg_level = SOL_SOCKET;
            cm->cmsg_type = SCM_RIGHTS;
            cm->cmsg_len = CMSG_LEN(sizeof(int) * n_fds);
            memcpy(CMSG_DATA(cm), fds, sizeof(int) * n_fds);
        }
        n = sendmsg(p->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n > 0) {
            sent += (size_t)n;
            n_fds = 0; /* they went with the first byte */
            stuck_since = wd_now();
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
            return; /* EPIPE, ECONNRESET: the daemon closed it */
        /* Full. A daemon that does not read (a paused connection) waits
         * for its peer to read: a peer that does not read would wait for
         * ever, so this one starts reading after 2 ms of it. */
        if (wd_now() > until)
            return;
        if (!reads && wd_now() > stuck_since + 0.002)
            reads = true;
        turn(reads ? p->fd : -1, 1);
        if (reads)
            peer_read(p);
    }
}

/* The daemon's next tick within TICK_HURRY_MS: progress events, forced
 * unloads whose wait is over, timeouts (a tick may come at any time). */
static void hurry_tick(void)
{
    if (!srv.stopping && uv_is_active((uv_handle_t *)&srv.tick) && uv_timer_get_due_in(&srv.tick) > TICK_HURRY_MS) {
        uint64_t repeat = uv_timer_get_repeat(&srv.tick);
        uv_timer_set_repeat(&srv.tick, TICK_HURRY_MS);
        uv_timer_again(&srv.tick);
        uv_timer_set_repeat(&srv.tick, repeat);
    }
}

/* Runs the loop until cond (or `seconds` pass), reading when asked;
 * hurry: with the daemon's tick every TICK_HURRY_MS. */
static void run_until(peer *p, bool reads, double seconds, bool (*cond)(uint64_t), uint64_t serial, bool hurry)
{
    double until = wd_now() + seconds;

    while (!cond(serial) && wd_now() < until) {
        if (hurry)
            hurry_tick();
        turn(reads ? p->fd : -1, 2);
        if (reads)
            peer_read(p);
    }
}

static bool conn_gone(uint64_t serial)
{
    return conn_of(serial) == NULL;
}

static double patience, patience_max; /* the patient peer's deadlines */

/* Every request answered, or patience over (jobs running extend it). */
static bool conn_answered(uint64_t serial)
{
    wd_conn *c = conn_of(serial);
    double now = wd_now();

    return !c || !c->pending || now >= patience_max || (now >= patience && !srv.jobs_running);
}

/* The daemon has read every byte sent so far (or is not reading now). */
static bool conn_drained(uint64_t serial)
{
    wd_conn *c = conn_of(serial);
    int unread = 0;

    if (!c || c->closing || c->broken || c->wr.queued >= (1u << 20) || c->wr.queued_fds >= 256)
        return true; /* not reading now (server.c's conn_paused) */
    return ioctl(c->fd, FIONREAD, &unread) == 0 && unread == 0;
}

static void collect_ids(peer *p, const uint8_t *data, size_t len)
{
    size_t start = 0;

    while (start < len) {
        const uint8_t *nl = memchr(data + start, '\n', len - start);
        size_t end = nl ? (size_t)(nl - data) : len;
        cJSON *msg = cJSON_ParseWithLength((const char *)data + start, end - start);
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(msg, "id");
        char *text;
        if (id && (text = cJSON_PrintUnformatted(id))) {
            p->ids = realloc(p->ids, (p->n_ids + 1) * sizeof *p->ids);
            FZ_CHECK(p->ids, "out of memory");
            p->ids[p->n_ids++] = text;
        }
        cJSON_Delete(msg);
        start = end + 1;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    uint8_t flags, fd_line;
    const uint8_t *stream;
    size_t len, n_lines = 0, fd_at = 0, n_fds, line = 0;
    int fds[3];
    peer p = {.fd = -1};
    bool reads, patient;
    uint64_t serial;
    wd_conn *c;
    double until;

    if (size < 2)
        return 0;
    flags = data[0];
    fd_line = data[1] & B_LINE;
    p.slow = data[1] & B_SLOW;
    stream = data + 2;
    len = size - 2;
    reads = flags & F_READS;
    patient = flags & F_PATIENT;
    next_lease_id = 1;
    if (data[1] & B_ORPHAN) {
        wd_model *m = wd_registry_find(&srv, "m");
        wd_error err = {0};
        FZ_CHECK(m && wd_lease_restore(&srv, m, FZ_TOKEN, geteuid(), getpid(), "fuzz-worker", -1, false, &err) == 0,
                 "cannot restore a lease: %s", wd_error_text(&err));
        /* Only a JSON u-escape spells hex digits the input does not hold. */
        p.secret = !memmem(stream, len, FZ_TOKEN, strlen(FZ_TOKEN)) && !memmem(stream, len, "\\u", 2);
    }
    patience = wd_now() + PATIENT_SECONDS;
    patience_max = wd_now() + PATIENT_MAX_SECONDS;

    /* Where the descriptors go: the first byte of line fd_line. */
    for (size_t i = 0; i < len; i++)
        if (stream[i] == '\n' || i + 1 == len)
            n_lines++;
    if (n_lines) {
        size_t want = fd_line % n_lines;
        for (size_t i = 0; i < len && line < want; i++)
            if (stream[i] == '\n' && ++line == want)
                fd_at = i + 1;
    }
    collect_ids(&p, stream, len);

    p.fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    FZ_CHECK(p.fd >= 0, "socket");
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", sock_path);
    FZ_CHECK(connect(p.fd, (struct sockaddr *)&addr, sizeof addr) == 0, "connect: %s", strerror(errno));
    until = wd_now() + CLOSE_SECONDS;
    while (!srv.conns && wd_now() < until)
        turn(-1, 2);
    FZ_CHECK(srv.conns && srv.n_conns == 1, "the daemon did not accept the connection");
    c = srv.conns;
    serial = c->serial;
    if (flags & F_READER || data[1] & B_OTHER_UID) {
        c->uid = 65534;
        c->gid = 65534;
        c->role = flags & F_READER ? WD_ROLE_READER : WD_ROLE_ADMIN;
    }

    n_fds = make_fds(flags, fds);
    if (!len && n_fds) { /* descriptors need a byte to ride on */
        static const uint8_t nl = '\n';
        stream = &nl;
        len = 1;
    }
    if (flags & F_LINES) {
        size_t start = 0;
        while (start < len && !p.eof) {
            const uint8_t *nl = memchr(stream + start, '\n', len - start);
            size_t end = nl ? (size_t)(nl - stream) + 1 : len;
            bool here = n_fds && start == fd_at;
            peer_write(&p, stream + start, end - start, fds, here ? n_fds : 0, reads);
            run_until(&p, reads, 0.05, conn_drained, serial, false);
            if (patient)
                run_until(&p, reads, PATIENT_MAX_SECONDS, conn_answered, serial, true);
            start = end;
        }
    } else {
        peer_write(&p, stream, fd_at, NULL, 0, reads);
        peer_write(&p, stream + fd_at, len - fd_at, fds, n_fds, reads);
        run_until(&p, reads, 0.05, conn_drained, serial, false);
        if (patient)
            run_until(&p, reads, PATIENT_MAX_SECONDS, conn_answered, serial, true);
    }
    for (size_t i = 0; i < n_fds; i++)
        close(fds[i]);

    shutdown(p.fd, SHUT_WR);
    if (!reads) /* let it answer into a socket nobody reads, for a while */
        run_until(&p, false, 0.001, conn_gone, serial, false);
    run_until(&p, true, CLOSE_SECONDS, conn_gone, serial, false);
    FZ_CHECK(conn_gone(serial), "the daemon kept the connection %.1f s after its peer shut down", CLOSE_SECONDS);
    /* What it sent before it closed, to the end. */
    until = wd_now() + CLOSE_SECONDS;
    while (!p.eof && wd_now() < until) {
        turn(p.fd, 2);
        peer_read(&p);
    }
    FZ_CHECK(p.eof, "no end of stream after the daemon closed the connection");
    FZ_CHECK(!srv.stopping || p.stop_reply, "the daemon stopped without sending the shutdown's reply (%zu lines came)",
             p.lines);
    FZ_CHECK(p.len == 0, "the stream ends in %zu bytes of a line", p.len);
    close(p.fd);

    FZ_CHECK(srv.n_conns == 0 && !srv.conns, "%zu connections left", srv.n_conns);
    for (wd_model *m = srv.models; m; m = m->next) {
        for (const wd_lease *l = m->leases; l; l = l->model_next)
            FZ_CHECK(!l->conn && strcmp(l->token, FZ_TOKEN) == 0, "model %s holds a lease after its connection closed",
                     m->name);
        wd_leases_end_orphans(&srv, m, "the input ended"); /* the one planted, not taken */
    }
    FZ_CHECK(run_jobs(JOBS_SECONDS), "jobs still there %.0f s after their connection closed", JOBS_SECONDS);

    for (size_t i = 0; i < p.n_ids; i++)
        free(p.ids[i]);
    free(p.ids);
    free(p.buf);
    restore();
    return 0;
}
