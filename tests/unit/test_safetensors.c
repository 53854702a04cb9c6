/* safetensors.h: every validation rule, every dtype, the edge cases the
 * format allows, the writer, and file reading. JSON in these tests is
 * written with ' for " (see q()) to stay readable. */
#include "tests/unit/suites.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loader/safetensors.h"

/* The text with every ' turned into ", in a heap buffer of exactly its
 * length (no terminator), so that AddressSanitizer catches any read past
 * the length the parser was given. */
static char *q(const char *text, size_t *len)
{
    size_t n = strlen(text);
    char *p = malloc(n ? n : 1);

    ck_assert_ptr_nonnull(p);
    for (size_t i = 0; i < n; i++)
        p[i] = text[i] == '\'' ? '"' : text[i];
    *len = n;
    return p;
}

static int parse(const char *text, uint64_t data_len, st_file *f, char *err, size_t errlen)
{
    size_t n;
    char *json = q(text, &n);
    int rc = st_parse_header(json, n, data_len, f, err, errlen);
    free(json);
    return rc;
}

/* Raw bytes, no quote translation. */
static int parse_raw(const char *bytes, size_t n, uint64_t data_len, st_file *f, char *err,
                     size_t errlen)
{
    char *json = malloc(n ? n : 1);
    int rc;

    ck_assert_ptr_nonnull(json);
    memcpy(json, bytes, n);
    rc = st_parse_header(json, n, data_len, f, err, errlen);
    free(json);
    return rc;
}

static void check_bad_rc(int rc, const st_file *f, const char *err, const char *frag)
{
    ck_assert_int_eq(rc, -EBADMSG);
    ck_assert_msg(strstr(err, frag) != NULL, "message \"%s\" lacks \"%s\"", err, frag);
    ck_assert_msg(strchr(err, '\n') == NULL, "message \"%s\" is not one line", err);
    ck_assert_ptr_null(f->tensors);
    ck_assert_uint_eq(f->n_tensors, 0);
}

#define BAD(text, data_len, frag)                                          \
    do {                                                                   \
        st_file f_;                                                        \
        char e_[1024] = "";                                                \
        int rc_ = parse(text, data_len, &f_, e_, sizeof e_);               \
        check_bad_rc(rc_, &f_, e_, frag);                                  \
    } while (0)

#define BAD_RAW(bytes, n, data_len, frag)                                  \
    do {                                                                   \
        st_file f_;                                                        \
        char e_[1024] = "";                                                \
        int rc_ = parse_raw(bytes, n, data_len, &f_, e_, sizeof e_);       \
        check_bad_rc(rc_, &f_, e_, frag);                                  \
    } while (0)

#define GOOD(text, data_len, f)                                            \
    do {                                                                   \
        char e_[1024] = "";                                                \
        int rc_ = parse(text, data_len, f, e_, sizeof e_);                 \
        ck_assert_msg(rc_ == 0, "rc %d: %s", rc_, e_);                     \
    } while (0)

#define U ST_DATA_LEN_UNKNOWN

/* --- dtypes -------------------------------------------------------------- */

static const struct {
    st_dtype d;
    const char *name;
    unsigned bits;
} dtypes[] = {
    {ST_BOOL, "BOOL", 8},       {ST_F4, "F4", 4},
    {ST_F6_E2M3, "F6_E2M3", 6}, {ST_F6_E3M2, "F6_E3M2", 6},
    {ST_U8, "U8", 8},           {ST_I8, "I8", 8},
    {ST_F8_E5M2, "F8_E5M2", 8}, {ST_F8_E4M3, "F8_E4M3", 8},
    {ST_F8_E8M0, "F8_E8M0", 8}, {ST_F8_E4M3FNUZ, "F8_E4M3FNUZ", 8},
    {ST_F8_E5M2FNUZ, "F8_E5M2FNUZ", 8},
    {ST_I16, "I16", 16},        {ST_U16, "U16", 16},
    {ST_F16, "F16", 16},        {ST_BF16, "BF16", 16},
    {ST_I32, "I32", 32},        {ST_U32, "U32", 32},
    {ST_F32, "F32", 32},        {ST_C64, "C64", 64},
    {ST_F64, "F64", 64},        {ST_I64, "I64", 64},
    {ST_U64, "U64", 64},
};

START_TEST(test_dtype_table)
{
    ck_assert_uint_eq(sizeof dtypes / sizeof dtypes[0], ST_DTYPE_COUNT);
    for (size_t i = 0; i < ST_DTYPE_COUNT; i++) {
        st_dtype d = ST_DTYPE_COUNT;
        ck_assert_str_eq(st_dtype_name(dtypes[i].d), dtypes[i].name);
        ck_assert_uint_eq(st_dtype_bits(dtypes[i].d), dtypes[i].bits);
        ck_assert_int_eq(st_dtype_parse(dtypes[i].name, &d), 0);
        ck_assert_int_eq(d, dtypes[i].d);
    }
    ck_assert_ptr_null(st_dtype_name(ST_DTYPE_COUNT));
    ck_assert_uint_eq(st_dtype_bits(ST_DTYPE_COUNT), 0);
    ck_assert_int_eq(st_dtype_parse("bf16", NULL), -EINVAL);
    ck_assert_int_eq(st_dtype_parse("BF16 ", NULL), -EINVAL);
    ck_assert_int_eq(st_dtype_parse("", NULL), -EINVAL);
    ck_assert_int_eq(st_dtype_parse(NULL, NULL), -EINVAL);
}
END_TEST

/* Every dtype's size as the parser computes it: 8 elements take bits bytes. */
START_TEST(test_dtype_sizes_in_header)
{
    for (size_t i = 0; i < ST_DTYPE_COUNT; i++) {
        char json[256], err[512] = "";
        st_file f;
        int n = snprintf(json, sizeof json,
                         "{\"t\":{\"dtype\":\"%s\",\"shape\":[2,4],\"data_offsets\":[0,%u]}}",
                         dtypes[i].name, dtypes[i].bits);
        int rc = parse_raw(json, (size_t)n, dtypes[i].bits, &f, err, sizeof err);
        ck_assert_msg(rc == 0, "%s: %s", dtypes[i].name, err);
        ck_assert_int_eq(f.tensors[0].dtype, dtypes[i].d);
        ck_assert_uint_eq(st_tensor_nbytes(&f.tensors[0]), dtypes[i].bits);
        ck_assert_uint_eq(st_tensor_numel(&f.tensors[0]), 8);
        st_free(&f);
        /* One byte short is wrong for each of them. */
        n = snprintf(json, sizeof json,
                     "{\"t\":{\"dtype\":\"%s\",\"shape\":[2,4],\"data_offsets\":[0,%u]}}",
                     dtypes[i].name, dtypes[i].bits - 1);
        rc = parse_raw(json, (size_t)n, U, &f, err, sizeof err);
        check_bad_rc(rc, &f, err, "needs");
    }
}
END_TEST

START_TEST(test_sub_byte_dtypes)
{
    st_file f;

    /* 3 x F6 = 18 bits; 4 x F6 = 3 bytes; 2 x F4 = 1 byte. */
    BAD("{'t':{'dtype':'F6_E2M3','shape':[3],'data_offsets':[0,2]}}", U,
        "18 bits, not a whole number of bytes");
    BAD("{'t':{'dtype':'F4','shape':[3],'data_offsets':[0,2]}}", U, "not a whole number of bytes");
    GOOD("{'t':{'dtype':'F6_E3M2','shape':[4],'data_offsets':[0,3]}}", 3, &f);
    st_free(&f);
    GOOD("{'t':{'dtype':'F4','shape':[2,1],'data_offsets':[0,1]}}", 1, &f);
    ck_assert_uint_eq(st_tensor_nbytes(&f.tensors[0]), 1);
    st_free(&f);
}
END_TEST

/* --- valid files ------------------------------------------------------------ */

START_TEST(test_basic)
{
    st_file f;
    const st_tensor *t;

    GOOD("{'b':{'dtype':'BF16','shape':[2,3],'data_offsets':[8,20]},"
         " 'a':{'dtype':'F32','shape':[2],'data_offsets':[0,8]}}     ", 20, &f);
    ck_assert_uint_eq(f.n_tensors, 2);
    ck_assert_uint_eq(f.header_len, strlen("{'b':{'dtype':'BF16','shape':[2,3],'data_offsets':"
                                           "[8,20]}, 'a':{'dtype':'F32','shape':[2],"
                                           "'data_offsets':[0,8]}}     "));
    ck_assert_uint_eq(f.data_offset, 8 + f.header_len);
    ck_assert_uint_eq(f.data_len, 20);
    /* Sorted by offset, not by document order. */
    ck_assert_str_eq(f.tensors[0].name, "a");
    ck_assert_str_eq(f.tensors[1].name, "b");
    t = st_find(&f, "b");
    ck_assert_ptr_eq(t, &f.tensors[1]);
    ck_assert_int_eq(t->dtype, ST_BF16);
    ck_assert_uint_eq(t->ndim, 2);
    ck_assert_uint_eq(t->shape[0], 2);
    ck_assert_uint_eq(t->shape[1], 3);
    ck_assert_uint_eq(t->begin, 8);
    ck_assert_uint_eq(t->end, 20);
    ck_assert_uint_eq(st_tensor_numel(t), 6);
    ck_assert_uint_eq(st_tensor_nbytes(t), 12);
    ck_assert_ptr_null(st_find(&f, "c"));
    ck_assert_ptr_null(st_find(&f, ""));
    ck_assert_ptr_null(st_find(&f, NULL));
    ck_assert_uint_eq(f.n_meta, 0);
    st_free(&f);
}
END_TEST

START_TEST(test_empty_and_scalar)
{
    st_file f;

    /* An empty tensor shares its offset with the next one; a 0-dim one
     * holds one element. */
    GOOD("{'z':{'dtype':'F32','shape':[0,4],'data_offsets':[4,4]},"
         "'s':{'dtype':'F32','shape':[],'data_offsets':[0,4]},"
         "'e':{'dtype':'U8','shape':[0],'data_offsets':[4,4]},"
         "'w':{'dtype':'U8','shape':[2],'data_offsets':[4,6]}}", 6, &f);
    ck_assert_uint_eq(f.n_tensors, 4);
    ck_assert_str_eq(f.tensors[0].name, "s");
    ck_assert_uint_eq(f.tensors[0].ndim, 0);
    ck_assert_ptr_null(f.tensors[0].shape);
    ck_assert_uint_eq(st_tensor_numel(&f.tensors[0]), 1);
    /* Ties at offset 4: empty ones first, by name. */
    ck_assert_str_eq(f.tensors[1].name, "e");
    ck_assert_str_eq(f.tensors[2].name, "z");
    ck_assert_str_eq(f.tensors[3].name, "w");
    ck_assert_uint_eq(st_tensor_numel(&f.tensors[2]), 0);
    ck_assert_uint_eq(st_tensor_nbytes(&f.tensors[2]), 0);
    st_free(&f);

    /* A shape with a 0 may hold huge other dimensions. */
    GOOD("{'z':{'dtype':'F64','shape':[0,18446744073709551615],'data_offsets':[0,0]}}", 0, &f);
    st_free(&f);
}
END_TEST

START_TEST(test_no_tensors_and_metadata)
{
    st_file f;

    GOOD("{}", 0, &f);
    ck_assert_uint_eq(f.n_tensors, 0);
    ck_assert_ptr_null(f.tensors);
    ck_assert_ptr_null(st_find(&f, "a"));
    st_free(&f);

    GOOD("{'__metadata__':{'format':'pt','note':'caf\\u00e9 \\\"q\\\"'}}        ", 0, &f);
    ck_assert_uint_eq(f.n_tensors, 0);
    ck_assert_uint_eq(f.n_meta, 2);
    ck_assert_str_eq(f.meta[0].key, "format");
    ck_assert_str_eq(f.meta[0].value, "pt");
    ck_assert_str_eq(f.meta[1].key, "note");
    ck_assert_str_eq(f.meta[1].value, "caf\xc3\xa9 \"q\"");
    st_free(&f);

    GOOD("{'__metadata__':{}}", 0, &f);
    ck_assert_uint_eq(f.n_meta, 0);
    st_free(&f);

    BAD("{}", 5, "lists no tensors");
}
END_TEST

START_TEST(test_unicode_names)
{
    st_file f;

    /* Raw UTF-8, escapes, and a surrogate pair (U+1F600). */
    GOOD("{'caf\xc3\xa9':{'dtype':'U8','shape':[1],'data_offsets':[0,1]},"
         "'\\ud83d\\ude00\\n':{'dtype':'U8','shape':[1],'data_offsets':[1,2]},"
         "'':{'dtype':'U8','shape':[1],'data_offsets':[2,3]}}", 3, &f);
    ck_assert_ptr_nonnull(st_find(&f, "caf\xc3\xa9"));
    ck_assert_ptr_nonnull(st_find(&f, "\xf0\x9f\x98\x80\n"));
    ck_assert_ptr_nonnull(st_find(&f, ""));
    st_free(&f);
}
END_TEST

START_TEST(test_unknown_data_len)
{
    st_file f;

    /* Without the file size only the tiling from 0 is checked... */
    GOOD("{'a':{'dtype':'U8','shape':[4],'data_offsets':[0,4]}}", U, &f);
    ck_assert_uint_eq(f.data_len, U);
    st_free(&f);
    /* ...and integers past 2^53 are read exactly, not through a double. */
    GOOD("{'a':{'dtype':'U8','shape':[9007199254740993],'data_offsets':[0,9007199254740993]}}",
         U, &f);
    ck_assert_uint_eq(f.tensors[0].shape[0], 9007199254740993ULL);
    ck_assert_uint_eq(f.tensors[0].end, 9007199254740993ULL);
    st_free(&f);
    BAD("{'a':{'dtype':'U8','shape':[4],'data_offsets':[1,5]}}", U, "at the start");
}
END_TEST

START_TEST(test_many_dims_and_tensors)
{
    /* A 100000-dimension shape of ones, and 20000 tensors: valid, and
     * st_find still finds each one. */
    size_t cap = 64 << 20, o = 0;
    char *s = malloc(cap), err[512] = "";
    st_file f;
    int rc;

    ck_assert_ptr_nonnull(s);
    o += (size_t)snprintf(s + o, cap - o, "{\"big\":{\"dtype\":\"U8\",\"shape\":[");
    for (int i = 0; i < 100000; i++)
        o += (size_t)snprintf(s + o, cap - o, "%s1", i ? "," : "");
    o += (size_t)snprintf(s + o, cap - o, "],\"data_offsets\":[0,1]}");
    for (int i = 0; i < 20000; i++)
        o += (size_t)snprintf(s + o, cap - o,
                              ",\"t%05d\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[%d,%d]}",
                              19999 - i, 1 + i, 2 + i);
    o += (size_t)snprintf(s + o, cap - o, "}");
    rc = parse_raw(s, o, 20001, &f, err, sizeof err);
    ck_assert_msg(rc == 0, "%s", err);
    ck_assert_uint_eq(f.n_tensors, 20001);
    ck_assert_uint_eq(f.tensors[0].ndim, 100000);
    for (int i = 0; i < 20000; i++) {
        char name[16];
        const st_tensor *t;
        snprintf(name, sizeof name, "t%05d", i);
        t = st_find(&f, name);
        ck_assert_ptr_nonnull(t);
        ck_assert_uint_eq(t->begin, (uint64_t)(20000 - i));
    }
    st_free(&f);
    free(s);
}
END_TEST

/* --- the header as a whole ------------------------------------------------- */

START_TEST(test_bad_utf8)
{
    BAD_RAW("{\"\xff\":1}", 6, U, "UTF-8");
    BAD_RAW("{\"\xc0\x80\":1}", 7, U, "UTF-8");           /* overlong NUL */
    BAD_RAW("{\"\xed\xa0\x80\":1}", 8, U, "UTF-8");       /* surrogate */
    BAD_RAW("{\"\xf4\x90\x80\x80\":1}", 9, U, "UTF-8");   /* past U+10FFFF */
    BAD_RAW("{\"a\":\"\xe2\x82", 8, U, "UTF-8");          /* cut at the end */
    ck_assert_int_eq(st_utf8_check("\xe2\x82\xac", 3, NULL), 0);
    ck_assert_int_eq(st_utf8_check("\xe2\x82", 2, NULL), -EBADMSG);
}
END_TEST

START_TEST(test_not_json)
{
    BAD("{'a': }", U, "not valid JSON");
    BAD("{'a':{'dtype':'U8',}}", U, "not valid JSON");
    BAD("{'a' 1}", U, "not valid JSON");
    BAD("{", U, "not closed");
    BAD("{'a", U, "unterminated string");
    BAD("{'a':tru}", U, "bad literal");
    BAD("{'a':[01]}", U, "malformed number");      /* cJSON alone reads 1 */
    BAD("{'a':[+1]}", U, "unexpected byte");
    BAD("{'a':[1.]}", U, "malformed number");
    BAD("{'a':'\\x'}", U, "unknown escape");
    BAD("{'a':'\\ud800'}", U, "surrogate");
    BAD("{'a':'\\udc00'}", U, "surrogate");
    BAD_RAW("{\"a\tb\":1}", 8, U, "control byte");
    BAD_RAW("{\"a\0b\":1}", 8, U, "control byte");
    BAD("", U, "empty");
}
END_TEST

START_TEST(test_not_object)
{
    BAD("[]", U, "does not start with '{'");
    BAD("'x'", U, "does not start with '{'");
    BAD(" {}", U, "does not start with '{'");
    BAD("null", U, "does not start with '{'");
}
END_TEST

START_TEST(test_trailing)
{
    st_file f;

    BAD("{}x", U, "after the JSON object");
    BAD("{} {}", U, "after the JSON object");
    BAD_RAW("{}\0\0", 4, U, "after the JSON object");
    GOOD("{}      ", 0, &f);
    st_free(&f);
    /* JSON whitespace padding, as the reference's serde_json accepts. */
    GOOD("{} \t\r\n", 0, &f);
    st_free(&f);
}
END_TEST

START_TEST(test_deep_nesting)
{
    char *s = malloc(20010);
    st_file f;
    char err[512] = "";
    int rc;

    ck_assert_ptr_nonnull(s);
    s[0] = '{';
    memcpy(s + 1, "\"a\":", 4);
    memset(s + 5, '[', 10000);
    memset(s + 10005, ']', 10000);
    s[20005] = '}';
    rc = parse_raw(s, 20006, U, &f, err, sizeof err);
    check_bad_rc(rc, &f, err, "not valid JSON");
    free(s);
}
END_TEST

START_TEST(test_nul_in_strings)
{
    BAD("{'a\\u0000b':{'dtype':'U8','shape':[1],'data_offsets':[0,1]}}", U, "NUL");
    BAD("{'a':{'dtype':'U8','shape':[1],'data_offsets':[0,1]},"
        "'a\\u0000':{'dtype':'U8','shape':[1],'data_offsets':[1,2]}}", U, "string starting \"a\"");
    BAD("{'__metadata__':{'k':'v\\u0000'}}", U, "NUL");
    /* An escaped backslash followed by u0000 is no NUL. */
    {
        st_file f;
        GOOD("{'a\\\\u0000':{'dtype':'U8','shape':[1],'data_offsets':[0,1]}}", 1, &f);
        ck_assert_str_eq(f.tensors[0].name, "a\\u0000");
        st_free(&f);
    }
}
END_TEST

/* --- entries ------------------------------------------------------------------ */

START_TEST(test_entry_fields)
{
    BAD("{'w':5}", U, "tensor \"w\": entry is a number, not an object");
    BAD("{'w':{'shape':[1],'data_offsets':[0,1]}}", U, "tensor \"w\": missing field \"dtype\"");
    BAD("{'w':{'dtype':'U8','data_offsets':[0,1]}}", U, "missing field \"shape\"");
    BAD("{'w':{'dtype':'U8','shape':[1]}}", U, "missing field \"data_offsets\"");
    BAD("{'w':{'dtype':'U8','shape':[1],'data_offsets':[0,1],'extra':1}}", U,
        "unknown field \"extra\"");
    BAD("{'w':{'dtype':'U8','dtype':'U8','shape':[1],'data_offsets':[0,1]}}", U,
        "field \"dtype\" appears twice");
    BAD("{'w':{'dtype':5,'shape':[1],'data_offsets':[0,1]}}", U, "\"dtype\" is a number");
    BAD("{'w':{'dtype':'bf16','shape':[1],'data_offsets':[0,1]}}", U, "unknown dtype \"bf16\"");
    BAD("{'w':{'dtype':'U8','shape':'1','data_offsets':[0,1]}}", U, "\"shape\" is a string");
    BAD("{'w':{'dtype':'U8','shape':{},'data_offsets':[0,1]}}", U, "\"shape\" is an object");
    BAD("{'w':{'dtype':'U8','shape':[1],'data_offsets':{}}}", U, "not an array of 2");
    BAD("{'w':{'dtype':'U8','shape':[1],'data_offsets':[1]}}", U, "has 1 elements, not 2");
    BAD("{'w':{'dtype':'U8','shape':[1],'data_offsets':[0,1,1]}}", U, "has 3 elements");
}
END_TEST

START_TEST(test_integers)
{
    BAD("{'w':{'dtype':'U8','shape':[-1],'data_offsets':[0,1]}}", U, "shape[0] is -1, not a");
    BAD("{'w':{'dtype':'U8','shape':[1,1.5],'data_offsets':[0,1]}}", U, "shape[1] is 1.5");
    BAD("{'w':{'dtype':'U8','shape':[1.0],'data_offsets':[0,1]}}", U, "shape[0] is 1.0");
    BAD("{'w':{'dtype':'U8','shape':[1e0],'data_offsets':[0,1]}}", U, "shape[0] is 1e0");
    BAD("{'w':{'dtype':'U8','shape':[-0],'data_offsets':[0,1]}}", U, "shape[0] is -0");
    BAD("{'w':{'dtype':'U8','shape':['1'],'data_offsets':[0,1]}}", U, "shape[0] is a string");
    BAD("{'w':{'dtype':'U8','shape':[null],'data_offsets':[0,1]}}", U, "shape[0] is null");
    BAD("{'w':{'dtype':'U8','shape':[true],'data_offsets':[0,1]}}", U, "is a boolean");
    BAD("{'w':{'dtype':'U8','shape':[1],'data_offsets':[0.0,1]}}", U, "data_offsets[0] is 0.0");
    BAD("{'w':{'dtype':'U8','shape':[1],'data_offsets':[0,-1]}}", U, "data_offsets[1] is -1");
    BAD("{'w':{'dtype':'U8','shape':[18446744073709551616],'data_offsets':[0,1]}}", U,
        "past 2^64-1");
    BAD("{'w':{'dtype':'U8','shape':[1],'data_offsets':[0,99999999999999999999]}}", U,
        "past 2^64-1");
    BAD("{'w':{'dtype':'U8','shape':[1],'data_offsets':"
        "[0,1000000000000000000000000000000000000000000000000000000000000000]}}", U,
        "longer than 63");
}
END_TEST

START_TEST(test_overflow)
{
    BAD("{'w':{'dtype':'U8','shape':[4294967296,4294967296,2],'data_offsets':[0,1]}}", U,
        "more than 2^64-1 elements");
    /* Overflow part-way is refused even when a later 0 makes it empty, as in
     * the reference. */
    BAD("{'w':{'dtype':'U8','shape':[4294967296,4294967296,0],'data_offsets':[0,0]}}", U,
        "more than 2^64-1 elements");
    BAD("{'w':{'dtype':'F32','shape':[4611686018427387904],'data_offsets':[0,1]}}", U,
        "more than 2^64-1 bits");
}
END_TEST

START_TEST(test_offsets)
{
    BAD("{'w':{'dtype':'U8','shape':[0],'data_offsets':[5,4]}}", U,
        "tensor \"w\": data_offsets [5, 4] end before they begin");
    BAD("{'model.layers.0.mlp.router.weight':{'dtype':'BF16','shape':[128,2880],"
        "'data_offsets':[0,10]}}", U,
        "tensor \"model.layers.0.mlp.router.weight\": data_offsets [0, 10] hold 10 bytes but "
        "shape [128, 2880] x BF16 needs 737280");
    BAD("{'a':{'dtype':'U8','shape':[4],'data_offsets':[4,8]}}", 8,
        "tensor \"a\": data_offsets [4, 8] leave a gap of 4 bytes at the start");
    BAD("{'a':{'dtype':'U8','shape':[4],'data_offsets':[0,4]},"
        "'b':{'dtype':'U8','shape':[4],'data_offsets':[6,10]}}", 10,
        "tensor \"b\": data_offsets [6, 10] leave a gap of 2 bytes after tensor \"a\"");
    BAD("{'a':{'dtype':'U8','shape':[4],'data_offsets':[0,4]},"
        "'b':{'dtype':'U8','shape':[4],'data_offsets':[2,6]}}", 6,
        "tensor \"b\": data_offsets [2, 6] overlap tensor \"a\" [0, 4]");
    /* An empty tensor inside another one overlaps it too. */
    BAD("{'a':{'dtype':'U8','shape':[4],'data_offsets':[0,4]},"
        "'e':{'dtype':'U8','shape':[0],'data_offsets':[2,2]}}", 4, "overlap");
    /* An empty tensor past the end leaves a gap. */
    BAD("{'a':{'dtype':'U8','shape':[4],'data_offsets':[0,4]},"
        "'e':{'dtype':'U8','shape':[0],'data_offsets':[9,9]}}", U, "gap of 5 bytes");
}
END_TEST

START_TEST(test_data_len)
{
    BAD("{'a':{'dtype':'U8','shape':[4],'data_offsets':[0,4]}}", 3,
        "data section is 3 bytes but the tensors need 4");
    BAD("{'a':{'dtype':'U8','shape':[4],'data_offsets':[0,4]}}", 7,
        "3 bytes follow the last tensor \"a\"");
}
END_TEST

START_TEST(test_duplicates)
{
    BAD("{'a':{'dtype':'U8','shape':[4],'data_offsets':[0,4]},"
        "'a':{'dtype':'U8','shape':[4],'data_offsets':[4,8]}}", 8,
        "tensor \"a\" appears twice");
    BAD("{'__metadata__':{},'__metadata__':{}}", 0, "\"__metadata__\" appears twice");
    BAD("{'__metadata__':{'k':'1','k':'2'}}", 0, "key \"k\" appears twice");
}
END_TEST

START_TEST(test_metadata_types)
{
    BAD("{'__metadata__':[]}", 0, "\"__metadata__\" is an array, not an object");
    BAD("{'__metadata__':null}", 0, "\"__metadata__\" is null");
    BAD("{'__metadata__':'pt'}", 0, "is a string, not an object");
    BAD("{'__metadata__':{'total':5}}", 0, "the value of \"total\" is a number, not a string");
    BAD("{'__metadata__':{'x':{'y':'z'}}}", 0, "is an object, not a string");
}
END_TEST

START_TEST(test_message_quoting)
{
    /* A long name with a newline: the message stays one line and bounded. */
    char text[4096], err[1024];
    st_file f;
    size_t o = 0;
    int rc;

    o += (size_t)snprintf(text, sizeof text, "{\"line\\nbreak");
    memset(text + o, 'x', 2000);
    o += 2000;
    o += (size_t)snprintf(text + o, sizeof text - o, "\":{\"dtype\":\"U8\",\"shape\":[1],"
                          "\"data_offsets\":[0,2]}}");
    rc = parse_raw(text, o, U, &f, err, sizeof err);
    check_bad_rc(rc, &f, err, "\"line\\x0abreakxxx");
    ck_assert_ptr_nonnull(strstr(err, "...\""));
    ck_assert_ptr_nonnull(strstr(err, "needs 1"));
    /* A NULL or tiny err buffer is fine. */
    ck_assert_int_eq(parse("[]", U, &f, NULL, 0), -EBADMSG);
    ck_assert_int_eq(parse("[]", U, &f, err, 1), -EBADMSG);
    ck_assert_str_eq(err, "");
}
END_TEST

/* --- file images and files -------------------------------------------------- */

/* prefix + header + data of data_len bytes (0x5a), in a heap buffer. */
static char *image(const char *text, uint64_t prefix_n, size_t data_len, size_t *len)
{
    size_t n;
    char *json = q(text, &n), *img = malloc(8 + n + data_len);

    ck_assert_ptr_nonnull(img);
    for (int k = 0; k < 8; k++)
        img[k] = (char)(prefix_n >> (8 * k));
    memcpy(img + 8, json, n);
    memset(img + 8 + n, 0x5a, data_len);
    free(json);
    *len = 8 + n + data_len;
    return img;
}

START_TEST(test_buffer)
{
    const char *h = "{'a':{'dtype':'U8','shape':[4],'data_offsets':[0,4]}}";
    size_t len;
    char *img, err[512];
    st_file f;

    img = image(h, strlen(h), 4, &len);
    ck_assert_int_eq(st_parse_buffer(img, len, &f, err, sizeof err), 0);
    ck_assert_uint_eq(f.header_len, strlen(h));
    ck_assert_uint_eq(f.data_offset, 8 + strlen(h));
    ck_assert_uint_eq(f.data_len, 4);
    st_free(&f);
    /* The data is checked against the header. */
    ck_assert_int_eq(st_parse_buffer(img, len - 1, &f, err, sizeof err), -EBADMSG);
    ck_assert_ptr_nonnull(strstr(err, "truncated"));
    free(img);

    img = image(h, 100000001, 0, &len);
    ck_assert_int_eq(st_parse_buffer(img, len, &f, err, sizeof err), -EBADMSG);
    ck_assert_ptr_nonnull(strstr(err, "header length 100000001 is over the limit of 100000000"));
    free(img);
    img = image(h, UINT64_MAX, 0, &len);
    ck_assert_int_eq(st_parse_buffer(img, len, &f, err, sizeof err), -EBADMSG);
    ck_assert_ptr_nonnull(strstr(err, "over the limit"));
    free(img);
    img = image(h, strlen(h) + 1, 0, &len);
    ck_assert_int_eq(st_parse_buffer(img, len, &f, err, sizeof err), -EBADMSG);
    ck_assert_ptr_nonnull(strstr(err, "runs past the end of the file"));
    free(img);
    ck_assert_int_eq(st_parse_buffer("\x02\0\0\0", 4, &f, err, sizeof err), -EBADMSG);
    ck_assert_ptr_nonnull(strstr(err, "too short"));
    /* A header over the limit by length alone, straight to st_parse_header. */
    ck_assert_int_eq(st_parse_header("{}", ST_MAX_HEADER_LEN + 1, U, &f, err, sizeof err),
                     -EBADMSG);
    ck_assert_ptr_nonnull(strstr(err, "over the limit"));
}
END_TEST

static char *write_file(const char *dir, const char *name, const void *p, size_t n)
{
    char *path;
    int fd;

    ck_assert_int_ge(asprintf(&path, "%s/%s", dir, name), 0);
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, p, n), (ssize_t)n);
    close(fd);
    return path;
}

START_TEST(test_read_file)
{
    const char *h = "{'a':{'dtype':'U8','shape':[4],'data_offsets':[0,4]}}";
    char *dir = wd_test_tmpdir(), *img, *path, *bad, err[1024];
    size_t len;
    st_file f;
    int fd;

    ck_assert_ptr_nonnull(dir);
    img = image(h, strlen(h), 4, &len);
    path = write_file(dir, "ok.safetensors", img, len);
    ck_assert_int_eq(st_read(path, &f, err, sizeof err), 0);
    ck_assert_uint_eq(f.data_len, 4);
    ck_assert_ptr_nonnull(st_find(&f, "a"));
    st_free(&f);
    st_free(&f);   /* twice is fine */

    fd = open(path, O_RDONLY);
    ck_assert_int_eq(st_read_fd(fd, "shown.safetensors", &f, err, sizeof err), 0);
    st_free(&f);
    close(fd);

    /* A truncated file: the message starts with the file. */
    bad = write_file(dir, "bad.safetensors", img, len - 1);
    ck_assert_int_eq(st_read(bad, &f, err, sizeof err), -EBADMSG);
    ck_assert_msg(strncmp(err, bad, strlen(bad)) == 0 && strstr(err, ": data section is 3 bytes"),
                  "%s", err);
    fd = open(bad, O_RDONLY);
    ck_assert_int_eq(st_read_fd(fd, "model-00001.safetensors", &f, err, sizeof err), -EBADMSG);
    ck_assert_msg(strncmp(err, "model-00001.safetensors: data section", 37) == 0, "%s", err);
    /* A small buffer keeps the start of the line. */
    ck_assert_int_eq(st_read_fd(fd, "model-00001.safetensors", &f, err, 30), -EBADMSG);
    ck_assert_str_eq(err, "model-00001.safetensors: data");
    ck_assert_int_eq(st_read_fd(fd, "model-00001.safetensors", &f, err, 10), -EBADMSG);
    ck_assert_str_eq(err, "model-000");
    close(fd);
    free(bad);

    bad = write_file(dir, "tiny.safetensors", "\x01\0", 2);
    ck_assert_int_eq(st_read(bad, &f, err, sizeof err), -EBADMSG);
    ck_assert_ptr_nonnull(strstr(err, "too short"));
    free(bad);

    ck_assert_int_eq(st_read(dir, &f, err, sizeof err), -EISDIR);
    free(img);
    free(path);
    ck_assert_int_ge(asprintf(&path, "%s/missing.safetensors", dir), 0);
    ck_assert_int_eq(st_read(path, &f, err, sizeof err), -ENOENT);
    ck_assert_ptr_nonnull(strstr(err, "missing.safetensors: cannot open"));
    free(path);
    wd_test_rmtree(dir);
    free(dir);
}
END_TEST

/* Only the header is read: a 1 TiB sparse data section costs nothing. */
START_TEST(test_read_header_only)
{
    const char *h = "{'a':{'dtype':'U8','shape':[1099511627776],'data_offsets':[0,1099511627776]}}";
    char *dir = wd_test_tmpdir(), *img, *path, err[512];
    size_t len;
    st_file f;

    img = image(h, strlen(h), 0, &len);
    path = write_file(dir, "big.safetensors", img, len);
    ck_assert_int_eq(truncate(path, (off_t)(len + 1099511627776ULL)), 0);
    ck_assert_int_eq(st_read(path, &f, err, sizeof err), 0);
    ck_assert_uint_eq(st_tensor_nbytes(&f.tensors[0]), 1099511627776ULL);
    st_free(&f);
    free(img);
    free(path);
    wd_test_rmtree(dir);
    free(dir);
}
END_TEST

/* --- writer ------------------------------------------------------------------ */

START_TEST(test_build_roundtrip)
{
    const uint64_t s1[] = {3, 5}, s2[] = {0, 7}, s3[] = {9};
    const st_tensor_spec specs[] = {
        {"z.weight", ST_BF16, 2, s1},
        {"empty", ST_F32, 2, s2},
        {"scalar", ST_F64, 0, NULL},
        {"quote\"back\\slash\nnl caf\xc3\xa9", ST_F6_E2M3, 1, (const uint64_t[]){4}},
        {"a.bias", ST_U8, 1, s3},
    };
    const st_meta meta[] = {{"format", "pt"}, {"k\"", "v\n"}};
    char *out = NULL, *img, err[512];
    size_t out_len;
    uint64_t data_len, n = 0, pos = 0;
    st_file f;

    ck_assert_int_eq(st_build_header(specs, 5, meta, 2, &out, &out_len, &data_len, err,
                                     sizeof err), 0);
    ck_assert_uint_eq(out_len % 8, 0);
    for (int k = 7; k >= 0; k--)
        n = n << 8 | (unsigned char)out[k];
    ck_assert_uint_eq(n, out_len - 8);
    ck_assert_int_eq(out[out_len - 1] == ' ' || out[out_len - 1] == '}', 1);
    ck_assert_uint_eq(data_len, 30 + 0 + 8 + 3 + 9);
    ck_assert_int_eq(memcmp(out + 8, "{\"__metadata__\":{\"format\":\"pt\"", 30), 0);

    img = malloc(out_len + data_len);
    memcpy(img, out, out_len);
    memset(img + out_len, 0, data_len);
    ck_assert_int_eq(st_parse_buffer(img, out_len + data_len, &f, err, sizeof err), 0);
    ck_assert_uint_eq(f.n_tensors, 5);
    /* Laid out contiguously in the given order. */
    for (size_t i = 0; i < 5; i++) {
        const st_tensor *t = st_find(&f, specs[i].name);
        ck_assert_ptr_nonnull(t);
        ck_assert_int_eq(t->dtype, specs[i].dtype);
        ck_assert_uint_eq(t->ndim, specs[i].ndim);
        for (size_t d = 0; d < t->ndim; d++)
            ck_assert_uint_eq(t->shape[d], specs[i].shape[d]);
        ck_assert_uint_eq(t->begin, pos);
        pos = t->end;
    }
    ck_assert_uint_eq(pos, data_len);
    ck_assert_uint_eq(f.n_meta, 2);
    ck_assert_str_eq(f.meta[1].key, "k\"");
    ck_assert_str_eq(f.meta[1].value, "v\n");
    st_free(&f);
    free(img);
    free(out);

    /* No tensors, no metadata: "{}" and padding. */
    ck_assert_int_eq(st_build_header(NULL, 0, NULL, 0, &out, &out_len, &data_len, err,
                                     sizeof err), 0);
    ck_assert_uint_eq(out_len, 16);
    ck_assert_int_eq(memcmp(out + 8, "{}      ", 8), 0);
    ck_assert_int_eq(st_parse_buffer(out, out_len, &f, err, sizeof err), 0);
    st_free(&f);
    free(out);
}
END_TEST

START_TEST(test_build_errors)
{
    const uint64_t three[] = {3}, huge[] = {UINT64_MAX, 2}, half[] = {1ULL << 62};
    char *out = (char *)1, err[512];
    size_t out_len;
    uint64_t data_len;

    {
        const st_tensor_spec s[] = {{"f4", ST_F4, 1, three}};
        ck_assert_int_eq(st_build_header(s, 1, NULL, 0, &out, &out_len, &data_len, err,
                                         sizeof err), -EINVAL);
        ck_assert_ptr_nonnull(strstr(err, "not a whole number of bytes"));
        ck_assert_ptr_null(out);
    }
    {
        const st_tensor_spec s[] = {{"a", ST_U8, 1, three}, {"b", ST_U8, 1, three},
                                    {"a", ST_U8, 1, three}};
        ck_assert_int_eq(st_build_header(s, 3, NULL, 0, &out, &out_len, &data_len, err,
                                         sizeof err), -EINVAL);
        ck_assert_ptr_nonnull(strstr(err, "\"a\" appears twice"));
    }
    {
        const st_tensor_spec s[] = {{"h", ST_U8, 2, huge}};
        ck_assert_int_eq(st_build_header(s, 1, NULL, 0, &out, &out_len, &data_len, err,
                                         sizeof err), -EOVERFLOW);
    }
    {
        const st_tensor_spec s[] = {{"b", ST_F32, 1, half}};
        ck_assert_int_eq(st_build_header(s, 1, NULL, 0, &out, &out_len, &data_len, err,
                                         sizeof err), -EOVERFLOW);
    }
    {
        /* Each fits; together they pass 2^64 bytes. */
        const uint64_t big[] = {1ULL << 63};
        const st_tensor_spec s[] = {{"x", ST_U8, 1, big}, {"y", ST_U8, 1, big}};
        ck_assert_int_eq(st_build_header(s, 2, NULL, 0, &out, &out_len, &data_len, err,
                                         sizeof err), -EOVERFLOW);
    }
    {
        const st_tensor_spec s[] = {{"__metadata__", ST_U8, 1, three}};
        ck_assert_int_eq(st_build_header(s, 1, NULL, 0, &out, &out_len, &data_len, err,
                                         sizeof err), -EINVAL);
        ck_assert_ptr_nonnull(strstr(err, "reserved"));
    }
    {
        const st_tensor_spec s[] = {{"\xff", ST_U8, 1, three}};
        ck_assert_int_eq(st_build_header(s, 1, NULL, 0, &out, &out_len, &data_len, err,
                                         sizeof err), -EINVAL);
        ck_assert_ptr_nonnull(strstr(err, "UTF-8"));
    }
    {
        const st_tensor_spec s[] = {{"x", ST_DTYPE_COUNT, 1, three}};
        ck_assert_int_eq(st_build_header(s, 1, NULL, 0, &out, &out_len, &data_len, err,
                                         sizeof err), -EINVAL);
    }
    {
        const st_meta m[] = {{"k", "1"}, {"k", "2"}};
        ck_assert_int_eq(st_build_header(NULL, 0, m, 2, &out, &out_len, &data_len, err,
                                         sizeof err), -EINVAL);
        ck_assert_ptr_nonnull(strstr(err, "\"k\" appears twice"));
    }
}
END_TEST

START_TEST(test_json_helpers)
{
    char err[256], *s;
    size_t end;

    /* Index files may start and end with blanks; the helper leaves the
     * trailing part to the caller. */
    ck_assert_int_eq(st_json_check(" \n{\"a\": [1, 2]}\n", 16, &end, err, sizeof err), 0);
    ck_assert_uint_eq(end, 15);
    ck_assert_int_eq(st_json_check("[1]", 3, &end, err, sizeof err), -EBADMSG);
    ck_assert_ptr_nonnull(strstr(err, "not a JSON object"));
    s = st_json_quote("a\"b\\c\n\x01\xc3\xa9");
    ck_assert_str_eq(s, "\"a\\\"b\\\\c\\n\\u0001\xc3\xa9\"");
    free(s);
}
END_TEST

START_TEST(test_free_zeroed)
{
    st_file f;

    memset(&f, 0, sizeof f);
    st_free(&f);
    st_free(&f);
    st_free(NULL);
    ck_assert_ptr_null(st_find(&f, "x"));
}
END_TEST

Suite *safetensors_suite(void)
{
    Suite *s = suite_create("safetensors");
    TCase *tc;

    tc = tcase_create("dtypes");
    tcase_add_test(tc, test_dtype_table);
    tcase_add_test(tc, test_dtype_sizes_in_header);
    tcase_add_test(tc, test_sub_byte_dtypes);
    suite_add_tcase(s, tc);

    tc = tcase_create("valid");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_basic);
    tcase_add_test(tc, test_empty_and_scalar);
    tcase_add_test(tc, test_no_tensors_and_metadata);
    tcase_add_test(tc, test_unicode_names);
    tcase_add_test(tc, test_unknown_data_len);
    tcase_add_test(tc, test_many_dims_and_tensors);
    suite_add_tcase(s, tc);

    tc = tcase_create("header");
    tcase_add_test(tc, test_bad_utf8);
    tcase_add_test(tc, test_not_json);
    tcase_add_test(tc, test_not_object);
    tcase_add_test(tc, test_trailing);
    tcase_add_test(tc, test_deep_nesting);
    tcase_add_test(tc, test_nul_in_strings);
    suite_add_tcase(s, tc);

    tc = tcase_create("entries");
    tcase_add_test(tc, test_entry_fields);
    tcase_add_test(tc, test_integers);
    tcase_add_test(tc, test_overflow);
    tcase_add_test(tc, test_offsets);
    tcase_add_test(tc, test_data_len);
    tcase_add_test(tc, test_duplicates);
    tcase_add_test(tc, test_metadata_types);
    tcase_add_test(tc, test_message_quoting);
    suite_add_tcase(s, tc);

    tc = tcase_create("files");
    tcase_add_test(tc, test_buffer);
    tcase_add_test(tc, test_read_file);
    tcase_add_test(tc, test_read_header_only);
    suite_add_tcase(s, tc);

    tc = tcase_create("writer");
    tcase_add_test(tc, test_build_roundtrip);
    tcase_add_test(tc, test_build_errors);
    tcase_add_test(tc, test_json_helpers);
    tcase_add_test(tc, test_free_zeroed);
    suite_add_tcase(s, tc);
    return s;
}
