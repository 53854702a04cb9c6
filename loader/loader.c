/* The read path. Each shard is opened once and read in file order, in
 * chunks, so progress moves smoothly and a cancel is seen within one chunk.
 * A segment the daemon can address (host backend) is read into directly;
 * others go through a bounce buffer and the backend's copy. */
#include "loader/loader.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define DEFAULT_CHUNK (16u << 20)

static int read_full(int fd, void *buf, size_t len, uint64_t off, const char *path, wd_error *err)
{
    size_t got = 0;

    while (got < len) {
        ssize_t n = pread(fd, (char *)buf + got, len - got, (off_t)(off + got));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return wd_error_set(err, -errno, "%s: read at byte %llu: %s", path, (unsigned long long)(off + got),
                                strerror(errno));
        if (n == 0)
            return wd_error_set(err, -EIO, "%s: file ends at byte %llu, before the data its header describes",
                                path, (unsigned long long)(off + got));
        got += (size_t)n;
    }
    return 0;
}

static uint64_t first_difference(const unsigned char *a, const unsigned char *b, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (a[i] != b[i])
            return i;
    return len;
}

int wl_job_run(wl_job *job)
{
    const wl_checkpoint *ck = job->ckpt;
    size_t chunk = job->chunk_size ? job->chunk_size : DEFAULT_CHUNK;
    unsigned char *bounce = NULL, *held = NULL;
    int fd = -1, rc = 0;
    uint32_t open_shard = UINT32_MAX;

    bounce = malloc(chunk);
    if (job->mode == WL_VERIFY)
        held = malloc(chunk);
    if (!bounce || (job->mode == WL_VERIFY && !held)) {
        rc = wd_error_set(&job->err, -ENOMEM, "out of host memory for a %zu-byte buffer", chunk);
        goto out;
    }
    for (size_t i = 0; i < ck->n_tensors; i++) {
        const wl_tensor *t = &ck->tensors[i];
        const wl_shard *sh = &ck->shards[t->shard];
        const wl_dest *d = &job->dest[i];
        uint64_t size = st_tensor_nbytes(t->st), done = 0;
        bool differs = false;

        if (t->shard != open_shard) {
            struct stat st;
            if (fd >= 0)
                close(fd);
            /* O_NONBLOCK: a shard replaced by a FIFO must not hang the load. */
            fd = open(sh->path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
            if (fd < 0) {
                rc = wd_error_set(&job->err, -errno, "%s: %s", sh->path, strerror(errno));
                goto out;
            }
            if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
                rc = wd_error_set(&job->err, -EINVAL, "%s: not a regular file", sh->path);
                goto out;
            }
            if ((uint64_t)st.st_size != sh->file_size) {
                rc = wd_error_set(&job->err, -EIO, "%s: the file changed size since its header was read "
                                  "(%llu bytes, was %llu)", sh->path, (unsigned long long)st.st_size,
                                  (unsigned long long)sh->file_size);
                goto out;
            }
            posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
            open_shard = t->shard;
        }
        while (done < size) {
            size_t n = size - done > chunk ? chunk : (size_t)(size - done);
            uint64_t file_off = sh->st.data_offset + t->st->begin + done;
            uint64_t seg_off = d->offset + done;

            if (atomic_load_explicit(&job->cancel, memory_order_relaxed)) {
                rc = wd_error_set(&job->err, -ECANCELED, "cancelled");
                goto out;
            }
            if (job->mode == WL_LOAD && d->mem->host) {
                rc = read_full(fd, (char *)d->mem->host + seg_off, n, file_off, sh->path, &job->err);
            } else {
                rc = read_full(fd, bounce, n, file_off, sh->path, &job->err);
                if (!rc && job->mode == WL_LOAD)
                    rc = job->backend->write(job->backend, d->device, d->mem, seg_off, bounce, n, &job->err);
            }
            if (!rc && job->mode == WL_VERIFY && !differs) {
                const unsigned char *have = d->mem->host ? (const unsigned char *)d->mem->host + seg_off : held;
                uint64_t at;
                if (!d->mem->host)
                    rc = job->backend->read(job->backend, d->device, d->mem, seg_off, held, n, &job->err);
                if (!rc && (at = first_difference(bounce, have, n)) < n) {
                    differs = true;
                    if (!job->mismatched_tensors)
                        snprintf(job->first_mismatch, sizeof job->first_mismatch,
                                 "tensor \"%s\": first difference at byte %llu", t->st->name,
                                 (unsigned long long)(done + at));
                    job->mismatched_tensors++;
                }
            }
            if (rc) {
                wd_error_prefix(&job->err, "tensor \"%s\"", t->st->name);
                goto out;
            }
            done += n;
            atomic_fetch_add_explicit(&job->bytes_done, n, memory_order_relaxed);
        }
        atomic_fetch_add_explicit(&job->tensors_done, 1, memory_order_relaxed);
    }
out:
    if (fd >= 0)
        close(fd);
    free(bounce);
    free(held);
    return rc;
}
