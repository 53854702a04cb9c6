/* pipebw: weightd's read pipeline with nothing of weightd in it, to tell its
 * own overheads from the machine's. N threads take 16 MiB pieces of the files
 * in file order and pread each into one of two buffers of their own:
 *   -m read    plain buffers, bytes thrown away: the read limit
 *   -m pinned  pinned buffers (cuMemHostAlloc), bytes thrown away
 *   -m copy    pinned buffers, each piece copied to the GPU on the buffer's
 *              own stream while the thread reads the next (weightd's scheme)
 *   -m map     no read at all: the files are mmap()ed, each piece is pinned
 *              where it lies in the page cache (cuMemHostRegister READ_ONLY),
 *              copied to the GPU, and unpinned once its copy is done
 *   -M N       with -m copy: N of the threads work as -m map
 *   pipebw [-t THREADS] [-s PIECE_KIB] [-m MODE] [-M N] FILE...
 *              prints bytes, seconds and GB/s (and, for map, the seconds
 *              all threads together spent pinning and unpinning) */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "bench/bench_cuda.h"

static size_t piece_size = 16u << 20;

typedef struct file { int fd; long long pieces; off_t size; char *map; } file;
static file *files;
static int n_files;
static long long total_pieces;
static _Atomic long long next_piece, bytes_read, pin_ns, unpin_ns;
static const wd_cuda *cu;
static CUcontext ctx;
static enum { READ, PINNED, COPY, MAP } mode = READ;
static const char *const mode_names[] = {"read", "pinned", "copy", "map"};


/* A thread's buffers, streams and device memory, made before the clock starts. */
typedef struct worker {
    void *buf[2];
    CUstream stream[2];
    CUdeviceptr dst;
    void *pinned[2]; /* map: the piece each stream is copying from */
    bool map;        /* this thread works as -m map (all of them, or -M of a copy run) */
} worker;

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* map: waits for the slot's copy, then unpins its piece. */
static void map_slot_done(worker *w, int k)
{
    if (!w->pinned[k])
        return;
    CHECK(cu->cuStreamSynchronize(w->stream[k]));
    long long t = now_ns();
    CHECK(cu->cuMemHostUnregister(w->pinned[k]));
    atomic_fetch_add(&unpin_ns, now_ns() - t);
    w->pinned[k] = NULL;
}

static void map_piece(worker *w, int k, const file *f, long long p)
{
    off_t off = (off_t)p * (off_t)piece_size;
    size_t n = (size_t)(f->size - off < (off_t)piece_size ? f->size - off : (off_t)piece_size);
    long long t;

    map_slot_done(w, k);
    t = now_ns();
    CHECK(cu->cuMemHostRegister(f->map + off, n, CU_MEMHOSTREGISTER_READ_ONLY));
    atomic_fetch_add(&pin_ns, now_ns() - t);
    CHECK(cu->cuMemcpyHtoDAsync(w->dst, f->map + off, n, w->stream[k]));
    w->pinned[k] = f->map + off;
    atomic_fetch_add(&bytes_read, (long long)n);
}

static void worker_init(worker *w)
{
    for (int i = 0; i < 2; i++) {
        if (mode == READ) {
            w->buf[i] = malloc(piece_size);
            memset(w->buf[i], 0, piece_size); /* first touch outside the clock */
        } else if (mode != MAP) { /* map reads nothing into buffers */
            CHECK(cu->cuMemHostAlloc(&w->buf[i], piece_size, CU_MEMHOSTALLOC_PORTABLE));
        }
        if (mode == COPY || mode == MAP)
            CHECK(cu->cuStreamCreate(&w->stream[i], CU_STREAM_NON_BLOCKING));
    }
    if (mode == COPY || mode == MAP)
        CHECK(cu->cuMemAlloc(&w->dst, piece_size));
}

static void *reader(void *arg)
{
    worker *w = arg;
    int k = 0;

    if (mode != READ)
        CHECK(cu->cuCtxSetCurrent(ctx));
    for (;;) {
        long long i = atomic_fetch_add(&next_piece, 1), p = i;
        int f = 0;
        if (i >= total_pieces)
            break;
        while (p >= files[f].pieces)
            p -= files[f++].pieces;
        if (w->map) {
            map_piece(w, k, &files[f], p);
            k ^= 1;
            continue;
        }
        if (mode == COPY)
            CHECK(cu->cuStreamSynchronize(w->stream[k]));
        ssize_t n = pread(files[f].fd, w->buf[k], piece_size, (off_t)p * piece_size);
        if (n < 0) {
            perror("pread");
            exit(1);
        }
        if (mode == COPY && n > 0)
            CHECK(cu->cuMemcpyHtoDAsync(w->dst, w->buf[k], (size_t)n, w->stream[k]));
        atomic_fetch_add(&bytes_read, n);
        k ^= 1;
    }
    for (int i = 0; mode == COPY && i < 2; i++)
        CHECK(cu->cuStreamSynchronize(w->stream[i]));
    for (int i = 0; w->map && i < 2; i++)
        map_slot_done(w, i);
    /* Buffers, streams and device memory go with the process. */
    return NULL;
}

int main(int argc, char **argv)
{
    int threads = 16, map_threads = 0, opt;
    struct timespec a, b;
    pthread_t t[256];
    static worker w[256];

    while ((opt = getopt(argc, argv, "t:m:s:M:")) != -1) {
        int m = 0;
        if (opt == 'M')
            map_threads = atoi(optarg);
        else if (opt == 't')
            threads = atoi(optarg);
        else if (opt == 's')
            piece_size = (size_t)atoi(optarg) << 10;
        else if (opt == 'm') {
            while (m < 4 && strcmp(optarg, mode_names[m]) != 0)
                m++;
            if (m == 4)
                threads = 0;
            else
                mode = m;
        } else
            threads = 0;
    }
    if (threads < 1 || threads > 256 || piece_size == 0 || optind >= argc) {
        fprintf(stderr, "usage: pipebw [-t THREADS] [-s PIECE_KIB] [-m read|pinned|copy|map] [-M N] FILE...\n");
        return 2;
    }
    if (mode != READ)
        cu = bench_cuda_init(&ctx);
    n_files = argc - optind;
    files = calloc((size_t)n_files, sizeof *files);
    for (int i = 0; i < n_files; i++) {
        struct stat st;
        if ((files[i].fd = open(argv[optind + i], O_RDONLY)) < 0 || fstat(files[i].fd, &st) < 0) {
            perror(argv[optind + i]);
            return 1;
        }
        files[i].size = st.st_size;
        files[i].pieces = (st.st_size + (off_t)piece_size - 1) / (off_t)piece_size;
        total_pieces += files[i].pieces;
    }
    if (mode == MAP)
        map_threads = threads;
    for (int i = 0; i < threads; i++) {
        worker_init(&w[i]);
        w[i].map = i < map_threads;
    }
    clock_gettime(CLOCK_MONOTONIC, &a);
    /* Mapping is part of the scheme's cost; it is cheap (no pages touched). */
    for (int i = 0; map_threads && i < n_files; i++)
        if ((files[i].map = mmap(NULL, (size_t)files[i].size, PROT_READ, MAP_SHARED, files[i].fd, 0)) == MAP_FAILED) {
            perror("mmap");
            return 1;
        }
    for (int i = 0; i < threads; i++)
        pthread_create(&t[i], NULL, reader, &w[i]);
    for (int i = 0; i < threads; i++)
        pthread_join(t[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double secs = (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) * 1e-9;
    printf("{\"mode\": \"%s\", \"threads\": %d, \"piece_kib\": %zu, \"bytes\": %lld, \"seconds\": %.4f, "
           "\"gbps\": %.3f, \"pin_s\": %.4f, \"unpin_s\": %.4f}\n",
           mode_names[mode], threads, piece_size >> 10, (long long)bytes_read, secs, (double)bytes_read / secs / 1e9,
           (double)pin_ns * 1e-9, (double)unpin_ns * 1e-9);
    return 0;
}
