#include "loader/ckpt_writer.h"

#include <dirent.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/grow.h"
#include "common/size.h"
#include "loader/checkpoint.h"

#define CHUNK (16u << 20)   /* write size: large enough that syscalls do not show */

#define E WL_DIM_EXPERTS
#define V WL_DIM_VOCAB

/* openai/gpt-oss-120b: hidden 2880, 64 q heads and 8 kv heads of 64, MoE
 * weights in MXFP4 (blocks of 32 4-bit values in 16 bytes, one E8M0 scale
 * per block). */
static const wl_tensor_tmpl gpt_oss_120b[] = {
    {WL_HEAD, "model.embed_tokens.weight", ST_BF16, 2, {V, 2880}},
    {WL_LAYER, "model.layers.{L}.input_layernorm.weight", ST_BF16, 1, {2880}},
    {WL_LAYER, "model.layers.{L}.post_attention_layernorm.weight", ST_BF16, 1, {2880}},
    {WL_LAYER, "model.layers.{L}.self_attn.q_proj.weight", ST_BF16, 2, {4096, 2880}},
    {WL_LAYER, "model.layers.{L}.self_attn.q_proj.bias", ST_BF16, 1, {4096}},
    {WL_LAYER, "model.layers.{L}.self_attn.k_proj.weight", ST_BF16, 2, {512, 2880}},
    {WL_LAYER, "model.layers.{L}.self_attn.k_proj.bias", ST_BF16, 1, {512}},
    {WL_LAYER, "model.layers.{L}.self_attn.v_proj.weight", ST_BF16, 2, {512, 2880}},
    {WL_LAYER, "model.layers.{L}.self_attn.v_proj.bias", ST_BF16, 1, {512}},
    {WL_LAYER, "model.layers.{L}.self_attn.o_proj.weight", ST_BF16, 2, {2880, 4096}},
    {WL_LAYER, "model.layers.{L}.self_attn.o_proj.bias", ST_BF16, 1, {2880}},
    {WL_LAYER, "model.layers.{L}.self_attn.sinks", ST_BF16, 1, {64}},
    {WL_LAYER, "model.layers.{L}.mlp.router.weight", ST_BF16, 2, {E, 2880}},
    {WL_LAYER, "model.layers.{L}.mlp.router.bias", ST_BF16, 1, {E}},
    {WL_LAYER, "model.layers.{L}.mlp.experts.gate_up_proj_blocks", ST_U8, 4, {E, 5760, 90, 16}},
    {WL_LAYER, "model.layers.{L}.mlp.experts.gate_up_proj_scales", ST_F8_E8M0, 3, {E, 5760, 90}},
    {WL_LAYER, "model.layers.{L}.mlp.experts.gate_up_proj_bias", ST_BF16, 2, {E, 5760}},
    {WL_LAYER, "model.layers.{L}.mlp.experts.down_proj_blocks", ST_U8, 4, {E, 2880, 90, 16}},
    {WL_LAYER, "model.layers.{L}.mlp.experts.down_proj_scales", ST_F8_E8M0, 3, {E, 2880, 90}},
    {WL_LAYER, "model.layers.{L}.mlp.experts.down_proj_bias", ST_BF16, 2, {E, 2880}},
    {WL_TAIL, "model.norm.weight", ST_BF16, 1, {2880}},
    {WL_TAIL, "lm_head.weight", ST_BF16, 2, {V, 2880}},
};

/* mistralai/Mixtral-8x7B-v0.1: hidden 4096, 32 heads of 128, 8 kv heads,
 * experts of intermediate size 14336. */
static const wl_tensor_tmpl mixtral_8x7b[] = {
    {WL_HEAD, "model.embed_tokens.weight", ST_BF16, 2, {V, 4096}},
    {WL_LAYER, "model.layers.{L}.input_layernorm.weight", ST_BF16, 1, {4096}},
    {WL_LAYER, "model.layers.{L}.post_attention_layernorm.weight", ST_BF16, 1, {4096}},
    {WL_LAYER, "model.layers.{L}.self_attn.q_proj.weight", ST_BF16, 2, {4096, 4096}},
    {WL_LAYER, "model.layers.{L}.self_attn.k_proj.weight", ST_BF16, 2, {1024, 4096}},
    {WL_LAYER, "model.layers.{L}.self_attn.v_proj.weight", ST_BF16, 2, {1024, 4096}},
    {WL_LAYER, "model.layers.{L}.self_attn.o_proj.weight", ST_BF16, 2, {4096, 4096}},
    {WL_LAYER, "model.layers.{L}.block_sparse_moe.gate.weight", ST_BF16, 2, {E, 4096}},
    {WL_EXPERT, "model.layers.{L}.block_sparse_moe.experts.{X}.w1.weight", ST_BF16, 2, {14336, 4096}},
    {WL_EXPERT, "model.layers.{L}.block_sparse_moe.experts.{X}.w2.weight", ST_BF16, 2, {4096, 14336}},
    {WL_EXPERT, "model.layers.{L}.block_sparse_moe.experts.{X}.w3.weight", ST_BF16, 2, {14336, 4096}},
    {WL_TAIL, "model.norm.weight", ST_BF16, 1, {4096}},
    {WL_TAIL, "lm_head.weight", ST_BF16, 2, {V, 4096}},
};

/* Qwen/Qwen3-30B-A3B: hidden 2048, 32 q heads and 4 kv heads of 128 with
 * q/k norms, 128 experts of intermediate size 768. */
static const wl_tensor_tmpl qwen3_moe[] = {
    {WL_HEAD, "model.embed_tokens.weight", ST_BF16, 2, {V, 2048}},
    {WL_LAYER, "model.layers.{L}.input_layernorm.weight", ST_BF16, 1, {2048}},
    {WL_LAYER, "model.layers.{L}.post_attention_layernorm.weight", ST_BF16, 1, {2048}},
    {WL_LAYER, "model.layers.{L}.self_attn.q_proj.weight", ST_BF16, 2, {4096, 2048}},
    {WL_LAYER, "model.layers.{L}.self_attn.k_proj.weight", ST_BF16, 2, {512, 2048}},
    {WL_LAYER, "model.layers.{L}.self_attn.v_proj.weight", ST_BF16, 2, {512, 2048}},
    {WL_LAYER, "model.layers.{L}.self_attn.o_proj.weight", ST_BF16, 2, {2048, 4096}},
    {WL_LAYER, "model.layers.{L}.self_attn.q_norm.weight", ST_BF16, 1, {128}},
    {WL_LAYER, "model.layers.{L}.self_attn.k_norm.weight", ST_BF16, 1, {128}},
    {WL_LAYER, "model.layers.{L}.mlp.gate.weight", ST_BF16, 2, {E, 2048}},
    {WL_EXPERT, "model.layers.{L}.mlp.experts.{X}.gate_proj.weight", ST_BF16, 2, {768, 2048}},
    {WL_EXPERT, "model.layers.{L}.mlp.experts.{X}.up_proj.weight", ST_BF16, 2, {768, 2048}},
    {WL_EXPERT, "model.layers.{L}.mlp.experts.{X}.down_proj.weight", ST_BF16, 2, {2048, 768}},
    {WL_TAIL, "model.norm.weight", ST_BF16, 1, {2048}},
    {WL_TAIL, "lm_head.weight", ST_BF16, 2, {V, 2048}},
};

#undef E
#undef V

#define PRESET(id, model, layers, experts, vocab, table) \
    {id, model, layers, experts, vocab, table, sizeof table / sizeof table[0]}

const wl_preset wl_presets[] = {
    PRESET("gpt-oss-120b", "openai/gpt-oss-120b", 36, 128, 201088, gpt_oss_120b),
    PRESET("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", 32, 8, 32000, mixtral_8x7b),
    PRESET("qwen3-moe", "Qwen/Qwen3-30B-A3B", 48, 128, 151936, qwen3_moe),
};
const size_t wl_n_presets = sizeof wl_presets / sizeof wl_presets[0];

const wl_preset *wl_preset_find(const char *name)
{
    for (size_t i = 0; name && i < wl_n_presets; i++)
        if (strcmp(wl_presets[i].name, name) == 0)
            return &wl_presets[i];
    return NULL;
}

/* --- contents ------------------------------------------------------------ */

#define GOLDEN 0x9e3779b97f4a7c15ULL

/* splitmix64's output function: the i-th output of a generator seeded with
 * k is mix(k + (i + 1) * GOLDEN), so any word can be made on its own. */
static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t tensor_key(uint64_t seed, const char *name)
{
    uint64_t h = 0xcbf29ce484222325ULL;   /* FNV-1a of the name */

    for (; *name; name++) {
        h ^= (unsigned char)*name;
        h *= 0x100000001b3ULL;
    }
    return mix64(mix64(seed + GOLDEN) ^ h);
}

void wl_ckpt_fill(uint64_t seed, const char *name, uint64_t offset, void *buf, size_t len)
{
    unsigned char *p = buf;
    uint64_t key = tensor_key(seed, name), w = offset / 8;
    unsigned skip = (unsigned)(offset % 8);

    if (skip && len) {
        uint64_t v = mix64(key + (w + 1) * GOLDEN);
        for (unsigned b = skip; b < 8 && len; b++, len--)
            *p++ = (unsigned char)(v >> (8 * b));
        w++;
    }
    for (; len >= 8; len -= 8, p += 8, w++) {
        uint64_t v = htole64(mix64(key + (w + 1) * GOLDEN));   /* same bytes on any host */
        memcpy(p, &v, 8);
    }
    if (len) {
        uint64_t v = mix64(key + (w + 1) * GOLDEN);
        for (unsigned b = 0; b < len; b++)
            p[b] = (unsigned char)(v >> (8 * b));
    }
}

/* --- plan ----------------------------------------------------------------- */

/* The template's name with {L} and {X} replaced. */
static char *expand_name(const char *tmpl, unsigned layer, unsigned expert)
{
    size_t cap = strlen(tmpl) + 32, o = 0;
    char *out = malloc(cap);

    if (!out)
        return NULL;
    for (const char *s = tmpl; *s;) {
        if (s[0] == '{' && (s[1] == 'L' || s[1] == 'X') && s[2] == '}') {
            o += (size_t)snprintf(out + o, cap - o, "%u", s[1] == 'L' ? layer : expert);
            s += 3;
        } else {
            out[o++] = *s++;
        }
        if (cap - o < 16) {
            char *grown = realloc(out, cap * 2);
            if (!grown) {
                free(out);
                return NULL;
            }
            out = grown;
            cap *= 2;
        }
    }
    out[o] = '\0';
    return out;
}

static int plan_add(wl_ckpt_plan *p, size_t *cap, const wl_tensor_tmpl *t, unsigned layer,
                    unsigned expert, wd_error *err)
{
    wl_plan_tensor *pt;
    uint64_t numel = 1, bits;

    if (t->ndim > WL_TMPL_MAX_DIMS)
        return wd_error_set(err, -EINVAL, "template %s: %u dims, at most %d", t->name, t->ndim,
                            WL_TMPL_MAX_DIMS);
    if (WD_GROW(p->tensors, *cap, p->n_tensors + 1, 256))
        return wd_error_set(err, -ENOMEM, "out of memory for the tensor list");
    pt = &p->tensors[p->n_tensors];
    memset(pt, 0, sizeof *pt);
    pt->dtype = t->dtype;
    pt->ndim = t->ndim;
    for (unsigned d = 0; d < t->ndim; d++) {
        int64_t v = t->shape[d];
        pt->shape[d] = v == WL_DIM_EXPERTS ? p->experts : v == WL_DIM_VOCAB ? p->vocab
                                                                        : (uint64_t)v;
        if (v <= 0 && v != WL_DIM_EXPERTS && v != WL_DIM_VOCAB)
            return wd_error_set(err, -EINVAL, "template %s: bad dimension %lld", t->name,
                                (long long)v);
        if (__builtin_mul_overflow(numel, pt->shape[d], &numel))
            return wd_error_set(err, -EOVERFLOW, "template %s: too many elements", t->name);
    }
    if (__builtin_mul_overflow(numel, (uint64_t)st_dtype_bits(t->dtype), &bits) || bits % 8)
        return wd_error_set(err, -EINVAL, "template %s: not a whole number of bytes", t->name);
    pt->nbytes = bits / 8;
    if (__builtin_add_overflow(p->total_bytes, pt->nbytes, &p->total_bytes))
        return wd_error_set(err, -EOVERFLOW, "checkpoint larger than 2^64-1 bytes");
    pt->name = expand_name(t->name, layer, expert);
    if (!pt->name)
        return wd_error_set(err, -ENOMEM, "out of memory for tensor names");
    p->n_tensors++;
    return 0;
}

int wl_ckpt_plan_make(const wl_ckpt_options *o, wl_ckpt_plan *out, wd_error *err)
{
    wl_ckpt_plan p;
    const wl_preset *pr;
    size_t cap = 0, i, j;
    uint64_t shard_size, cur = 0;
    int rc = 0;

    memset(&p, 0, sizeof p);
    if (out)
        memset(out, 0, sizeof *out);
    if (!o || !out || !o->preset)
        return wd_error_set(err, -EINVAL, "no preset");
    pr = o->preset;
    p.layers = o->layers ? o->layers : pr->layers;
    p.experts = o->experts ? o->experts : pr->experts;
    p.vocab = o->vocab ? o->vocab : pr->vocab;
    shard_size = o->shard_size ? o->shard_size : WL_DEFAULT_SHARD_SIZE;
    if (p.layers < 1 || p.experts < 1 || p.vocab < 1)
        return wd_error_set(err, -EINVAL, "layers, experts and vocab must be at least 1");

    for (i = 0; i < pr->n_tensors && rc == 0; i++)
        if (pr->tensors[i].scope == WL_HEAD)
            rc = plan_add(&p, &cap, &pr->tensors[i], 0, 0, err);
    for (unsigned l = 0; l < p.layers && rc == 0; l++) {
        for (i = 0; i < pr->n_tensors && rc == 0;) {
            const wl_tensor_tmpl *t = &pr->tensors[i];
            if (t->scope == WL_LAYER)
                rc = plan_add(&p, &cap, t, l, 0, err);
            if (t->scope != WL_EXPERT) {
                i++;
                continue;
            }
            /* A run of expert templates: all of expert 0, then expert 1... */
            for (j = i; j < pr->n_tensors && pr->tensors[j].scope == WL_EXPERT; j++)
                ;
            for (unsigned x = 0; x < p.experts && rc == 0; x++)
                for (size_t k = i; k < j && rc == 0; k++)
                    rc = plan_add(&p, &cap, &pr->tensors[k], l, x, err);
            i = j;
        }
    }
    for (i = 0; i < pr->n_tensors && rc == 0; i++)
        if (pr->tensors[i].scope == WL_TAIL)
            rc = plan_add(&p, &cap, &pr->tensors[i], 0, 0, err);
    if (rc < 0)
        goto out;

    /* Shards: a tensor joins the current one unless it would push it past
     * shard_size. */
    p.shards = calloc(p.n_tensors ? p.n_tensors : 1, sizeof *p.shards);
    if (!p.shards) {
        rc = wd_error_set(err, -ENOMEM, "out of memory for the shard list");
        goto out;
    }
    for (i = 0; i < p.n_tensors; i++) {
        wl_plan_tensor *t = &p.tensors[i];
        wl_plan_shard *s = p.n_shards ? &p.shards[p.n_shards - 1] : NULL;
        if (!s || (s->count && (cur + t->nbytes > shard_size || cur + t->nbytes < cur))) {
            s = &p.shards[p.n_shards++];
            s->first = i;
            cur = 0;
        }
        s->count++;
        s->data_bytes += t->nbytes;
        cur += t->nbytes;
        t->shard = (uint32_t)(p.n_shards - 1);
    }
    for (i = 0; i < p.n_shards; i++) {
        if (asprintf(&p.shards[i].file_name, "model-%05zu-of-%05zu.safetensors", i + 1,
                     p.n_shards) < 0) {
            p.shards[i].file_name = NULL;
            rc = wd_error_set(err, -ENOMEM, "out of memory for shard names");
            goto out;
        }
    }
    *out = p;
    memset(&p, 0, sizeof p);
out:
    wl_ckpt_plan_free(&p);
    return rc;
}

void wl_ckpt_plan_free(wl_ckpt_plan *p)
{
    if (!p)
        return;
    for (size_t i = 0; i < p->n_tensors; i++)
        free(p->tensors[i].name);
    for (size_t i = 0; p->shards && i < p->n_shards; i++)
        free(p->shards[i].file_name);
    free(p->tensors);
    free(p->shards);
    memset(p, 0, sizeof *p);
}

/* --- files ------------------------------------------------------------------ */

static int write_all(int fd, const void *buf, size_t n)
{
    const char *p = buf;

    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (w == 0)
            return -EIO;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Checkpoint files already in dir (names, malloc'd). */
static int list_ckpt_files(const char *dir, char ***out, size_t *n, wd_error *err)
{
    DIR *d = opendir(dir);
    struct dirent *de;
    char **v = NULL;
    size_t cnt = 0, cap = 0;
    int rc = 0;

    *out = NULL;
    *n = 0;
    if (!d)
        return wd_error_set(err, -errno, "%s: cannot open directory: %s", dir, strerror(errno));
    while ((de = readdir(d))) {
        if (!wl_is_checkpoint_file(de->d_name))
            continue;
        if (WD_GROW(v, cap, cnt + 1, 16)) {
            rc = wd_error_set(err, -ENOMEM, "out of memory");
            break;
        }
        if (!(v[cnt] = strdup(de->d_name))) {
            rc = wd_error_set(err, -ENOMEM, "out of memory");
            break;
        }
        cnt++;
    }
    closedir(d);
    if (rc < 0) {
        for (size_t i = 0; i < cnt; i++)
            free(v[i]);
        free(v);
        return rc;
    }
    *out = v;
    *n = cnt;
    return 0;
}

/* mkdir -p; the folders it made go into made[] (deepest last) so that a
 * failed run can take them away again. */
static int make_dirs(const char *path, char ***made, size_t *n_made, wd_error *err)
{
    char *p = strdup(path), **v = NULL;
    size_t n = 0, len;
    int rc = 0;

    *made = NULL;
    *n_made = 0;
    if (!p)
        return wd_error_set(err, -ENOMEM, "out of memory");
    len = strlen(p);
    v = calloc(len + 1, sizeof *v);
    if (!v) {
        free(p);
        return wd_error_set(err, -ENOMEM, "out of memory");
    }
    for (size_t i = 1; i <= len && rc == 0; i++) {
        if (p[i] != '/' && p[i] != '\0')
            continue;
        p[i] = '\0';
        if (mkdir(p, 0755) == 0) {
            if (!(v[n] = strdup(p)))
                rc = wd_error_set(err, -ENOMEM, "out of memory");
            else
                n++;
        } else if (errno != EEXIST) {
            rc = wd_error_set(err, -errno, "%s: cannot create directory: %s", p, strerror(errno));
        }
        if (i < len)
            p[i] = '/';
    }
    free(p);
    *made = v;
    *n_made = n;
    return rc;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Writes one shard to tmp: header, then every tensor's bytes. */
static int write_shard(const wl_ckpt_options *o, const wl_ckpt_plan *p, size_t si,
                       const char *tmp, unsigned char *buf, uint64_t *file_bytes, wd_error *err)
{
    const wl_plan_shard *s = &p->shards[si];
    st_tensor_spec *specs = calloc(s->count ? s->count : 1, sizeof *specs);
    const st_meta meta[] = {{(char *)"format", (char *)"pt"}};
    char *hdr = NULL, msg[512];
    size_t hlen = 0;
    uint64_t dlen = 0;
    int fd = -1, rc;

    if (!specs)
        return wd_error_set(err, -ENOMEM, "out of memory");
    for (size_t i = 0; i < s->count; i++) {
        const wl_plan_tensor *t = &p->tensors[s->first + i];
        specs[i] = (st_tensor_spec){t->name, t->dtype, t->ndim, t->shape};
    }
    rc = st_build_header(specs, s->count, meta, 1, &hdr, &hlen, &dlen, msg, sizeof msg);
    if (rc < 0) {
        rc = wd_error_set(err, rc, "%s: %s", s->file_name, msg);
        goto out;
    }
    fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
        rc = wd_error_set(err, -errno, "%s: cannot create: %s", tmp, strerror(errno));
        goto out;
    }
    rc = write_all(fd, hdr, hlen);
    if (rc == 0 && o->sparse) {
        if (ftruncate(fd, (off_t)(hlen + dlen)) < 0)
            rc = -errno;
    }
    for (size_t i = 0; rc == 0 && !o->sparse && i < s->count; i++) {
        const wl_plan_tensor *t = &p->tensors[s->first + i];
        for (uint64_t off = 0; rc == 0 && off < t->nbytes; off += CHUNK) {
            size_t n = t->nbytes - off < CHUNK ? (size_t)(t->nbytes - off) : CHUNK;
            wl_ckpt_fill(o->seed, t->name, off, buf, n);
            rc = write_all(fd, buf, n);
        }
    }
    if (rc < 0) {
        rc = wd_error_set(err, rc, "%s: cannot write: %s", tmp, strerror(-rc));
        goto out;
    }
    if (close(fd) < 0) {
        fd = -1;
        rc = wd_error_set(err, -errno, "%s: cannot write: %s", tmp, strerror(errno));
        goto out;
    }
    fd = -1;
    *file_bytes = hlen + dlen;
out:
    if (fd >= 0)
        close(fd);
    free(hdr);
    free(specs);
    return rc;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int cmp_by_name(const void *a, const void *b)
{
    const wl_plan_tensor *x = *(const wl_plan_tensor *const *)a;
    const wl_plan_tensor *y = *(const wl_plan_tensor *const *)b;
    return strcmp(x->name, y->name);
}

/* The index as Hugging Face writes it: json.dumps(indent=2, sort_keys=True). */
static int write_index(const wl_ckpt_plan *p, const char *tmp, uint64_t *file_bytes,
                       wd_error *err)
{
    const wl_plan_tensor **sorted = calloc(p->n_tensors ? p->n_tensors : 1, sizeof *sorted);
    char *text = NULL;
    size_t len = 0;
    FILE *f = NULL;
    int fd = -1, rc = 0;

    if (!sorted)
        return wd_error_set(err, -ENOMEM, "out of memory");
    for (size_t i = 0; i < p->n_tensors; i++)
        sorted[i] = &p->tensors[i];
    qsort(sorted, p->n_tensors, sizeof *sorted, cmp_by_name);
    f = open_memstream(&text, &len);
    if (!f) {
        rc = wd_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    fprintf(f, "{\n  \"metadata\": {\n    \"total_size\": %llu\n  },\n  \"weight_map\": {",
            (unsigned long long)p->total_bytes);
    for (size_t i = 0; i < p->n_tensors; i++) {
        char *qn = st_json_quote(sorted[i]->name);
        char *qf = st_json_quote(p->shards[sorted[i]->shard].file_name);
        if (!qn || !qf) {
            free(qn);
            free(qf);
            rc = wd_error_set(err, -ENOMEM, "out of memory");
            goto out;
        }
        fprintf(f, "%s\n    %s: %s", i ? "," : "", qn, qf);
        free(qn);
        free(qf);
    }
    fprintf(f, "\n  }\n}\n");
    if (fclose(f) != 0) {
        f = NULL;
        rc = wd_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    f = NULL;
    fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
        rc = wd_error_set(err, -errno, "%s: cannot create: %s", tmp, strerror(errno));
        goto out;
    }
    rc = write_all(fd, text, len);
    if (rc == 0 && close(fd) < 0)
        rc = -errno;
    fd = -1;
    if (rc < 0) {
        rc = wd_error_set(err, rc, "%s: cannot write: %s", tmp, strerror(-rc));
        goto out;
    }
    *file_bytes = len;
out:
    if (f)
        fclose(f);
    if (fd >= 0)
        close(fd);
    free(text);
    free(sorted);
    return rc;
}

int wl_ckpt_write(const wl_ckpt_options *o, wl_ckpt_result *res, wd_error *err)
{
    wl_ckpt_plan p = {0};
    struct stat sb;
    char **made = NULL, **old = NULL, **tmp = NULL, **final = NULL;
    size_t n_made = 0, n_old = 0, n_files = 0, renamed = 0, i;
    unsigned char *buf = NULL;
    uint64_t file_bytes = 0, fb = 0;
    double t0 = now_s();
    int rc;

    if (res)
        memset(res, 0, sizeof *res);
    if (!o || !o->out_dir || !*o->out_dir)
        return wd_error_set(err, -EINVAL, "no output directory");
    rc = wl_ckpt_plan_make(o, &p, err);
    if (rc < 0)
        return rc;

    if (stat(o->out_dir, &sb) == 0) {
        if (!S_ISDIR(sb.st_mode)) {
            rc = wd_error_set(err, -ENOTDIR, "%s: exists and is not a directory", o->out_dir);
            goto out;
        }
        rc = list_ckpt_files(o->out_dir, &old, &n_old, err);
        if (rc < 0)
            goto out;
        if (n_old)
            qsort(old, n_old, sizeof *old, cmp_str);   /* a stable message */
        if (n_old && !o->force) {
            rc = wd_error_set(err, -EEXIST,
                              "%s: already holds a checkpoint (%s%s); --force replaces it",
                              o->out_dir, old[0], n_old > 1 ? " and more" : "");
            goto out;
        }
    } else if (errno != ENOENT) {
        rc = wd_error_set(err, -errno, "%s: %s", o->out_dir, strerror(errno));
        goto out;
    }
    rc = make_dirs(o->out_dir, &made, &n_made, err);
    if (rc < 0)
        goto out;

    n_files = p.n_shards + 1;   /* the shards, then the index */
    tmp = calloc(n_files, sizeof *tmp);
    final = calloc(n_files, sizeof *final);
    buf = o->sparse ? NULL : malloc(CHUNK);
    if (!tmp || !final || (!o->sparse && !buf)) {
        rc = wd_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    for (i = 0; i < n_files; i++) {
        const char *name = i < p.n_shards ? p.shards[i].file_name : WL_DEFAULT_INDEX;
        char *dot;
        final[i] = wl_join_path(o->out_dir, name);
        /* Hidden temporary names: discovery skips dot files. */
        if (asprintf(&dot, ".%s.tmp.%ld", name, (long)getpid()) < 0)
            dot = NULL;
        tmp[i] = dot ? wl_join_path(o->out_dir, dot) : NULL;
        free(dot);
        if (!final[i] || !tmp[i]) {
            rc = wd_error_set(err, -ENOMEM, "out of memory");
            goto out;
        }
    }

    for (i = 0; i < p.n_shards; i++) {
        char sz[32];
        rc = write_shard(o, &p, i, tmp[i], buf, &fb, err);
        if (rc < 0)
            goto out;
        file_bytes += fb;
        if (o->log)
            fprintf(o->log, "  %s  %6zu tensors  %s\n", p.shards[i].file_name,
                    p.shards[i].count, wd_size_format(p.shards[i].data_bytes, sz, sizeof sz));
    }
    rc = write_index(&p, tmp[p.n_shards], &fb, err);
    if (rc < 0)
        goto out;
    file_bytes += fb;

    for (renamed = 0; renamed < n_files; renamed++) {
        if (rename(tmp[renamed], final[renamed]) < 0) {
            rc = wd_error_set(err, -errno, "%s: cannot rename to %s: %s", tmp[renamed],
                              final[renamed], strerror(errno));
            goto out;
        }
    }
    /* --force: what was there before and is not ours now goes. */
    for (i = 0; i < n_old; i++) {
        int ours = strcmp(old[i], WL_DEFAULT_INDEX) == 0;
        for (size_t k = 0; k < p.n_shards && !ours; k++)
            ours = strcmp(old[i], p.shards[k].file_name) == 0;
        if (!ours) {
            char *path = wl_join_path(o->out_dir, old[i]);
            if (path && unlink(path) < 0 && errno != ENOENT)
                fprintf(stderr, "warning: %s: cannot remove: %s\n", path, strerror(errno));
            free(path);
        }
    }
    if (res) {
        res->n_shards = p.n_shards;
        res->n_tensors = p.n_tensors;
        res->total_bytes = p.total_bytes;
        res->file_bytes = file_bytes;
        res->seconds = now_s() - t0;
    }
    if (o->log) {
        char sz[32], rate[32];
        double secs = now_s() - t0;
        if (o->sparse)
            snprintf(rate, sizeof rate, "sparse");   /* a rate of holes means nothing */
        else
            wd_rate_format(secs > 0 ? (double)file_bytes / secs : 0, rate, sizeof rate);
        fprintf(o->log, "wrote %s: %s (%u layers, %u experts, vocab %llu), %zu shards, "
                "%zu tensors, %s in %.2f s (%s)\n", o->out_dir, o->preset->name, p.layers,
                p.experts, (unsigned long long)p.vocab, p.n_shards, p.n_tensors,
                wd_size_format(p.total_bytes, sz, sizeof sz), secs, rate);
    }
    rc = 0;
out:
    if (rc < 0) {
        /* Leave nothing behind: temporaries, renamed files, new folders. */
        for (i = 0; tmp && i < n_files; i++) {
            if (tmp[i])
                unlink(tmp[i]);
            if (i < renamed && final[i])
                unlink(final[i]);
        }
        for (i = n_made; i > 0; i--)
            rmdir(made[i - 1]);
    }
    for (i = 0; i < n_files; i++) {
        if (tmp)
            free(tmp[i]);
        if (final)
            free(final[i]);
    }
    for (i = 0; i < n_made; i++)
        free(made[i]);
    for (i = 0; i < n_old; i++)
        free(old[i]);
    free(made);
    free(old);
    free(tmp);
    free(final);
    free(buf);
    wl_ckpt_plan_free(&p);
    return rc;
}
