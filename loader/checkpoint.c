#include "loader/checkpoint.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/grow.h"

#define INDEX_SUFFIX ".safetensors.index.json"
#define SHARD_SUFFIX ".safetensors"

/* Names and paths in messages come from the checkpoint (an index's keys and
 * values, file names, tensor names): each is shown on one printable line,
 * cut at a UTF-8 boundary (st_msg_str), so that a message stays one line of
 * valid UTF-8 whatever the files hold. */
#define SHOWN_NAME_MAX 200
#define SHOWN_PATH_MAX 1024
typedef char name_buf[ST_MSG_BUF(SHOWN_NAME_MAX)];
typedef char path_buf[ST_MSG_BUF(SHOWN_PATH_MAX)];

/* "name", quoted and escaped. */
static const char *qname(const char *s, char *buf)
{
    return st_msg_str(s, SHOWN_NAME_MAX, 1, buf);
}

/* A path, control bytes escaped. */
static const char *spath(const char *s, char *buf)
{
    return st_msg_str(s, SHOWN_PATH_MAX, 0, buf);
}

/* One weight_map entry; name points into the parsed index. */
typedef struct wl__entry {
    const char *name;
    const char *file;          /* its shard's file name, in the index's JSON */
    uint32_t shard;
} wl__entry;

typedef struct wl__index {
    cJSON *root;
    wl__entry *entries;        /* sorted by name */
    size_t n_entries;
    const char **files;        /* distinct shard file names, sorted */
    size_t n_files;
} wl__index;

static void index_free(wl__index *ix)
{
    cJSON_Delete(ix->root);
    free(ix->entries);
    free(ix->files);
    memset(ix, 0, sizeof *ix);
}

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

int wl_is_checkpoint_file(const char *name)
{
    return name[0] != '.' && (ends_with(name, INDEX_SUFFIX) || ends_with(name, SHARD_SUFFIX));
}

char *wl_join_path(const char *dir, const char *name)
{
    size_t n = strlen(dir);
    char *p;

    if (asprintf(&p, "%s%s%s", dir, n && dir[n - 1] == '/' ? "" : "/", name) < 0)
        return NULL;
    return p;
}

/* The folder part of a path ("." for a bare name). */
static char *dir_of(const char *path)
{
    const char *slash = strrchr(path, '/');

    if (!slash)
        return strdup(".");
    if (slash == path)
        return strdup("/");
    return strndup(path, (size_t)(slash - path));
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int cmp_entry(const void *a, const void *b)
{
    return strcmp(((const wl__entry *)a)->name, ((const wl__entry *)b)->name);
}

static int cmp_tensor_name(const void *a, const void *b)
{
    const wl_tensor *x = *(const wl_tensor *const *)a, *y = *(const wl_tensor *const *)b;
    int c = strcmp(x->st->name, y->st->name);

    if (c)
        return c;
    return x->shard < y->shard ? -1 : x->shard > y->shard;
}

static void free_strv(char **v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
}

/* Reads a whole regular file of at most max bytes into a NUL-terminated
 * buffer. */
static int read_small_file(const char *path, uint64_t max, char **out, size_t *len, wd_error *err)
{
    struct stat sb;
    char *buf = NULL;
    path_buf pb;
    const char *shown = spath(path, pb);
    size_t got = 0, size;
    int fd, rc;

    fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK); /* a FIFO must not block us */
    if (fd < 0) {
        rc = -errno;
        return wd_error_set(err, rc, "index %s: cannot open: %s", shown, strerror(-rc));
    }
    if (fstat(fd, &sb) < 0) {
        rc = wd_error_set(err, -errno, "index %s: cannot stat: %s", shown, strerror(errno));
        goto out;
    }
    if (!S_ISREG(sb.st_mode)) {
        rc = wd_error_set(err, -EBADMSG, "index %s: not a regular file", shown);
        goto out;
    }
    if ((uint64_t)sb.st_size > max) {
        rc = wd_error_set(err, -EFBIG, "index %s: %llu bytes, over the limit of %llu", shown,
                          (unsigned long long)sb.st_size, (unsigned long long)max);
        goto out;
    }
    size = (size_t)sb.st_size;
    buf = malloc(size + 1);
    if (!buf) {
        rc = wd_error_set(err, -ENOMEM, "index %s: out of memory for %zu bytes", shown, size);
        goto out;
    }
    while (got < size) {
        ssize_t r = read(fd, buf + got, size - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            rc = wd_error_set(err, -errno, "index %s: cannot read: %s", shown, strerror(errno));
            goto out;
        }
        if (r == 0) {
            rc = wd_error_set(err, -EIO, "index %s: file shrank while being read", shown);
            goto out;
        }
        got += (size_t)r;
    }
    buf[size] = '\0';
    *out = buf;
    *len = size;
    buf = NULL;
    rc = 0;
out:
    free(buf);
    close(fd);
    return rc;
}

/* Shard names come from the file: they must stay inside the index's folder. */
static int bad_shard_name(const char *s)
{
    return !*s || strchr(s, '/') || strcmp(s, ".") == 0 || strcmp(s, "..") == 0;
}

static int index_load(const char *path, wl__index *ix, wd_error *err)
{
    char *text = NULL, msg[512];
    path_buf pb;
    name_buf q1, q2;
    const char *shown = spath(path, pb);
    const cJSON *wm = NULL, *md = NULL, *e;
    const char *stop = NULL;
    size_t len = 0, end = 0, i, n = 0;
    int rc;

    memset(ix, 0, sizeof *ix);
    rc = read_small_file(path, WL_INDEX_MAX_LEN, &text, &len, err);
    if (rc < 0)
        return rc;
    rc = st_json_check(text, len, &end, msg, sizeof msg);
    if (rc < 0) {
        rc = wd_error_set(err, rc, "index %s: %s", shown, msg);
        goto out;
    }
    /* Only JSON whitespace may follow (strchr would take a NUL byte for one). */
    if ((i = st_json_skip_ws(text, end, len)) < len) {
        rc = wd_error_set(err, -EBADMSG, "index %s: data after the JSON object at byte %zu", shown, i);
        goto out;
    }
    text[end] = '\0';   /* cJSON sees exactly the object */
    ix->root = cJSON_ParseWithLengthOpts(text, end + 1, &stop, 1);
    if (!ix->root) {
        rc = wd_error_set(err, -EBADMSG, "index %s: not valid JSON (error near byte %zu)", shown,
                          stop && stop >= text ? (size_t)(stop - text) : (size_t)0);
        goto out;
    }
    for (e = ix->root->child; e; e = e->next) {
        const cJSON **slot = strcmp(e->string, "weight_map") == 0 ? &wm
                           : strcmp(e->string, "metadata") == 0 ? &md : NULL;
        if (!slot)
            continue;   /* other keys are not ours to judge */
        if (*slot) {
            rc = wd_error_set(err, -EBADMSG, "index %s: \"%s\" appears twice", shown, e->string);
            goto out;
        }
        *slot = e;
    }
    if (!wm) {
        rc = wd_error_set(err, -EBADMSG, "index %s: no \"weight_map\"", shown);
        goto out;
    }
    if (!cJSON_IsObject(wm)) {
        rc = wd_error_set(err, -EBADMSG, "index %s: \"weight_map\" is not an object", shown);
        goto out;
    }
    if (md && !cJSON_IsObject(md)) {
        rc = wd_error_set(err, -EBADMSG, "index %s: \"metadata\" is not an object", shown);
        goto out;
    }
    for (e = wm->child; e; e = e->next) {
        if (!cJSON_IsString(e)) {
            rc = wd_error_set(err, -EBADMSG,
                              "index %s: weight_map: tensor %s maps to a non-string",
                              shown, qname(e->string, q1));
            goto out;
        }
        if (bad_shard_name(e->valuestring)) {
            rc = wd_error_set(err, -EBADMSG,
                              "index %s: weight_map: tensor %s maps to %s, not a "
                              "file name in the index's folder", shown, qname(e->string, q1),
                              qname(e->valuestring, q2));
            goto out;
        }
        n++;
    }
    if (n == 0) {
        rc = wd_error_set(err, -EBADMSG, "index %s: \"weight_map\" is empty", shown);
        goto out;
    }
    ix->entries = calloc(n, sizeof *ix->entries);
    ix->files = calloc(n, sizeof *ix->files);
    if (!ix->entries || !ix->files) {
        rc = wd_error_set(err, -ENOMEM, "index %s: out of memory", shown);
        goto out;
    }
    for (e = wm->child, i = 0; e; e = e->next, i++) {
        ix->entries[i] = (wl__entry){.name = e->string, .file = e->valuestring};
        ix->files[i] = e->valuestring;
    }
    ix->n_entries = n;
    qsort(ix->entries, n, sizeof *ix->entries, cmp_entry);
    for (i = 1; i < n; i++) {
        if (strcmp(ix->entries[i - 1].name, ix->entries[i].name) == 0) {
            rc = wd_error_set(err, -EBADMSG,
                              "index %s: weight_map: tensor %s appears twice", shown,
                              qname(ix->entries[i].name, q1));
            goto out;
        }
    }
    /* The distinct shard files, in name order, give the shard numbers. */
    qsort(ix->files, n, sizeof *ix->files, cmp_str);
    ix->n_files = 0;
    for (i = 0; i < n; i++)
        if (ix->n_files == 0 || strcmp(ix->files[ix->n_files - 1], ix->files[i]) != 0)
            ix->files[ix->n_files++] = ix->files[i];
    for (i = 0; i < n; i++) {
        const char **f = bsearch(&ix->entries[i].file, ix->files, ix->n_files, sizeof *ix->files, cmp_str);
        ix->entries[i].shard = (uint32_t)(f - ix->files);
    }
    rc = 0;
out:
    free(text);
    if (rc < 0)
        index_free(ix);
    return rc;
}

/* The *.safetensors files of a directory, or its index, by the rules in
 * checkpoint.h. Exactly one of *index_path and *files is set on success. */
static int scan_dir(const char *dir, char **index_path, char ***files, size_t *n_files,
                    wd_error *err)
{
    DIR *d;
    struct dirent *de;
    char **shards = NULL, **indexes = NULL;
    size_t ns = 0, ni = 0, cs = 0, ci = 0;
    int rc = 0, has_default = 0;
    path_buf pb;

    *index_path = NULL;
    *files = NULL;
    *n_files = 0;
    d = opendir(dir);
    if (!d) {
        rc = -errno;
        return wd_error_set(err, rc, "%s: cannot open directory: %s", spath(dir, pb),
                            strerror(-rc));
    }
    for (;;) {
        char ***v;
        size_t *nv, *cv;

        errno = 0;
        de = readdir(d);
        if (!de) {
            if (errno) {
                rc = wd_error_set(err, -errno, "%s: cannot read directory: %s", spath(dir, pb),
                                  strerror(errno));
                goto out;
            }
            break;
        }
        if (de->d_name[0] == '.')
            continue;
        if (ends_with(de->d_name, INDEX_SUFFIX)) {
            v = &indexes, nv = &ni, cv = &ci;
            if (strcmp(de->d_name, WL_DEFAULT_INDEX) == 0)
                has_default = 1;
        } else if (ends_with(de->d_name, SHARD_SUFFIX)) {
            v = &shards, nv = &ns, cv = &cs;
        } else {
            continue;
        }
        if (WD_GROW(*v, *cv, *nv + 1, 16)) {
            rc = wd_error_set(err, -ENOMEM, "%s: out of memory", dir);
            goto out;
        }
        (*v)[*nv] = strdup(de->d_name);
        if (!(*v)[*nv]) {
            rc = wd_error_set(err, -ENOMEM, "%s: out of memory", dir);
            goto out;
        }
        (*nv)++;
    }
    if (ni) {
        const char *pick = WL_DEFAULT_INDEX;
        if (!has_default && ni > 1) {
            char list[512];
            name_buf nb;
            size_t o = 0;
            qsort(indexes, ni, sizeof *indexes, cmp_str);
            list[0] = '\0';
            /* Whole names only (a cut one could end in half a character). */
            for (size_t i = 0; i < ni; i++) {
                const char *shown = st_msg_str(indexes[i], SHOWN_NAME_MAX, 0, nb);
                if (o + strlen(shown) + 2 + 5 >= sizeof list) {
                    strcpy(list + o, i ? ", ..." : "...");
                    break;
                }
                o += (size_t)snprintf(list + o, sizeof list - o, "%s%s", i ? ", " : "", shown);
            }
            rc = wd_error_set(err, -EBADMSG,
                              "%s: %zu index files and none is " WL_DEFAULT_INDEX
                              "; name one of: %s", spath(dir, pb), ni, list);
            goto out;
        }
        if (!has_default)
            pick = indexes[0];
        *index_path = wl_join_path(dir, pick);
        if (!*index_path)
            rc = wd_error_set(err, -ENOMEM, "%s: out of memory", dir);
        goto out;
    }
    if (ns == 0) {
        rc = wd_error_set(err, -ENOENT, "%s: no *.safetensors files and no index",
                          spath(dir, pb));
        goto out;
    }
    qsort(shards, ns, sizeof *shards, cmp_str);
    for (size_t i = 0; i < ns; i++) {
        char *full = wl_join_path(dir, shards[i]);
        if (!full) {
            rc = wd_error_set(err, -ENOMEM, "%s: out of memory", dir);
            goto out;
        }
        free(shards[i]);
        shards[i] = full;
    }
    *files = shards;
    *n_files = ns;
    shards = NULL;
    ns = 0;
out:
    closedir(d);
    free_strv(shards, ns);
    free_strv(indexes, ni);
    return rc;
}

static int load_shards(wl_checkpoint *c, char **paths, size_t n, wd_error *err)
{
    char msg[sizeof err->msg];
    int rc;

    if (n > UINT32_MAX)
        return wd_error_set(err, -EBADMSG, "%s: %zu shards, too many", c->path, n);
    c->shards = calloc(n, sizeof *c->shards);
    if (!c->shards)
        return wd_error_set(err, -ENOMEM, "%s: out of memory", c->path);
    c->n_shards = n;
    for (size_t i = 0; i < n; i++) {
        wl_shard *s = &c->shards[i];
        s->path = paths[i];
        paths[i] = NULL;
        rc = st_read(s->path, &s->st, msg, sizeof msg);
        if (rc < 0)
            return wd_error_set(err, rc, "%s", msg);
        s->file_size = s->st.data_offset + s->st.data_len;
    }
    return 0;
}

/* The flat tensor list and name index; then the index, if any, must name
 * exactly the tensors the shards hold, each in its own shard. */
static int link_tensors(wl_checkpoint *c, const wl__index *ix, wd_error *err)
{
    size_t n = 0, k = 0, i, j;
    name_buf q;
    path_buf p1, p2, p3;

    for (i = 0; i < c->n_shards; i++)
        n += c->shards[i].st.n_tensors;
    if (n) {
        c->tensors = calloc(n, sizeof *c->tensors);
        c->by_name = calloc(n, sizeof *c->by_name);
        if (!c->tensors || !c->by_name)
            return wd_error_set(err, -ENOMEM, "%s: out of memory for %zu tensors", c->path, n);
    }
    for (i = 0; i < c->n_shards; i++) {
        const st_file *f = &c->shards[i].st;
        for (j = 0; j < f->n_tensors; j++, k++) {
            c->tensors[k].st = &f->tensors[j];
            c->tensors[k].shard = (uint32_t)i;
            c->by_name[k] = &c->tensors[k];
            if (__builtin_add_overflow(c->total_bytes, st_tensor_nbytes(&f->tensors[j]),
                                       &c->total_bytes))
                return wd_error_set(err, -EBADMSG, "%s: total size past 2^64-1", c->path);
        }
    }
    c->n_tensors = n;
    if (n)
        qsort(c->by_name, n, sizeof *c->by_name, cmp_tensor_name);
    for (i = 1; i < n; i++) {
        const wl_tensor *a = c->by_name[i - 1], *b = c->by_name[i];
        if (strcmp(a->st->name, b->st->name) == 0)
            return wd_error_set(err, -EBADMSG, "tensor %s is in two shards: %s and %s",
                                qname(b->st->name, q), spath(c->shards[a->shard].path, p1),
                                spath(c->shards[b->shard].path, p2));
    }
    if (!ix)
        return 0;

    /* Both lists are sorted by name: walk them together. */
    for (i = 0, j = 0; i < ix->n_entries || j < n;) {
        const wl__entry *e = i < ix->n_entries ? &ix->entries[i] : NULL;
        const wl_tensor *t = j < n ? c->by_name[j] : NULL;
        int cmp = !e ? 1 : !t ? -1 : strcmp(e->name, t->st->name);

        if (cmp < 0)
            return wd_error_set(err, -EBADMSG,
                                "index %s: tensor %s is absent from its shard %s",
                                spath(c->index_path, p1), qname(e->name, q),
                                spath(c->shards[e->shard].path, p2));
        if (cmp > 0)
            return wd_error_set(err, -EBADMSG,
                                "index %s: tensor %s is in shard %s but not in the index",
                                spath(c->index_path, p1), qname(t->st->name, q),
                                spath(c->shards[t->shard].path, p2));
        if (e->shard != t->shard)
            return wd_error_set(err, -EBADMSG,
                                "index %s: tensor %s is mapped to %s but is in %s",
                                spath(c->index_path, p1), qname(e->name, q),
                                spath(c->shards[e->shard].path, p2),
                                spath(c->shards[t->shard].path, p3));
        i++;
        j++;
    }
    return 0;
}

int wl_checkpoint_open(const char *path, wl_checkpoint *out, wd_error *err)
{
    wl_checkpoint c;
    wl__index ix = {0};
    struct stat sb;
    char **paths = NULL, *folder = NULL;
    size_t n_paths = 0;
    int rc, have_index = 0;

    memset(&c, 0, sizeof c);
    if (out)
        memset(out, 0, sizeof *out);
    if (!path || !out)
        return wd_error_set(err, -EINVAL, "wl_checkpoint_open: bad arguments");
    if (stat(path, &sb) < 0) {
        path_buf pb;
        rc = -errno;
        return wd_error_set(err, rc, "%s: %s", spath(path, pb), strerror(-rc));
    }
    c.path = strdup(path);
    if (!c.path)
        return wd_error_set(err, -ENOMEM, "%s: out of memory", path);

    if (S_ISDIR(sb.st_mode)) {
        rc = scan_dir(path, &c.index_path, &paths, &n_paths, err);
        if (rc < 0)
            goto out;
    } else if (ends_with(path, ".json")) {
        c.index_path = strdup(path);
        if (!c.index_path) {
            rc = wd_error_set(err, -ENOMEM, "%s: out of memory", path);
            goto out;
        }
    } else {
        paths = calloc(1, sizeof *paths);
        if (!paths || !(paths[0] = strdup(path))) {
            rc = wd_error_set(err, -ENOMEM, "%s: out of memory", path);
            goto out;
        }
        n_paths = 1;
    }

    if (c.index_path) {
        rc = index_load(c.index_path, &ix, err);
        if (rc < 0)
            goto out;
        have_index = 1;
        folder = dir_of(c.index_path);
        paths = calloc(ix.n_files, sizeof *paths);
        if (!folder || !paths) {
            rc = wd_error_set(err, -ENOMEM, "%s: out of memory", path);
            goto out;
        }
        n_paths = ix.n_files;
        for (size_t i = 0; i < ix.n_files; i++) {
            paths[i] = wl_join_path(folder, ix.files[i]);
            if (!paths[i]) {
                rc = wd_error_set(err, -ENOMEM, "%s: out of memory", path);
                goto out;
            }
            if (access(paths[i], F_OK) < 0) {
                const wl__entry *e = NULL;
                int errnum = errno;
                name_buf q;
                path_buf p1, p2;
                for (size_t k = 0; k < ix.n_entries && !e; k++)
                    if (ix.entries[k].shard == i)
                        e = &ix.entries[k];
                rc = wd_error_set(err, -errnum,
                                  "index %s: shard %s (of tensor %s) is missing: %s",
                                  spath(c.index_path, p1), spath(paths[i], p2),
                                  e ? qname(e->name, q) : "?", strerror(errnum));
                goto out;
            }
        }
    }

    rc = load_shards(&c, paths, n_paths, err);
    if (rc < 0)
        goto out;
    rc = link_tensors(&c, have_index ? &ix : NULL, err);
    if (rc < 0)
        goto out;
    *out = c;
    memset(&c, 0, sizeof c);
out:
    free_strv(paths, n_paths);
    free(folder);
    index_free(&ix);
    wl_checkpoint_close(&c);
    return rc;
}

void wl_checkpoint_close(wl_checkpoint *c)
{
    if (!c)
        return;
    for (size_t i = 0; i < c->n_shards; i++) {
        free(c->shards[i].path);
        st_free(&c->shards[i].st);
    }
    free(c->shards);
    free(c->tensors);
    free(c->by_name);
    free(c->path);
    free(c->index_path);
    memset(c, 0, sizeof *c);
}

const wl_tensor *wl_checkpoint_find(const wl_checkpoint *c, const char *name)
{
    size_t lo = 0, hi;

    if (!c || !name || !c->by_name)
        return NULL;
    hi = c->n_tensors;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int cmp = strcmp(name, c->by_name[mid]->st->name);
        if (cmp == 0)
            return c->by_name[mid];
        if (cmp < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

void wl_checkpoint_dtype_totals(const wl_checkpoint *c, uint64_t bytes[ST_DTYPE_COUNT], size_t count[ST_DTYPE_COUNT])
{
    memset(bytes, 0, ST_DTYPE_COUNT * sizeof *bytes);
    if (count)
        memset(count, 0, ST_DTYPE_COUNT * sizeof *count);
    for (size_t i = 0; i < c->n_tensors; i++) {
        bytes[c->tensors[i].st->dtype] += st_tensor_nbytes(c->tensors[i].st);
        if (count)
            count[c->tensors[i].st->dtype]++;
    }
}
