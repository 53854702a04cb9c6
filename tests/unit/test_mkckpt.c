/* ckpt_writer.c (weightd-mkckpt's engine): the presets, the plan and its
 * shards, the contents, and the files it writes, read back through
 * checkpoint.c. */
#include "tests/unit/suites.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loader/checkpoint.h"
#include "loader/ckpt_writer.h"

/* A small model in the same terms as the real presets: 9094 bytes. */
static const wl_tensor_tmpl tiny_tmpl[] = {
    {WL_HEAD, "embed", ST_BF16, 2, {WL_DIM_VOCAB, 16}},
    {WL_LAYER, "layers.{L}.norm", ST_F32, 1, {16}},
    {WL_LAYER, "layers.{L}.router", ST_BF16, 2, {WL_DIM_EXPERTS, 16}},
    {WL_EXPERT, "layers.{L}.experts.{X}.up", ST_BF16, 2, {32, 16}},
    {WL_EXPERT, "layers.{L}.experts.{X}.down", ST_U8, 3, {16, 32, 2}},
    {WL_LAYER, "layers.{L}.scale", ST_F8_E8M0, 1, {3}},
    {WL_TAIL, "head", ST_BF16, 2, {WL_DIM_VOCAB, 16}},
};
static const wl_preset tiny = {"tiny", "test/tiny", 2, 2, 10, tiny_tmpl,
                               sizeof tiny_tmpl / sizeof tiny_tmpl[0]};


static wl_ckpt_options tiny_opts(const char *dir)
{
    wl_ckpt_options o = {0};
    o.preset = &tiny;
    o.out_dir = dir;
    o.seed = 7;
    return o;
}

static void write_ok(const wl_ckpt_options *o, wl_ckpt_result *res)
{
    wd_error e = {0};
    int rc = wl_ckpt_write(o, res, &e);
    ck_assert_msg(rc == 0, "rc %d: %s", rc, e.msg);
}

static void open_ok(const char *path, wl_checkpoint *c)
{
    wd_error e = {0};
    int rc = wl_checkpoint_open(path, c, &e);
    ck_assert_msg(rc == 0, "rc %d: %s", rc, e.msg);
}

static unsigned char *read_all(const char *path, size_t *len)
{
    struct stat sb;
    unsigned char *p;
    int fd = open(path, O_RDONLY);

    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(fstat(fd, &sb), 0);
    p = malloc((size_t)sb.st_size + 1);
    ck_assert_int_eq(read(fd, p, (size_t)sb.st_size), sb.st_size);
    close(fd);
    *len = (size_t)sb.st_size;
    return p;
}

/* The tensor's bytes on disk equal what the generator makes for it. */
static void check_contents(const wl_checkpoint *c, const char *name, uint64_t seed, size_t max)
{
    const wl_tensor *t = wl_checkpoint_find(c, name);
    const wl_shard *s;
    size_t n;
    unsigned char *have, *want;
    int fd;

    ck_assert_msg(t != NULL, "no tensor %s", name);
    s = &c->shards[t->shard];
    n = st_tensor_nbytes(t->st) < max ? (size_t)st_tensor_nbytes(t->st) : max;
    have = malloc(n + 1);
    want = malloc(n + 1);
    fd = open(s->path, O_RDONLY);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(pread(fd, have, n, (off_t)(s->st.data_offset + t->st->begin)), (ssize_t)n);
    close(fd);
    wl_ckpt_fill(seed, name, 0, want, n);
    ck_assert_msg(memcmp(have, want, n) == 0, "contents of %s", name);
    free(have);
    free(want);
}

static int count_entries(const char *dir, const char *needle)
{
    DIR *d = opendir(dir);
    struct dirent *de;
    int n = 0;

    ck_assert_ptr_nonnull(d);
    while ((de = readdir(d)))
        if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..") && strstr(de->d_name, needle))
            n++;
    closedir(d);
    return n;
}

/* --- presets and plans ---------------------------------------------------- */

START_TEST(test_presets)
{
    /* Full-size plans of the real models: tensor counts and bytes as the
     * models' configs give them (Mixtral 46.7B and Qwen3-30B-A3B 30.5B
     * parameters in BF16; gpt-oss-120b's 65.2 GB with MXFP4 experts). */
    static const struct {
        const char *name;
        size_t tensors;
        uint64_t bytes;
    } want[] = {
        {"gpt-oss-120b", 687, 65248815744ULL},
        {"mixtral-8x7b", 995, 93405585408ULL},
        {"qwen3-moe", 18867, 61064245248ULL},
    };

    ck_assert_uint_eq(wl_n_presets, 3);
    for (size_t i = 0; i < 3; i++) {
        wl_ckpt_options o = {0};
        wl_ckpt_plan p;
        wd_error e = {0};

        o.preset = wl_preset_find(want[i].name);
        ck_assert_ptr_nonnull(o.preset);
        ck_assert_int_eq(wl_ckpt_plan_make(&o, &p, &e), 0);
        ck_assert_uint_eq(p.n_tensors, want[i].tensors);
        ck_assert_uint_eq(p.total_bytes, want[i].bytes);
        ck_assert_uint_eq(p.layers, o.preset->layers);
        /* 5 GB shards by default. */
        for (size_t k = 0; k < p.n_shards; k++)
            ck_assert(p.shards[k].data_bytes <= WL_DEFAULT_SHARD_SIZE || p.shards[k].count == 1);
        ck_assert_uint_ge(p.n_shards, want[i].bytes / WL_DEFAULT_SHARD_SIZE);
        wl_ckpt_plan_free(&p);
    }
    ck_assert_ptr_null(wl_preset_find("gpt-oss"));
    ck_assert_ptr_null(wl_preset_find(NULL));
}
END_TEST

START_TEST(test_plan_names_and_shapes)
{
    wl_ckpt_options o = {0};
    wl_ckpt_plan p;
    wd_error e = {0};
    const wl_plan_tensor *t;

    o.preset = wl_preset_find("gpt-oss-120b");
    o.layers = 2;
    o.experts = 4;
    o.vocab = 8192;
    ck_assert_int_eq(wl_ckpt_plan_make(&o, &p, &e), 0);
    ck_assert_uint_eq(p.n_tensors, 3 + 2 * 19);
    ck_assert_str_eq(p.tensors[0].name, "model.embed_tokens.weight");
    ck_assert_uint_eq(p.tensors[0].shape[0], 8192);
    ck_assert_str_eq(p.tensors[1].name, "model.layers.0.input_layernorm.weight");
    t = &p.tensors[1 + 19 + 13];
    ck_assert_str_eq(t->name, "model.layers.1.mlp.experts.gate_up_proj_blocks");
    ck_assert_int_eq(t->dtype, ST_U8);
    ck_assert_uint_eq(t->ndim, 4);
    ck_assert_uint_eq(t->shape[0], 4);
    ck_assert_uint_eq(t->shape[1], 5760);
    ck_assert_uint_eq(t->shape[2], 90);
    ck_assert_uint_eq(t->shape[3], 16);
    ck_assert_str_eq(p.tensors[1 + 19 + 14].name,
                     "model.layers.1.mlp.experts.gate_up_proj_scales");
    ck_assert_int_eq(p.tensors[1 + 19 + 14].dtype, ST_F8_E8M0);
    ck_assert_str_eq(p.tensors[p.n_tensors - 1].name, "lm_head.weight");
    wl_ckpt_plan_free(&p);

    /* Expert templates run expert by expert inside each layer. */
    o.preset = wl_preset_find("mixtral-8x7b");
    o.layers = 1;
    o.experts = 2;
    o.vocab = 0;   /* the model's */
    ck_assert_int_eq(wl_ckpt_plan_make(&o, &p, &e), 0);
    ck_assert_uint_eq(p.vocab, 32000);
    ck_assert_uint_eq(p.n_tensors, 3 + 7 + 6);
    ck_assert_str_eq(p.tensors[7].name, "model.layers.0.block_sparse_moe.gate.weight");
    ck_assert_str_eq(p.tensors[8].name, "model.layers.0.block_sparse_moe.experts.0.w1.weight");
    ck_assert_str_eq(p.tensors[10].name, "model.layers.0.block_sparse_moe.experts.0.w3.weight");
    ck_assert_str_eq(p.tensors[11].name, "model.layers.0.block_sparse_moe.experts.1.w1.weight");
    ck_assert_uint_eq(p.tensors[12].shape[0], 4096);
    ck_assert_uint_eq(p.tensors[12].shape[1], 14336);
    wl_ckpt_plan_free(&p);

    o.preset = &tiny;
    o.layers = 0;
    o.experts = 0;
    ck_assert_int_eq(wl_ckpt_plan_make(&o, &p, &e), 0);
    ck_assert_uint_eq(p.total_bytes, 9094);
    ck_assert_str_eq(p.tensors[3].name, "layers.0.experts.0.up");
    ck_assert_str_eq(p.tensors[4].name, "layers.0.experts.0.down");
    ck_assert_str_eq(p.tensors[5].name, "layers.0.experts.1.up");
    ck_assert_str_eq(p.tensors[7].name, "layers.0.scale");
    ck_assert_str_eq(p.tensors[8].name, "layers.1.norm");
    wl_ckpt_plan_free(&p);
}
END_TEST

START_TEST(test_plan_sharding)
{
    static const uint64_t sizes[] = {1000, 3000, 5000, 100000};

    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        wl_ckpt_options o = tiny_opts("unused");
        wl_ckpt_plan p;
        wd_error e = {0};
        size_t next = 0;

        o.shard_size = sizes[k];
        ck_assert_int_eq(wl_ckpt_plan_make(&o, &p, &e), 0);
        for (size_t i = 0; i < p.n_shards; i++) {
            const wl_plan_shard *s = &p.shards[i];
            char name[64];
            uint64_t sum = 0;

            snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, p.n_shards);
            ck_assert_str_eq(s->file_name, name);
            ck_assert_uint_eq(s->first, next);   /* in order, no tensor skipped */
            ck_assert_uint_ge(s->count, 1);
            for (size_t j = s->first; j < s->first + s->count; j++) {
                ck_assert_uint_eq(p.tensors[j].shard, i);
                sum += p.tensors[j].nbytes;
            }
            ck_assert_uint_eq(sum, s->data_bytes);
            /* Within the limit, or one tensor alone that is over it. */
            ck_assert(s->data_bytes <= sizes[k] || s->count == 1);
            /* Greedy: the next tensor did not fit. */
            if (i + 1 < p.n_shards)
                ck_assert_uint_gt(s->data_bytes + p.tensors[s->first + s->count].nbytes, sizes[k]);
            next = s->first + s->count;
        }
        ck_assert_uint_eq(next, p.n_tensors);
        if (sizes[k] == 100000)
            ck_assert_uint_eq(p.n_shards, 1);
        if (sizes[k] == 1000) {
            /* The 1024-byte expert tensors each sit alone. */
            ck_assert_uint_eq(p.shards[p.tensors[3].shard].count, 1);
            ck_assert_uint_eq(p.shards[p.tensors[4].shard].count, 1);
        }
        wl_ckpt_plan_free(&p);
    }
}
END_TEST

START_TEST(test_plan_errors)
{
    static const wl_tensor_tmpl bad_dim[] = {{WL_HEAD, "x", ST_U8, 1, {0}}};
    static const wl_tensor_tmpl bad_bits[] = {{WL_HEAD, "x", ST_F4, 1, {3}}};
    const wl_preset p1 = {"b", "b", 1, 1, 1, bad_dim, 1}, p2 = {"b", "b", 1, 1, 1, bad_bits, 1};
    wl_ckpt_options o = {0};
    wl_ckpt_plan p;
    wd_error e = {0};

    ck_assert_int_eq(wl_ckpt_plan_make(&o, &p, &e), -EINVAL);
    o.preset = &p1;
    ck_assert_int_eq(wl_ckpt_plan_make(&o, &p, &e), -EINVAL);
    ck_assert_ptr_nonnull(strstr(e.msg, "bad dimension"));
    o.preset = &p2;
    ck_assert_int_eq(wl_ckpt_plan_make(&o, &p, &e), -EINVAL);
    ck_assert_ptr_nonnull(strstr(e.msg, "whole number of bytes"));
    ck_assert_ptr_null(p.tensors);
}
END_TEST

START_TEST(test_fill)
{
    unsigned char a[100], b[100], c[100];

    wl_ckpt_fill(1, "w", 0, a, sizeof a);
    wl_ckpt_fill(1, "w", 0, b, sizeof b);
    ck_assert_int_eq(memcmp(a, b, sizeof a), 0);
    /* Any range on its own gives the same bytes as the whole. */
    for (uint64_t off = 0; off < 20; off++) {
        memset(b, 0, sizeof b);
        wl_ckpt_fill(1, "w", off, b, 37);
        ck_assert_int_eq(memcmp(a + off, b, 37), 0);
    }
    wl_ckpt_fill(2, "w", 0, c, sizeof c);
    ck_assert_int_ne(memcmp(a, c, sizeof a), 0);
    wl_ckpt_fill(1, "w2", 0, c, sizeof c);
    ck_assert_int_ne(memcmp(a, c, sizeof a), 0);
    wl_ckpt_fill(1, "w", 0, c, 0);   /* nothing, no crash */
}
END_TEST

/* --- writing ------------------------------------------------------------------- */

START_TEST(test_write_tiny)
{
    char *dir = wd_test_path("out/nested"), *index, *text, *shard1;
    wl_ckpt_options o = tiny_opts(dir);
    wl_ckpt_result res;
    wl_ckpt_plan p;
    wl_checkpoint c;
    wd_error e = {0};
    size_t len;

    o.shard_size = 3000;
    write_ok(&o, &res);
    ck_assert_int_eq(wl_ckpt_plan_make(&o, &p, &e), 0);
    ck_assert_uint_eq(res.n_shards, p.n_shards);
    ck_assert_uint_eq(res.n_tensors, p.n_tensors);
    ck_assert_uint_eq(res.total_bytes, 9094);
    ck_assert_uint_ge(p.n_shards, 4);

    open_ok(dir, &c);
    ck_assert_ptr_nonnull(c.index_path);
    ck_assert_uint_eq(c.n_shards, p.n_shards);
    ck_assert_uint_eq(c.n_tensors, p.n_tensors);
    ck_assert_uint_eq(c.total_bytes, 9094);
    /* File order and shards are the plan's. */
    for (size_t i = 0; i < p.n_tensors; i++) {
        ck_assert_str_eq(c.tensors[i].st->name, p.tensors[i].name);
        ck_assert_uint_eq(c.tensors[i].shard, p.tensors[i].shard);
        ck_assert_int_eq(c.tensors[i].st->dtype, p.tensors[i].dtype);
        ck_assert_uint_eq(st_tensor_nbytes(c.tensors[i].st), p.tensors[i].nbytes);
        check_contents(&c, p.tensors[i].name, 7, 4096);
    }
    ck_assert_uint_eq(c.shards[0].st.n_meta, 1);
    ck_assert_str_eq(c.shards[0].st.meta[0].key, "format");
    ck_assert_str_eq(c.shards[0].st.meta[0].value, "pt");
    ck_assert_uint_eq(c.shards[0].st.header_len % 8, 0);
    wl_checkpoint_close(&c);

    /* The index as Hugging Face writes it, total_size included. */
    ck_assert_int_ge(asprintf(&index, "%s/model.safetensors.index.json", dir), 0);
    text = (char *)read_all(index, &len);
    text[len] = '\0';
    ck_assert_ptr_nonnull(strstr(text, "\"total_size\": 9094"));
    ck_assert_ptr_nonnull(strstr(text, "\"embed\": \"model-00001-of-"));
    ck_assert_int_eq(text[len - 1], '\n');
    free(text);
    free(index);
    /* Nothing temporary left; the shard files by their names. */
    ck_assert_int_eq(count_entries(dir, ".tmp"), 0);
    ck_assert_int_eq(count_entries(dir, ".safetensors"), (int)p.n_shards + 1);
    ck_assert_int_ge(asprintf(&shard1, "%s/%s", dir, p.shards[0].file_name), 0);
    ck_assert_int_eq(access(shard1, F_OK), 0);
    free(shard1);
    wl_ckpt_plan_free(&p);
    free(dir);
}
END_TEST

START_TEST(test_write_one_shard_has_index)
{
    char *dir = wd_test_path("one");
    wl_ckpt_options o = tiny_opts(dir);
    wl_checkpoint c;

    write_ok(&o, NULL);
    open_ok(dir, &c);
    ck_assert_uint_eq(c.n_shards, 1);
    ck_assert_ptr_nonnull(c.index_path);
    ck_assert_ptr_nonnull(strstr(c.shards[0].path, "model-00001-of-00001.safetensors"));
    wl_checkpoint_close(&c);
    free(dir);
}
END_TEST

START_TEST(test_write_reproducible)
{
    char *d1 = wd_test_path("s1"), *d2 = wd_test_path("s2"), *d3 = wd_test_path("s3");
    wl_ckpt_options o = tiny_opts(d1);
    wl_ckpt_plan p;
    wd_error e = {0};

    o.shard_size = 5000;
    write_ok(&o, NULL);
    o.out_dir = d2;
    write_ok(&o, NULL);
    o.out_dir = d3;
    o.seed = 8;
    write_ok(&o, NULL);
    ck_assert_int_eq(wl_ckpt_plan_make(&o, &p, &e), 0);
    for (size_t i = 0; i <= p.n_shards; i++) {
        const char *name = i < p.n_shards ? p.shards[i].file_name : "model.safetensors.index.json";
        char *p1, *p2, *p3;
        unsigned char *b1, *b2, *b3;
        size_t l1, l2, l3;

        ck_assert_int_ge(asprintf(&p1, "%s/%s", d1, name), 0);
        ck_assert_int_ge(asprintf(&p2, "%s/%s", d2, name), 0);
        ck_assert_int_ge(asprintf(&p3, "%s/%s", d3, name), 0);
        b1 = read_all(p1, &l1);
        b2 = read_all(p2, &l2);
        b3 = read_all(p3, &l3);
        ck_assert_uint_eq(l1, l2);
        ck_assert_int_eq(memcmp(b1, b2, l1), 0);
        /* Another seed: same layout, other bytes (the index is the same). */
        ck_assert_uint_eq(l1, l3);
        if (i < p.n_shards)
            ck_assert_int_ne(memcmp(b1, b3, l1), 0);
        else
            ck_assert_int_eq(memcmp(b1, b3, l1), 0);
        free(b1);
        free(b2);
        free(b3);
        free(p1);
        free(p2);
        free(p3);
    }
    wl_ckpt_plan_free(&p);
    free(d1);
    free(d2);
    free(d3);
}
END_TEST

START_TEST(test_write_refuses_existing)
{
    char *dir = wd_test_path("x"), *shard, *junk;
    wl_ckpt_options o = tiny_opts(dir);
    wl_checkpoint c;
    wd_error e = {0};
    struct stat before, after;

    o.shard_size = 1000;   /* 11 shards */
    write_ok(&o, NULL);
    ck_assert_int_ge(asprintf(&shard, "%s/model-00001-of-00011.safetensors", dir), 0);
    ck_assert_int_eq(stat(shard, &before), 0);
    /* Again without --force: refused, nothing touched. */
    o.shard_size = 100000;
    ck_assert_int_eq(wl_ckpt_write(&o, NULL, &e), -EEXIST);
    ck_assert_ptr_nonnull(strstr(e.msg, "--force"));
    ck_assert_int_eq(stat(shard, &after), 0);
    ck_assert_int_eq(before.st_ino, after.st_ino);
    ck_assert_int_eq(count_entries(dir, "-of-00011.safetensors"), 11);
    /* With force: replaced, the old shards gone, other files kept. */
    ck_assert_int_ge(asprintf(&junk, "%s/config.json", dir), 0);
    close(open(junk, O_WRONLY | O_CREAT, 0644));
    o.force = true;
    write_ok(&o, NULL);
    ck_assert_int_eq(count_entries(dir, "-of-00011.safetensors"), 0);
    ck_assert_int_eq(count_entries(dir, ".safetensors"), 2);
    ck_assert_int_eq(access(junk, F_OK), 0);
    open_ok(dir, &c);
    ck_assert_uint_eq(c.n_shards, 1);
    wl_checkpoint_close(&c);
    /* Also in directory mode (no index): only the new shard is there. */
    {
        char *idx;
        ck_assert_int_ge(asprintf(&idx, "%s/model.safetensors.index.json", dir), 0);
        ck_assert_int_eq(unlink(idx), 0);
        open_ok(dir, &c);
        ck_assert_uint_eq(c.n_shards, 1);
        wl_checkpoint_close(&c);
        free(idx);
    }
    free(junk);
    free(shard);
    free(dir);
}
END_TEST

START_TEST(test_write_failure_leaves_nothing)
{
    char *dir = wd_test_path("fail"), *blocker;
    wl_ckpt_options o = tiny_opts(dir);
    wd_error e = {0};

    /* A folder where shard 3's temporary file must go makes the write
     * fail after two shards are complete. */
    ck_assert_int_eq(mkdir(dir, 0755), 0);
    ck_assert_int_ge(asprintf(&blocker, "%s/.model-00003-of-00011.safetensors.tmp.%ld", dir,
                              (long)getpid()), 0);
    ck_assert_int_eq(mkdir(blocker, 0755), 0);
    o.shard_size = 1000;
    ck_assert_int_eq(wl_ckpt_write(&o, NULL, &e), -EEXIST);
    ck_assert_ptr_nonnull(strstr(e.msg, "cannot create"));
    ck_assert_int_eq(count_entries(dir, "model"), 1);   /* the blocker alone */
    ck_assert_int_eq(rmdir(blocker), 0);
    ck_assert_int_eq(rmdir(dir), 0);
    free(blocker);
    free(dir);
}
END_TEST

START_TEST(test_write_errors)
{
    char *file = wd_test_path("plain");
    wl_ckpt_options o = tiny_opts(file);
    wd_error e = {0};

    close(open(file, O_WRONLY | O_CREAT, 0644));
    ck_assert_int_eq(wl_ckpt_write(&o, NULL, &e), -ENOTDIR);
    o.out_dir = NULL;
    ck_assert_int_eq(wl_ckpt_write(&o, NULL, &e), -EINVAL);
    ck_assert_int_eq(wl_ckpt_write(NULL, NULL, &e), -EINVAL);
    free(file);
}
END_TEST

/* The real presets, cut down, through the real reader. */
START_TEST(test_write_gpt_oss)
{
    char *dir = wd_test_path("gpt");
    wl_ckpt_options o = {0};
    wl_checkpoint c;
    const wl_tensor *t;

    o.preset = wl_preset_find("gpt-oss-120b");
    o.out_dir = dir;
    o.layers = 1;
    o.experts = 1;
    o.vocab = 64;
    o.seed = 42;
    o.shard_size = 16000000;
    write_ok(&o, NULL);
    open_ok(dir, &c);
    ck_assert_uint_eq(c.n_tensors, 3 + 19);
    ck_assert_uint_ge(c.n_shards, 3);
    t = wl_checkpoint_find(&c, "model.layers.0.mlp.experts.gate_up_proj_blocks");
    ck_assert_ptr_nonnull(t);
    ck_assert_int_eq(t->st->dtype, ST_U8);
    ck_assert_uint_eq(t->st->ndim, 4);
    ck_assert_uint_eq(st_tensor_nbytes(t->st), 5760ULL * 90 * 16);
    t = wl_checkpoint_find(&c, "model.layers.0.mlp.experts.down_proj_scales");
    ck_assert_int_eq(t->st->dtype, ST_F8_E8M0);
    ck_assert_uint_eq(st_tensor_numel(t->st), 2880ULL * 90);
    t = wl_checkpoint_find(&c, "model.layers.0.self_attn.sinks");
    ck_assert_uint_eq(t->st->shape[0], 64);
    check_contents(&c, "model.layers.0.self_attn.q_proj.weight", 42, 1 << 20);
    check_contents(&c, "lm_head.weight", 42, 1 << 20);
    wl_checkpoint_close(&c);
    free(dir);
}
END_TEST

START_TEST(test_write_qwen3)
{
    char *dir = wd_test_path("qwen");
    wl_ckpt_options o = {0};
    wl_checkpoint c;
    const wl_tensor *t;

    o.preset = wl_preset_find("qwen3-moe");
    o.out_dir = dir;
    o.layers = 1;
    o.experts = 2;
    o.vocab = 64;
    write_ok(&o, NULL);
    open_ok(dir, &c);
    ck_assert_uint_eq(c.n_tensors, 3 + 9 + 6);
    t = wl_checkpoint_find(&c, "model.layers.0.mlp.experts.1.down_proj.weight");
    ck_assert_ptr_nonnull(t);
    ck_assert_uint_eq(t->st->shape[0], 2048);
    ck_assert_uint_eq(t->st->shape[1], 768);
    ck_assert_ptr_nonnull(wl_checkpoint_find(&c, "model.layers.0.self_attn.k_norm.weight"));
    check_contents(&c, "model.layers.0.mlp.experts.1.down_proj.weight", 0, 1 << 22);
    wl_checkpoint_close(&c);
    free(dir);
}
END_TEST

START_TEST(test_write_mixtral_sparse)
{
    char *dir = wd_test_path("mixtral");
    wl_ckpt_options o = {0};
    wl_ckpt_result res;
    wl_checkpoint c;
    const wl_tensor *t;

    /* 1 layer of 2 experts at full vocab: 0.86 GB, as holes. */
    o.preset = wl_preset_find("mixtral-8x7b");
    o.out_dir = dir;
    o.layers = 1;
    o.experts = 2;
    o.sparse = true;
    o.shard_size = 500000000;
    write_ok(&o, &res);
    open_ok(dir, &c);
    ck_assert_uint_eq(c.n_tensors, 16);
    ck_assert_uint_eq(c.total_bytes, res.total_bytes);
    ck_assert_uint_eq(c.n_shards, res.n_shards);
    t = wl_checkpoint_find(&c, "model.layers.0.block_sparse_moe.experts.1.w2.weight");
    ck_assert_ptr_nonnull(t);
    ck_assert_uint_eq(t->st->shape[0], 4096);
    ck_assert_uint_eq(t->st->shape[1], 14336);
    ck_assert_uint_eq(wl_checkpoint_find(&c, "lm_head.weight")->st->shape[0], 32000);
    wl_checkpoint_close(&c);
    free(dir);
}
END_TEST

Suite *mkckpt_suite(void)
{
    Suite *s = suite_create("mkckpt");
    TCase *tc;

    tc = tcase_create("plan");
    tcase_add_test(tc, test_presets);
    tcase_add_test(tc, test_plan_names_and_shapes);
    tcase_add_test(tc, test_plan_sharding);
    tcase_add_test(tc, test_plan_errors);
    tcase_add_test(tc, test_fill);
    suite_add_tcase(s, tc);

    tc = tcase_create("write");
    tcase_set_timeout(tc, 120);
    tcase_add_checked_fixture(tc, wd_test_tmp_setup, wd_test_tmp_teardown);
    tcase_add_test(tc, test_write_tiny);
    tcase_add_test(tc, test_write_one_shard_has_index);
    tcase_add_test(tc, test_write_reproducible);
    tcase_add_test(tc, test_write_refuses_existing);
    tcase_add_test(tc, test_write_failure_leaves_nothing);
    tcase_add_test(tc, test_write_errors);
    tcase_add_test(tc, test_write_gpt_oss);
    tcase_add_test(tc, test_write_qwen3);
    tcase_add_test(tc, test_write_mixtral_sparse);
    suite_add_tcase(s, tc);
    return s;
}
