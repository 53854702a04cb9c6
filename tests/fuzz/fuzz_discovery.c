/* fuzz_discovery: libFuzzer harness for checkpoint discovery (checkpoint.c).
 *
 * The input is a tiny archive of at most FZ_MAX_FILES files, each entry:
 *
 *     flags    1 byte     bit 0: an index (name gets ".safetensors.index.json"),
 *                         else a shard (name gets ".safetensors")
 *     name_len 1 byte     taken modulo 33: 0..32
 *     name     name_len bytes, each mapped into [a-z0-9._-] (bytes already
 *                         in that set are kept; others become
 *                         FZ_NAME_CHARS[byte % 39])
 *     data_len 2 bytes    little endian, cut to what is left of the input
 *     data     data_len bytes
 *
 * A truncated entry header ends the archive. The suffix is not doubled when
 * the mapped name already ends with it; a later entry of the same name
 * replaces the earlier one. tests/e2e/test_corpus.py unpacks the same format
 * (keep the two in step).
 *
 * Each iteration writes the files into a fresh temporary directory, calls
 * wl_checkpoint_open on the directory and on each file, checks every
 * successful result (shards valid, total_bytes the sum, every tensor
 * findable, each shard and the chosen index openable alone with the same
 * tensors), closes, and removes the directory.
 *
 * The directory lives under $FUZZ_TMPDIR, else /dev/shm, else $TMPDIR, else
 * /tmp, and is gone after each iteration (a crash leaves its files behind,
 * as evidence). */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loader/checkpoint.h"
#include "tests/fuzz/fuzz_check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FZ_MAX_FILES 8
#define FZ_MAX_NAME 32
#define FZ_NAME_CHARS "abcdefghijklmnopqrstuvwxyz0123456789._-"
#define FZ_SHARD_SUFFIX ".safetensors"
#define FZ_INDEX_SUFFIX ".safetensors.index.json"

typedef struct fz_file {
    char name[FZ_MAX_NAME + sizeof FZ_INDEX_SUFFIX];
    const uint8_t *data;
    size_t len;
} fz_file;

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* The archive's entries, the last one of each name kept. */
static size_t unpack(const uint8_t *p, size_t size, fz_file *files)
{
    static const char chars[] = FZ_NAME_CHARS;
    size_t n = 0, i = 0;

    for (int entry = 0; entry < FZ_MAX_FILES && size - i >= 4; entry++) {
        fz_file f;
        int index = p[i] & 1;
        size_t nl = p[i + 1] % (FZ_MAX_NAME + 1), k, dl;

        i += 2;
        if (size - i < nl + 2)
            break;
        for (k = 0; k < nl; k++) {
            uint8_t c = p[i + k];
            f.name[k] = memchr(chars, c, sizeof chars - 1) && c ? (char)c
                                                                : chars[c % (sizeof chars - 1)];
        }
        f.name[nl] = '\0';
        i += nl;
        if (!ends_with(f.name, index ? FZ_INDEX_SUFFIX : FZ_SHARD_SUFFIX))
            strcat(f.name, index ? FZ_INDEX_SUFFIX : FZ_SHARD_SUFFIX);
        dl = (size_t)p[i] | (size_t)p[i + 1] << 8;
        i += 2;
        if (dl > size - i)
            dl = size - i;
        f.data = p + i;
        f.len = dl;
        i += dl;
        for (k = 0; k < n; k++)
            if (strcmp(files[k].name, f.name) == 0)
                break;
        files[k] = f;
        if (k == n)
            n++;
    }
    return n;
}

/* Where the temporary directories go; chosen once. */
static const char *tmp_base(void)
{
    static const char *base;
    const char *dirs[] = {getenv("FUZZ_TMPDIR"), "/dev/shm", getenv("TMPDIR"), "/tmp"};

    for (size_t i = 0; !base && i < sizeof dirs / sizeof *dirs; i++)
        if (dirs[i] && *dirs[i] && strlen(dirs[i]) < 200 && access(dirs[i], W_OK) == 0)
            base = dirs[i];
    if (!base)
        fz_fail(__FILE__, __LINE__, NULL, "no writable temporary directory");
    return base;
}

static void check_failed(int rc, const wl_checkpoint *c, const wd_error *e, const char *path)
{
    static const wl_checkpoint zero;

    FZ_CHECK(rc < 0, "rc %d", rc);
    FZ_CHECK(rc != -EINVAL, "-EINVAL for %s: %s", path, e->msg);
    FZ_CHECK(memcmp(c, &zero, sizeof zero) == 0, "checkpoint not zeroed after rc %d", rc);
    FZ_CHECK(e->code == rc, "error code %d, rc %d", e->code, rc);
    fz_check_msg(e->msg, sizeof e->msg);
}

/* A shard of a valid checkpoint read again alone: the same tensors. An
 * index may name any file as a shard, "x.json" too, which
 * wl_checkpoint_open would take for an index: so st_read always, and
 * wl_checkpoint_open where the name does not end in ".json". */
static void check_shard_alone(const wl_shard *s)
{
    wl_checkpoint one;
    wd_error e = {0};
    st_file f;
    char msg[512];
    int rc = st_read(s->path, &f, msg, sizeof msg);

    FZ_CHECK(rc == 0, "shard %s of a valid checkpoint fails st_read: %s", s->path, msg);
    fz_check_same(&s->st, &f);
    st_free(&f);
    if (ends_with(s->path, ".json"))
        return;
    rc = wl_checkpoint_open(s->path, &one, &e);
    FZ_CHECK(rc == 0, "shard %s of a valid checkpoint fails alone: %s", s->path, e.msg);
    FZ_CHECK(one.n_shards == 1 && !one.index_path, "%zu shards", one.n_shards);
    fz_check_same(&s->st, &one.shards[0].st);
    wl_checkpoint_close(&one);
}

static void check_ok(const wl_checkpoint *c, const char *path)
{
    uint64_t total = 0;
    size_t k = 0;
    struct stat sb;

    FZ_CHECK(c->path && strcmp(c->path, path) == 0, "path %s, opened %s", c->path, path);
    FZ_CHECK(c->n_shards >= 1 && c->shards, "%zu shards", c->n_shards);
    FZ_CHECK(!c->index_path || stat(c->index_path, &sb) == 0, "index %s missing", c->index_path);
    for (size_t i = 0; i < c->n_shards; i++) {
        const wl_shard *s = &c->shards[i];

        FZ_CHECK(s->path != NULL, "shard %zu has no path", i);
        FZ_CHECK(stat(s->path, &sb) == 0 && S_ISREG(sb.st_mode), "shard %s is not a file", s->path);
        FZ_CHECK((uint64_t)sb.st_size == s->file_size, "shard %s: file_size %llu, stat %llu",
                 s->path, (unsigned long long)s->file_size, (unsigned long long)sb.st_size);
        FZ_CHECK(s->file_size == s->st.data_offset + s->st.data_len, "shard %s: sizes", s->path);
        if (i)
            FZ_CHECK(strcmp(c->shards[i - 1].path, s->path) < 0, "shards out of name order");
        fz_check_file(&s->st, s->st.header_len, s->st.data_len);
        /* The flat list: shard by shard, each in data order. */
        for (size_t j = 0; j < s->st.n_tensors; j++, k++) {
            FZ_CHECK(k < c->n_tensors, "more shard tensors than n_tensors %zu", c->n_tensors);
            FZ_CHECK(c->tensors[k].shard == i && c->tensors[k].st == &s->st.tensors[j],
                     "tensor %zu is not shard %zu's tensor %zu", k, i, j);
            total += st_tensor_nbytes(&s->st.tensors[j]);
        }
    }
    FZ_CHECK(k == c->n_tensors, "%zu tensors in shards, n_tensors %zu", k, c->n_tensors);
    FZ_CHECK(total == c->total_bytes, "total_bytes %llu, sum %llu",
             (unsigned long long)c->total_bytes, (unsigned long long)total);
    for (size_t i = 0; i < c->n_tensors; i++) {
        const wl_tensor *t = &c->tensors[i];
        FZ_CHECK(t->shard < c->n_shards, "tensor %zu: shard %u", i, t->shard);
        FZ_CHECK(wl_checkpoint_find(c, t->st->name) == t, "wl_checkpoint_find(\"%.100s\") misses",
                 t->st->name);
    }
    if (c->n_tensors == 0)
        FZ_CHECK(wl_checkpoint_find(c, "x") == NULL, "a tensor found in an empty checkpoint");

    /* Every shard of a valid checkpoint is valid on its own. */
    for (size_t i = 0; i < c->n_shards; i++)
        check_shard_alone(&c->shards[i]);
    /* A directory that chose an index: the index alone gives the same. */
    if (c->index_path && strcmp(c->index_path, path) != 0) {
        wl_checkpoint again;
        wd_error e = {0};
        int rc = wl_checkpoint_open(c->index_path, &again, &e);
        FZ_CHECK(rc == 0, "the directory opens, its index %s does not: %s", c->index_path, e.msg);
        FZ_CHECK(again.n_tensors == c->n_tensors && again.n_shards == c->n_shards &&
                 again.total_bytes == c->total_bytes, "the index alone differs");
        wl_checkpoint_close(&again);
    }
}

static void try_open(const char *path)
{
    wl_checkpoint c;
    wd_error e = {0};
    int rc = wl_checkpoint_open(path, &c, &e);

    if (rc == 0)
        check_ok(&c, path);
    else
        check_failed(rc, &c, &e, path);
    wl_checkpoint_close(&c);
    wl_checkpoint_close(&c);   /* safe on a closed checkpoint */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_file files[FZ_MAX_FILES];
    char dir[256], path[sizeof dir + sizeof files[0].name + 1];
    size_t n = unpack(data, size, files);

    /* A fresh directory each time, removed at the end of the iteration
     * (libFuzzer may leave with _Exit, so nothing is left for atexit). */
    snprintf(dir, sizeof dir, "%s/fuzz_discovery.XXXXXX", tmp_base());
    FZ_CHECK(mkdtemp(dir) != NULL, "mkdtemp %s: %s", dir, strerror(errno));
    for (size_t i = 0; i < n; i++) {
        int fd;
        snprintf(path, sizeof path, "%s/%s", dir, files[i].name);
        fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        FZ_CHECK(fd >= 0, "create %s: %s", path, strerror(errno));
        FZ_CHECK(files[i].len == 0 || write(fd, files[i].data, files[i].len) == (ssize_t)files[i].len,
                 "write %s", path);
        close(fd);
    }

    try_open(dir);
    for (size_t i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i].name);
        try_open(path);
    }

    for (size_t i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i].name);
        FZ_CHECK(unlink(path) == 0, "unlink %s: %s", path, strerror(errno));
    }
    FZ_CHECK(rmdir(dir) == 0, "rmdir %s: %s", dir, strerror(errno));
    return 0;
}
