/* pipebw: weightd's read pipeline with nothing of weightd in it, to tell its
 * own overheads from the machine's. N threads take 16 MiB pieces of the files
 * in file order and pread each into one of two buffers of their own:
 *   -m read    plain buffers, bytes thrown away (what readbw measures)
 *   -m pinned  pinned buffers (cuMemHostAlloc), bytes thrown away
 *   -m copy    pinned buffers, each piece copied to the GPU on the buffer's
 *              own stream while the thread reads the next (weightd's scheme)
 *   pipebw [-t THREADS] [-m MODE] FILE...   prints bytes, seconds and GB/s */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "allocator/cuda_driver.h"

#define PIECE (16u << 20)

typedef struct file { int fd; long long pieces; } file;
static file *files;
static int n_files;
static long long total_pieces;
static _Atomic long long next_piece, bytes_read;
static const wa_cuda *cu;
static CUcontext ctx;
static enum { READ, PINNED, COPY } mode = READ;

#define CHECK(x)                                                      \
    do {                                                              \
        CUresult r_ = (x);                                            \
        if (r_ != CUDA_SUCCESS) {                                     \
            fprintf(stderr, "%s failed: %d\n", #x, (int)r_);          \
            exit(1);                                                  \
        }                                                             \
    } while (0)

/* A thread's buffers, streams and device memory, made before the clock starts. */
typedef struct worker {
    void *buf[2];
    CUstream stream[2];
    CUdeviceptr dst;
} worker;

static void worker_init(worker *w)
{
    for (int i = 0; i < 2; i++) {
        if (mode == READ) {
            w->buf[i] = malloc(PIECE);
            memset(w->buf[i], 0, PIECE); /* first touch outside the clock */
        } else {
            CHECK(cu->cuMemHostAlloc(&w->buf[i], PIECE, CU_MEMHOSTALLOC_PORTABLE));
        }
        if (mode == COPY)
            CHECK(cu->cuStreamCreate(&w->stream[i], CU_STREAM_NON_BLOCKING));
    }
    if (mode == COPY)
        CHECK(cu->cuMemAlloc(&w->dst, PIECE));
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
        if (mode == COPY)
            CHECK(cu->cuStreamSynchronize(w->stream[k]));
        ssize_t n = pread(files[f].fd, w->buf[k], PIECE, (off_t)p * PIECE);
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
    /* Buffers, streams and device memory go with the process. */
    return NULL;
}

int main(int argc, char **argv)
{
    int threads = 16, opt;
    struct timespec a, b;
    pthread_t t[256];
    worker w[256];
    wd_error err = {0};

    while ((opt = getopt(argc, argv, "t:m:")) != -1) {
        if (opt == 't')
            threads = atoi(optarg);
        else if (opt == 'm' && strcmp(optarg, "read") == 0)
            mode = READ;
        else if (opt == 'm' && strcmp(optarg, "pinned") == 0)
            mode = PINNED;
        else if (opt == 'm' && strcmp(optarg, "copy") == 0)
            mode = COPY;
        else
            threads = 0;
    }
    if (threads < 1 || threads > 256 || optind >= argc) {
        fprintf(stderr, "usage: pipebw [-t THREADS] [-m read|pinned|copy] FILE...\n");
        return 2;
    }
    if (mode != READ) {
        CUdevice dev;
        if (wa_cuda_load(&cu, &err)) {
            fprintf(stderr, "%s\n", err.msg);
            return 1;
        }
        CHECK(cu->cuDeviceGet(&dev, 0));
        CHECK(cu->cuDevicePrimaryCtxRetain(&ctx, dev));
        CHECK(cu->cuCtxSetCurrent(ctx));
    }
    n_files = argc - optind;
    files = calloc((size_t)n_files, sizeof *files);
    for (int i = 0; i < n_files; i++) {
        struct stat st;
        if ((files[i].fd = open(argv[optind + i], O_RDONLY)) < 0 || fstat(files[i].fd, &st) < 0) {
            perror(argv[optind + i]);
            return 1;
        }
        files[i].pieces = (st.st_size + PIECE - 1) / PIECE;
        total_pieces += files[i].pieces;
    }
    for (int i = 0; i < threads; i++)
        worker_init(&w[i]);
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < threads; i++)
        pthread_create(&t[i], NULL, reader, &w[i]);
    for (int i = 0; i < threads; i++)
        pthread_join(t[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double secs = (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) * 1e-9;
    printf("{\"mode\": \"%s\", \"threads\": %d, \"bytes\": %lld, \"seconds\": %.4f, \"gbps\": %.3f}\n",
           mode == READ ? "read" : mode == PINNED ? "pinned" : "copy", threads, (long long)bytes_read, secs,
           (double)bytes_read / secs / 1e9);
    return 0;
}
