/* checkpoint.c: discovery of a file, a directory and an index, and each
 * error discovery can meet. */
#include "tests/unit/suites.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loader/checkpoint.h"


static void put_file(const char *name, const void *data, size_t n)
{
    char *p = wd_test_path(name);
    int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0644);

    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, data, n), (ssize_t)n);
    close(fd);
    free(p);
}

/* A shard holding U8 tensors of the given names, sizes 1, 2, 3... */
static void put_shard(const char *file, ...)
{
    st_tensor_spec specs[16];
    uint64_t shapes[16];
    size_t n = 0, len;
    uint64_t data_len;
    char *hdr, *img, err[256];
    const char *name;
    va_list ap;

    va_start(ap, file);
    while ((name = va_arg(ap, const char *)) != NULL) {
        shapes[n] = n + 1;
        specs[n] = (st_tensor_spec){name, ST_U8, 1, &shapes[n]};
        n++;
    }
    va_end(ap);
    ck_assert_int_eq(st_build_header(specs, n, NULL, 0, &hdr, &len, &data_len, err, sizeof err),
                     0);
    img = calloc(1, len + data_len);
    memcpy(img, hdr, len);
    put_file(file, img, len + data_len);
    free(img);
    free(hdr);
}

static void put_text(const char *file, const char *text)
{
    put_file(file, text, strlen(text));
}

static int open_at(const char *name, wl_checkpoint *c, wd_error *e)
{
    char *p = name ? wd_test_path(name) : strdup(wd_test_tmp);
    int rc;

    memset(e, 0, sizeof *e);
    rc = wl_checkpoint_open(p, c, e);
    free(p);
    return rc;
}

#define OPEN_FAILS(name, want, frag)                                                    \
    do {                                                                                \
        wl_checkpoint c_;                                                               \
        wd_error e_;                                                                    \
        int rc_ = open_at(name, &c_, &e_);                                              \
        ck_assert_msg(rc_ == (want), "rc %d (want %d): %s", rc_, (want), e_.msg);       \
        ck_assert_int_eq(e_.code, (want));                                              \
        ck_assert_msg(strstr(e_.msg, frag) != NULL, "message \"%s\" lacks \"%s\"", e_.msg,  \
                      frag);                                                            \
        ck_assert_ptr_null(c_.shards);                                                  \
        ck_assert_ptr_null(c_.path);                                                    \
    } while (0)

#define OPEN_OK(name, c)                                                                \
    do {                                                                                \
        wd_error e_;                                                                    \
        int rc_ = open_at(name, c, &e_);                                                \
        ck_assert_msg(rc_ == 0, "rc %d: %s", rc_, e_.msg);                              \
    } while (0)

static const char *shard_name(const wl_checkpoint *c, const wl_tensor *t)
{
    const char *p = c->shards[t->shard].path;
    return strrchr(p, '/') + 1;
}

START_TEST(test_single_file)
{
    wl_checkpoint c;
    const wl_tensor *t;

    put_shard("one.safetensors", "b", "a", "c", NULL);
    OPEN_OK("one.safetensors", &c);
    ck_assert_ptr_null(c.index_path);
    ck_assert_uint_eq(c.n_shards, 1);
    ck_assert_uint_eq(c.n_tensors, 3);
    ck_assert_uint_eq(c.total_bytes, 6);
    ck_assert_str_eq(c.tensors[0].st->name, "b");   /* data order */
    ck_assert_str_eq(c.tensors[2].st->name, "c");
    ck_assert_uint_eq(c.shards[0].file_size, c.shards[0].st.data_offset + 6);
    t = wl_checkpoint_find(&c, "c");
    ck_assert_ptr_nonnull(t);
    ck_assert_uint_eq(st_tensor_nbytes(t->st), 3);
    ck_assert_ptr_null(wl_checkpoint_find(&c, "d"));
    ck_assert_str_eq(strrchr(c.path, '/'), "/one.safetensors");
    wl_checkpoint_close(&c);
    wl_checkpoint_close(&c);
}
END_TEST

START_TEST(test_dir_without_index)
{
    wl_checkpoint c;

    /* Written out of order: shards come in name order, dot files and
     * other files are ignored. */
    put_shard("b.safetensors", "b1", "b0", NULL);
    put_shard("a.safetensors", "a0", NULL);
    put_shard("c.safetensors", "c0", "c1", "c2", NULL);
    put_text(".partial.safetensors", "junk");
    put_text("config.json", "{}");
    OPEN_OK(NULL, &c);
    ck_assert_ptr_null(c.index_path);
    ck_assert_uint_eq(c.n_shards, 3);
    ck_assert_ptr_nonnull(strstr(c.shards[0].path, "/a.safetensors"));
    ck_assert_ptr_nonnull(strstr(c.shards[2].path, "/c.safetensors"));
    ck_assert_uint_eq(c.n_tensors, 6);
    ck_assert_str_eq(c.tensors[0].st->name, "a0");
    ck_assert_str_eq(c.tensors[1].st->name, "b1");
    ck_assert_str_eq(c.tensors[2].st->name, "b0");
    ck_assert_str_eq(c.tensors[5].st->name, "c2");
    ck_assert_uint_eq(c.tensors[5].shard, 2);
    ck_assert_uint_eq(c.total_bytes, 1 + 3 + 6);
    ck_assert_uint_eq(wl_checkpoint_find(&c, "b0")->shard, 1);
    wl_checkpoint_close(&c);
}
END_TEST

static const char *good_index =
    "{\n  \"metadata\": {\"total_size\": 6},\n  \"weight_map\": {\n"
    "    \"x\": \"model-00002-of-00002.safetensors\",\n"
    "    \"y\": \"model-00001-of-00002.safetensors\",\n"
    "    \"z\": \"model-00002-of-00002.safetensors\"\n  }\n}\n";

static void put_indexed(const char *index_name)
{
    put_shard("model-00001-of-00002.safetensors", "y", NULL);
    put_shard("model-00002-of-00002.safetensors", "z", "x", NULL);
    put_text(index_name, good_index);
}

START_TEST(test_dir_with_index)
{
    wl_checkpoint c;

    put_indexed("model.safetensors.index.json");
    /* A stray shard next to the index is not part of the checkpoint. */
    put_shard("stray.safetensors", "s", NULL);
    OPEN_OK(NULL, &c);
    ck_assert_ptr_nonnull(c.index_path);
    ck_assert_ptr_nonnull(strstr(c.index_path, "/model.safetensors.index.json"));
    ck_assert_uint_eq(c.n_shards, 2);
    ck_assert_uint_eq(c.n_tensors, 3);
    ck_assert_str_eq(c.tensors[0].st->name, "y");
    ck_assert_str_eq(c.tensors[1].st->name, "z");
    ck_assert_str_eq(c.tensors[2].st->name, "x");
    ck_assert_str_eq(shard_name(&c, wl_checkpoint_find(&c, "x")),
                     "model-00002-of-00002.safetensors");
    ck_assert_ptr_null(wl_checkpoint_find(&c, "s"));
    ck_assert_uint_eq(c.total_bytes, 1 + 1 + 2);
    wl_checkpoint_close(&c);
}
END_TEST

START_TEST(test_dir_with_other_index)
{
    wl_checkpoint c;

    put_indexed("pytorch_model.safetensors.index.json");
    OPEN_OK(NULL, &c);
    ck_assert_ptr_nonnull(strstr(c.index_path, "/pytorch_model.safetensors.index.json"));
    wl_checkpoint_close(&c);
    /* With the default one present as well, the default wins. */
    put_text("model.safetensors.index.json", good_index);
    put_text("pytorch_model.safetensors.index.json", "not json");
    OPEN_OK(NULL, &c);
    ck_assert_ptr_nonnull(strstr(c.index_path, "/model.safetensors.index.json"));
    wl_checkpoint_close(&c);
}
END_TEST

START_TEST(test_dir_two_indexes)
{
    put_indexed("a.safetensors.index.json");
    put_text("b.safetensors.index.json", good_index);
    OPEN_FAILS(NULL, -EBADMSG, "a.safetensors.index.json, b.safetensors.index.json");
}
END_TEST

START_TEST(test_index_path)
{
    wl_checkpoint c;

    put_indexed("custom.safetensors.index.json");
    OPEN_OK("custom.safetensors.index.json", &c);
    ck_assert_uint_eq(c.n_shards, 2);
    ck_assert_uint_eq(c.n_tensors, 3);
    ck_assert_ptr_nonnull(strstr(c.index_path, "custom.safetensors.index.json"));
    wl_checkpoint_close(&c);
}
END_TEST

START_TEST(test_empty_dir_and_missing)
{
    OPEN_FAILS(NULL, -ENOENT, "no *.safetensors files");
    OPEN_FAILS("nothing.safetensors", -ENOENT, "nothing.safetensors");
    put_text(".hidden.safetensors", "x");
    OPEN_FAILS(NULL, -ENOENT, "no *.safetensors files");
}
END_TEST

START_TEST(test_missing_shard)
{
    put_shard("model-00001-of-00002.safetensors", "y", NULL);
    put_text("model.safetensors.index.json", good_index);
    OPEN_FAILS(NULL, -ENOENT, "model-00002-of-00002.safetensors (of tensor \"x\") is missing");
}
END_TEST

START_TEST(test_index_tensor_absent)
{
    put_shard("model-00001-of-00002.safetensors", "y", NULL);
    put_shard("model-00002-of-00002.safetensors", "z", NULL);
    put_text("model.safetensors.index.json", good_index);
    OPEN_FAILS(NULL, -EBADMSG, "tensor \"x\" is absent from its shard");
}
END_TEST

START_TEST(test_shard_tensor_not_in_index)
{
    put_shard("model-00001-of-00002.safetensors", "y", "extra", NULL);
    put_shard("model-00002-of-00002.safetensors", "z", "x", NULL);
    put_text("model.safetensors.index.json", good_index);
    OPEN_FAILS(NULL, -EBADMSG, "tensor \"extra\" is in shard");
    OPEN_FAILS(NULL, -EBADMSG, "but not in the index");
}
END_TEST

START_TEST(test_index_wrong_shard)
{
    /* x lives in shard 1 but the index says shard 2, which lacks it. */
    put_shard("model-00001-of-00002.safetensors", "y", "x", NULL);
    put_shard("model-00002-of-00002.safetensors", "z", NULL);
    put_text("model.safetensors.index.json", good_index);
    OPEN_FAILS(NULL, -EBADMSG, "tensor \"x\" is mapped to");
}
END_TEST

START_TEST(test_tensor_in_two_shards)
{
    put_shard("a.safetensors", "w", "dup", NULL);
    put_shard("b.safetensors", "dup", NULL);
    OPEN_FAILS(NULL, -EBADMSG, "tensor \"dup\" is in two shards");
    /* With an index too. */
    put_shard("model-00001-of-00002.safetensors", "y", "x", NULL);
    put_shard("model-00002-of-00002.safetensors", "z", "x", NULL);
    put_text("model.safetensors.index.json", good_index);
    OPEN_FAILS(NULL, -EBADMSG, "tensor \"x\" is in two shards");
}
END_TEST

START_TEST(test_bad_index)
{
    put_shard("model-00001-of-00002.safetensors", "y", NULL);
    put_text("i.json", "{\"weight_map\": {\"y\": ");
    OPEN_FAILS("i.json", -EBADMSG, "index ");
    put_text("i.json", "{\"weight_map\": {\"y\": 1,}}");
    OPEN_FAILS("i.json", -EBADMSG, "not valid JSON");
    put_text("i.json", "[]");
    OPEN_FAILS("i.json", -EBADMSG, "not a JSON object");
    put_text("i.json", "{} x");
    OPEN_FAILS("i.json", -EBADMSG, "after the JSON object");
    put_file("i.json", "{}\0\0", 4); /* a NUL is not whitespace */
    OPEN_FAILS("i.json", -EBADMSG, "data after the JSON object at byte 2");
    put_text("i.json", "{\"metadata\": {}}");
    OPEN_FAILS("i.json", -EBADMSG, "no \"weight_map\"");
    put_text("i.json", "{\"weight_map\": []}");
    OPEN_FAILS("i.json", -EBADMSG, "\"weight_map\" is not an object");
    put_text("i.json", "{\"weight_map\": {}, \"weight_map\": {}}");
    OPEN_FAILS("i.json", -EBADMSG, "\"weight_map\" appears twice");
    put_text("i.json", "{\"weight_map\": {}}");
    OPEN_FAILS("i.json", -EBADMSG, "\"weight_map\" is empty");
    put_text("i.json", "{\"weight_map\": {\"y\": 5}}");
    OPEN_FAILS("i.json", -EBADMSG, "tensor \"y\" maps to a non-string");
    put_text("i.json", "{\"weight_map\": {\"y\": \"../model-00001-of-00002.safetensors\"}}");
    OPEN_FAILS("i.json", -EBADMSG, "not a file name in the index's folder");
    put_text("i.json", "{\"weight_map\": {\"y\": \"..\"}}");
    OPEN_FAILS("i.json", -EBADMSG, "not a file name");
    put_text("i.json", "{\"weight_map\": {\"y\": \"\"}}");
    OPEN_FAILS("i.json", -EBADMSG, "not a file name");
    put_text("i.json", "{\"metadata\": 5, \"weight_map\": {\"y\": "
                       "\"model-00001-of-00002.safetensors\"}}");
    OPEN_FAILS("i.json", -EBADMSG, "\"metadata\" is not an object");
    put_text("i.json", "{\"weight_map\": {\"y\": \"model-00001-of-00002.safetensors\", "
                       "\"y\": \"model-00001-of-00002.safetensors\"}}");
    OPEN_FAILS("i.json", -EBADMSG, "tensor \"y\" appears twice");
    put_text("i.json", "{\"weight_map\": {\"y\\u0000z\": \"model-00001-of-00002.safetensors\"}}");
    OPEN_FAILS("i.json", -EBADMSG, "NUL");
    put_text("i.json", "\xff{}");
    OPEN_FAILS("i.json", -EBADMSG, "UTF-8");
    /* Other keys are allowed; a trailing newline too. */
    {
        wl_checkpoint c;
        put_text("i.json", "{\"other\": [1.5], \"weight_map\": {\"y\": "
                           "\"model-00001-of-00002.safetensors\"}}\n\n");
        OPEN_OK("i.json", &c);
        ck_assert_uint_eq(c.n_tensors, 1);
        wl_checkpoint_close(&c);
    }
}
END_TEST

START_TEST(test_bad_shard)
{
    char *p;

    put_shard("a.safetensors", "a", NULL);
    put_file("b.safetensors", "\x02\0\0\0\0\0\0\0[]", 10);
    p = wd_test_path("b.safetensors");
    OPEN_FAILS(NULL, -EBADMSG, p);
    OPEN_FAILS(NULL, -EBADMSG, "b.safetensors: header does not start with '{'");
    OPEN_FAILS("b.safetensors", -EBADMSG, "does not start");
    free(p);
}
END_TEST

START_TEST(test_index_too_big)
{
    char *p = wd_test_path("big.safetensors.index.json");
    int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0644);

    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(ftruncate(fd, (off_t)WL_INDEX_MAX_LEN + 1), 0);
    close(fd);
    free(p);
    OPEN_FAILS("big.safetensors.index.json", -EFBIG, "over the limit");
}
END_TEST

START_TEST(test_close_zeroed)
{
    wl_checkpoint c;
    wd_error e;

    memset(&c, 0, sizeof c);
    wl_checkpoint_close(&c);
    wl_checkpoint_close(NULL);
    ck_assert_ptr_null(wl_checkpoint_find(&c, "x"));
    ck_assert_int_eq(wl_checkpoint_open(NULL, &c, &e), -EINVAL);
}
END_TEST

Suite *checkpoint_suite(void)
{
    Suite *s = suite_create("checkpoint");
    TCase *tc;

    tc = tcase_create("discovery");
    tcase_add_checked_fixture(tc, wd_test_tmp_setup, wd_test_tmp_teardown);
    tcase_add_test(tc, test_single_file);
    tcase_add_test(tc, test_dir_without_index);
    tcase_add_test(tc, test_dir_with_index);
    tcase_add_test(tc, test_dir_with_other_index);
    tcase_add_test(tc, test_index_path);
    tcase_add_test(tc, test_close_zeroed);
    suite_add_tcase(s, tc);

    tc = tcase_create("errors");
    tcase_add_checked_fixture(tc, wd_test_tmp_setup, wd_test_tmp_teardown);
    tcase_add_test(tc, test_dir_two_indexes);
    tcase_add_test(tc, test_empty_dir_and_missing);
    tcase_add_test(tc, test_missing_shard);
    tcase_add_test(tc, test_index_tensor_absent);
    tcase_add_test(tc, test_shard_tensor_not_in_index);
    tcase_add_test(tc, test_index_wrong_shard);
    tcase_add_test(tc, test_tensor_in_two_shards);
    tcase_add_test(tc, test_bad_index);
    tcase_add_test(tc, test_bad_shard);
    tcase_add_test(tc, test_index_too_big);
    suite_add_tcase(s, tc);
    return s;
}
