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

#include "common/fault.h"
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
        return wd_strdup(".");
    if (slash == path)
        return wd_strdup("/");
    return wd_strndup(path, (size_t)(slash - path));
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
    for (size_t i = 0; v && i < n; i++)
        free(v[i]);
    free(v);
}

/* Reads a whole regular file of at most max bytes, open at fd, into a
 * NUL-terminated buffer; shown names it in messages. */
static int read_small_fd(int fd, const char *shown, uint64_t max, char **out, size_t *len, wd_error *err)
{
    struct stat sb;
    char *buf = NULL;
    size_t got = 0, size;
    int rc;

    if (fstat(fd, &sb) < 0)
        return wd_error_set(err, -errno, "index %s: cannot stat: %s", shown, strerror(errno));
    if (!S_ISREG(sb.st_mode))
        return wd_error_set(err, -EBADMSG, "index %s: not a regular file", shown);
    if ((uint64_t)sb.st_size > max)
        return wd_error_set(err, -EFBIG, "index %s: %llu bytes, over the limit of %llu", shown,
                            (unsigned long long)sb.st_size, (unsigned long long)max);
    size = (size_t)sb.st_size;
    if (!(buf = wd_malloc(size + 1)))
        return wd_error_set(err, -ENOMEM, "index %s: out of memory for %zu bytes", shown, size);
    while (got < size) {
        ssize_t r = pread(fd, buf + got, size - got, (off_t)got);
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
    return rc;
}

/* O_NONBLOCK: a FIFO put where a file was expected must not block us (the
 * readers refuse anything but a regular file). */
static int open_file(const char *path, const char *what, wd_error *err)
{
    path_buf pb;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);

    if (fd < 0)
        return wd_error_set(err, -errno, "%s%s: cannot open: %s", what, spath(path, pb), strerror(errno));
    return fd;
}

/* Shard names come from the file: they must stay inside the index's folder. */
static int bad_shard_name(const char *s)
{
    return !*s || strchr(s, '/') || strcmp(s, ".") == 0 || strcmp(s, "..") == 0;
}

static int index_load(int fd, const char *path, wl__index *ix, wd_error *err)
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
    rc = read_small_fd(fd, shown, WL_INDEX_MAX_LEN, &text, &len, err);
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
    ix->entries = wd_calloc(n, sizeof *ix->entries);
    ix->files = wd_calloc(n, sizeof *ix->files);
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
        (*v)[*nv] = wd_strdup(de->d_name);
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

/* The shards' headers, read through their descriptors, which the shards
 * keep: the bytes loaded later, and verified, come from these same files. */
static int load_shards(wl_checkpoint *c, char **paths, int *fds, size_t n, wd_error *err)
{
    char msg[sizeof err->msg];
    int rc;

    if (n > UINT32_MAX)
        return wd_error_set(err, -EBADMSG, "%s: %zu shards, too many", c->path, n);
    c->shards = wd_calloc(n, sizeof *c->shards);
    if (!c->shards)
        return wd_error_set(err, -ENOMEM, "%s: out of memory", c->path);
    c->n_shards = n;
    for (size_t i = 0; i < n; i++)
        c->shards[i].fd = -1;
    for (size_t i = 0; i < n; i++) {
        wl_shard *s = &c->shards[i];
        s->path = paths[i];
        s->fd = fds[i];
        paths[i] = NULL;
        fds[i] = -1;
        rc = st_read_fd(s->fd, s->path, &s->st, msg, sizeof msg);
        if (rc < 0)
            return wd_error_set(err, rc, "%s", msg);
        s->file_size = s->st.data_offset + s->st.data_len;
        {
            struct stat sb;
            if (fstat(s->fd, &sb) == 0)
                s->mtime = sb.st_mtim;
        }
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
        c->tensors = wd_calloc(n, sizeof *c->tensors);
        c->by_name = wd_calloc(n, sizeof *c->by_name);
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

static const char *base_name(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

/* The shard of the index's n-th file, for messages. */
static const char *tensor_of_shard(const wl__index *ix, size_t shard, char *buf)
{
    for (size_t k = 0; k < ix->n_entries; k++)
        if (ix->entries[k].shard == shard)
            return qname(ix->entries[k].name, buf);
    return "?";
}

int wl_checkpoint_files(const char *path, char ***files, size_t *n_files, wd_error *err)
{
    struct stat sb;
    char **v = NULL, *index = NULL, *folder = NULL;
    size_t n = 0;
    wl__index ix = {0};
    int rc, fd;

    *files = NULL;
    *n_files = 0;
    if (!path)
        return wd_error_set(err, -EINVAL, "wl_checkpoint_files: bad arguments");
    if (stat(path, &sb) < 0) {
        path_buf pb;
        rc = -errno;
        return wd_error_set(err, rc, "%s: %s", spath(path, pb), strerror(-rc));
    }
    if (S_ISDIR(sb.st_mode)) {
        if ((rc = scan_dir(path, &index, &v, &n, err)) < 0)
            return rc;
    } else if (ends_with(path, ".json")) {
        if (!(index = wd_strdup(path)))
            return wd_error_set(err, -ENOMEM, "%s: out of memory", path);
    } else {
        if (!(v = wd_calloc(1, sizeof *v)) || !(v[0] = wd_strdup(path))) {
            free(v);
            return wd_error_set(err, -ENOMEM, "%s: out of memory", path);
        }
        n = 1;
    }
    if (index) {
        /* The index first, then the shards it names, each in its folder. */
        if ((fd = open_file(index, "index ", err)) < 0) {
            rc = fd;
            goto out;
        }
        rc = index_load(fd, index, &ix, err);
        close(fd);
        if (rc < 0)
            goto out;
        if (!(folder = dir_of(index)) || !(v = wd_calloc(ix.n_files + 1, sizeof *v))) {
            rc = wd_error_set(err, -ENOMEM, "%s: out of memory", path);
            goto out;
        }
        v[n++] = index;
        index = NULL;
        for (size_t i = 0; i < ix.n_files; i++) {
            if (!(v[n] = wl_join_path(folder, ix.files[i]))) {
                rc = wd_error_set(err, -ENOMEM, "%s: out of memory", path);
                goto out;
            }
            if (access(v[n++], F_OK) < 0) {
                int errnum = errno;
                name_buf q;
                path_buf p1, p2;
                rc = wd_error_set(err, -errnum, "index %s: shard %s (of tensor %s) is missing: %s",
                                  spath(v[0], p1), spath(v[n - 1], p2), tensor_of_shard(&ix, i, q),
                                  strerror(errnum));
                goto out;
            }
        }
    }
    *files = v;
    *n_files = n;
    v = NULL;
    n = 0;
    rc = 0;
out:
    free_strv(v, n);
    free(index);
    free(folder);
    index_free(&ix);
    return rc;
}

int wl_checkpoint_open_files(const char *path, char *const *files, int *fds, size_t n, wl_checkpoint *out,
                             wd_error *err)
{
    wl_checkpoint c;
    wl__index ix = {0};
    char **paths = NULL;
    int *shard_fds = NULL;
    size_t n_paths = 0, first = 0;
    path_buf p1, p2;
    int rc = 0;

    memset(&c, 0, sizeof c);
    if (out)
        memset(out, 0, sizeof *out);
    if (!path || !out || !n || !files || !fds) {
        rc = wd_error_set(err, -EINVAL, "wl_checkpoint_open_files: bad arguments");
        goto out;
    }
    if (!(c.path = wd_strdup(path)) || !(paths = wd_calloc(n, sizeof *paths)) ||
        !(shard_fds = wd_malloc(n * sizeof *shard_fds))) {
        rc = wd_error_set(err, -ENOMEM, "%s: out of memory", path);
        goto out;
    }
    /* One folder's files, each once: an index's shard names are names in it. */
    for (size_t i = 0; i < n; i++) {
        const char *bi = base_name(files[i]);
        if (!*bi || (size_t)(bi - files[i]) != (size_t)(base_name(files[0]) - files[0]) ||
            strncmp(files[i], files[0], (size_t)(bi - files[i])) != 0) {
            rc = wd_error_set(err, -EINVAL, "%s: the files of a checkpoint lie in one folder (%s is not beside %s)",
                              spath(path, p1), spath(files[i], p2), spath(files[0], p1));
            goto out;
        }
        for (size_t k = 0; k < i; k++)
            if (strcmp(files[k], files[i]) == 0) {
                rc = wd_error_set(err, -EINVAL, "%s: file %s is given twice", spath(path, p1), spath(files[i], p2));
                goto out;
            }
    }
    if (ends_with(files[0], ".json")) {
        char *folder;
        if (!(c.index_path = wd_strdup(files[0]))) {
            rc = wd_error_set(err, -ENOMEM, "%s: out of memory", path);
            goto out;
        }
        if ((rc = index_load(fds[0], files[0], &ix, err)) < 0)
            goto out;
        close(fds[0]);
        fds[0] = -1;
        first = 1;
        if (n - 1 > ix.n_files) {
            rc = wd_error_set(err, -EINVAL, "index %s: names %zu shards, and %zu files came with it",
                              spath(files[0], p1), ix.n_files, n - 1);
            goto out;
        }
        if (!(folder = dir_of(files[0]))) {
            rc = wd_error_set(err, -ENOMEM, "%s: out of memory", path);
            goto out;
        }
        /* The shards in the index's order, each from the file of its name. */
        for (size_t i = 0; i < ix.n_files && !rc; i++) {
            size_t k;
            for (k = 1; k < n && (fds[k] < 0 || strcmp(base_name(files[k]), ix.files[i]) != 0); k++)
                ;
            if (k == n) {
                name_buf q;
                char *shown = wl_join_path(folder, ix.files[i]);
                rc = wd_error_set(err, -ENOENT, "index %s: shard %s (of tensor %s) is missing",
                                  spath(files[0], p1), spath(shown ? shown : ix.files[i], p2),
                                  tensor_of_shard(&ix, i, q));
                free(shown);
                break;
            }
            if (!(paths[n_paths] = wd_strdup(files[k]))) {
                rc = wd_error_set(err, -ENOMEM, "%s: out of memory", path);
                break;
            }
            shard_fds[n_paths++] = fds[k];
            fds[k] = -1;
        }
        free(folder);
        if (rc)
            goto out;
    } else {
        /* Shards alone: in name order, whatever order they came in. */
        size_t order[n];
        for (size_t i = 0; i < n; i++) {
            size_t k = i;
            order[i] = i;
            if (!ends_with(files[i], SHARD_SUFFIX) && n > 1) {
                rc = wd_error_set(err, -EINVAL, "%s: %s is neither a shard (*" SHARD_SUFFIX ") nor an index",
                                  spath(path, p1), spath(files[i], p2));
                goto out;
            }
            while (k > 0 && strcmp(files[order[k - 1]], files[i]) > 0) {
                order[k] = order[k - 1];
                k--;
            }
            order[k] = i;
        }
        for (size_t i = 0; i < n; i++) {
            if (!(paths[i] = wd_strdup(files[order[i]]))) {
                rc = wd_error_set(err, -ENOMEM, "%s: out of memory", path);
                goto out;
            }
            shard_fds[i] = fds[order[i]];
            n_paths++;
        }
        for (size_t i = 0; i < n; i++)
            fds[i] = -1;
    }
    if ((rc = load_shards(&c, paths, shard_fds, n_paths, err)) < 0)
        goto out;
    n_paths = 0;
    if ((rc = link_tensors(&c, first ? &ix : NULL, err)) < 0)
        goto out;
    *out = c;
    memset(&c, 0, sizeof c);
out:
    /* Every descriptor is taken: kept by the shards, or closed here. */
    for (size_t i = 0; fds && i < n; i++)
        if (fds[i] >= 0) {
            close(fds[i]);
            fds[i] = -1;
        }
    for (size_t i = 0; shard_fds && i < n_paths; i++)
        if (shard_fds[i] >= 0)
            close(shard_fds[i]);
    free(shard_fds);
    free_strv(paths, n);
    index_free(&ix);
    wl_checkpoint_close(&c);
    return rc;
}

int wl_shard_header(const wl_shard *s, char **json, size_t *len, wd_error *err)
{
    size_t n = (size_t)s->st.header_len, got = 0;
    char *buf;

    if (!(buf = wd_malloc(n + 1)))
        return wd_error_set(err, -ENOMEM, "%s: out of memory for its header", s->path);
    while (got < n) {
        ssize_t r = pread(s->fd, buf + got, n - got, (off_t)(8 + got));
        if (r <= 0) {
            int rc = r < 0 ? -errno : -EIO;
            free(buf);
            return wd_error_set(err, rc, "%s: reading its header again: %s", s->path,
                                r < 0 ? strerror(-rc) : "the file is shorter");
        }
        got += (size_t)r;
    }
    buf[n] = '\0';
    *json = buf;
    *len = n;
    return 0;
}

int wl_checkpoint_reopen(const char *path, const char *index_path, const wl_saved_shard *shards, size_t n,
                         wl_checkpoint *out, wd_error *err)
{
    wl_checkpoint c;
    char msg[sizeof err->msg];
    path_buf p1;
    size_t taken = 0;
    int rc = 0;

    memset(&c, 0, sizeof c);
    memset(out, 0, sizeof *out);
    if (!(c.path = wd_strdup(path)) || (index_path && !(c.index_path = wd_strdup(index_path))) ||
        !(c.shards = wd_calloc(n ? n : 1, sizeof *c.shards))) {
        rc = wd_error_set(err, -ENOMEM, "%s: out of memory", path);
        goto out;
    }
    c.n_shards = n;
    for (size_t i = 0; i < n; i++)
        c.shards[i].fd = -1;
    for (; taken < n; taken++) {
        const wl_saved_shard *sv = &shards[taken];
        wl_shard *sh = &c.shards[taken];
        struct stat sb;
        sh->fd = sv->fd;
        if (!(sh->path = wd_strdup(sv->path))) {
            taken++;
            rc = wd_error_set(err, -ENOMEM, "%s: out of memory", path);
            goto out;
        }
        if (fstat(sh->fd, &sb) < 0 || !S_ISREG(sb.st_mode) || (uint64_t)sb.st_size != sv->file_size ||
            sb.st_mtim.tv_sec != sv->mtime.tv_sec || sb.st_mtim.tv_nsec != sv->mtime.tv_nsec) {
            taken++;
            rc = wd_error_set(err, -ESTALE, "%s changed since it was loaded (size or modification time)",
                              spath(sv->path, p1));
            goto out;
        }
        sh->file_size = sv->file_size;
        sh->mtime = sv->mtime;
        if (sv->header_len + 8 > sv->file_size ||
            (rc = st_parse_header(sv->header, sv->header_len, sv->file_size - 8 - sv->header_len, &sh->st, msg,
                                  sizeof msg)) < 0) {
            taken++;
            rc = wd_error_set(err, rc < 0 ? rc : -EBADMSG, "%s: its saved header: %s", spath(sv->path, p1),
                              rc < 0 ? msg : "longer than the file");
            goto out;
        }
    }
    if ((rc = link_tensors(&c, NULL, err)) < 0)
        goto out;
    *out = c;
    memset(&c, 0, sizeof c);
out:
    for (size_t i = taken; i < n; i++)
        close(shards[i].fd);
    wl_checkpoint_close(&c);
    return rc;
}

int wl_checkpoint_open(const char *path, wl_checkpoint *out, wd_error *err)
{
    char **files = NULL;
    int *fds = NULL;
    size_t n = 0;
    int rc;

    if (out)
        memset(out, 0, sizeof *out);
    if (!path || !out)
        return wd_error_set(err, -EINVAL, "wl_checkpoint_open: bad arguments");
    if ((rc = wl_checkpoint_files(path, &files, &n, err)) < 0)
        return rc;
    if (!(fds = wd_malloc(n * sizeof *fds))) {
        rc = wd_error_set(err, -ENOMEM, "%s: out of memory", path);
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        fds[i] = -1;
    for (size_t i = 0; i < n; i++)
        if ((fds[i] = open_file(files[i], i == 0 && n > 1 && ends_with(files[0], ".json") ? "index " : "", err)) < 0) {
            rc = fds[i];
            goto out;
        }
    rc = wl_checkpoint_open_files(path, files, fds, n, out, err); /* takes every fds[i] */
out:
    for (size_t i = 0; fds && i < n; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    free(fds);
    free_strv(files, n);
    return rc;
}

size_t wl_checkpoint_replaced(const wl_checkpoint *c, size_t *first)
{
    size_t n = 0;

    for (size_t i = 0; i < c->n_shards; i++) {
        const wl_shard *sh = &c->shards[i];
        struct stat opened, now;
        if (sh->host || sh->fd < 0 || fstat(sh->fd, &opened) < 0)
            continue;
        if (stat(sh->path, &now) < 0 ? errno == ENOENT : now.st_dev != opened.st_dev || now.st_ino != opened.st_ino)
            if (!n++)
                *first = i;
    }
    return n;
}

void wl_checkpoint_close(wl_checkpoint *c)
{
    if (!c)
        return;
    for (size_t i = 0; i < c->n_shards; i++) {
        free(c->shards[i].path);
        if (c->shards[i].fd >= 0)
            close(c->shards[i].fd);
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
