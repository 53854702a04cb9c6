/* readbw: the storage (or page-cache) limit, measured on the files a load
 * reads: N threads pread them in 16 MiB pieces, taken in file order, into
 * buffers of their own, and throw the bytes away. No weightd code involved.
 *   readbw [-t THREADS] FILE...      prints bytes, seconds and GB/s */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PIECE (16u << 20)

typedef struct file { int fd; long long pieces; } file;
static file *files;
static int n_files;
static long long total_pieces;
static _Atomic long long next_piece, bytes_read;

static void *reader(void *arg)
{
    char *buf = malloc(PIECE);
    (void)arg;
    for (;;) {
        long long i = atomic_fetch_add(&next_piece, 1), k = i;
        int f = 0;
        if (i >= total_pieces)
            break;
        while (k >= files[f].pieces)
            k -= files[f++].pieces;
        ssize_t n = pread(files[f].fd, buf, PIECE, (off_t)k * PIECE);
        if (n < 0) {
            perror("pread");
            exit(1);
        }
        atomic_fetch_add(&bytes_read, n);
    }
    free(buf);
    return NULL;
}

int main(int argc, char **argv)
{
    int threads = 16, first = 1;
    struct timespec a, b;
    pthread_t t[256];

    if (argc > 2 && strcmp(argv[1], "-t") == 0) {
        threads = atoi(argv[2]);
        first = 3;
    }
    if (threads < 1 || threads > 256 || first >= argc) {
        fprintf(stderr, "usage: readbw [-t THREADS] FILE...\n");
        return 2;
    }
    n_files = argc - first;
    files = calloc((size_t)n_files, sizeof *files);
    for (int i = 0; i < n_files; i++) {
        struct stat st;
        if ((files[i].fd = open(argv[first + i], O_RDONLY)) < 0 || fstat(files[i].fd, &st) < 0) {
            perror(argv[first + i]);
            return 1;
        }
        files[i].pieces = (st.st_size + PIECE - 1) / PIECE;
        total_pieces += files[i].pieces;
    }
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < threads; i++)
        pthread_create(&t[i], NULL, reader, NULL);
    for (int i = 0; i < threads; i++)
        pthread_join(t[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double secs = (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) * 1e-9;
    printf("{\"bytes\": %lld, \"seconds\": %.4f, \"gbps\": %.3f, \"threads\": %d}\n", (long long)bytes_read, secs,
           (double)bytes_read / secs / 1e9, threads);
    return 0;
}
