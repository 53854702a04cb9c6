/* The error table, size parsing and growing arrays. */
#include "tests/unit/suites.h"

#include <stdio.h>
#include <string.h>

#include "common/errors.h"
#include "common/grow.h"
#include "common/size.h"

START_TEST(errname_round_trips_every_table_entry)
{
#define X(code, what)                                              \
    ck_assert_str_eq(wd_errname(-code), #code);                    \
    ck_assert_int_eq(wd_errcode(#code), -code);                    \
    ck_assert_str_eq(wd_strerror(-code), what);
    WD_ERRNO_TABLE(X)
#undef X
}
END_TEST

START_TEST(errname_of_unknown_value_is_numeric)
{
    ck_assert_str_eq(wd_errname(-4000), "E4000");
    ck_assert_int_eq(wd_errcode("ENOTANERROR"), -EPROTO);
    ck_assert_int_eq(wd_errcode(NULL), -EPROTO);
}
END_TEST

START_TEST(error_set_and_prefix)
{
    wd_error e = {0};

    ck_assert_int_eq(wd_error_set(&e, -ENOENT, "tensor %s", "x"), -ENOENT);
    ck_assert_str_eq(e.msg, "tensor x");
    wd_error_prefix(&e, "shard %d", 3);
    ck_assert_str_eq(e.msg, "shard 3: tensor x");
    ck_assert_int_eq(e.code, -ENOENT);
    ck_assert_int_eq(wd_error_set(NULL, -EIO, "ignored"), -EIO);
}
END_TEST

START_TEST(error_prefix_truncates_instead_of_overflowing)
{
    wd_error e = {0};
    char long_text[2000];

    memset(long_text, 'a', sizeof long_text - 1);
    long_text[sizeof long_text - 1] = '\0';
    wd_error_set(&e, -EINVAL, "%s", long_text);
    wd_error_prefix(&e, "%s", "prefix");
    ck_assert_uint_eq(strlen(e.msg), sizeof e.msg - 1);
    ck_assert(strncmp(e.msg, "prefix: aaa", 11) == 0);
}
END_TEST

START_TEST(utf8_check_finds_the_first_bad_byte)
{
    static const struct { const char *s; size_t len, bad; } cases[] = {
        {"", 0, 0},
        {"ascii", 5, 5},
        {"\xc3\xa9t\xc3\xa9", 5, 5},              /* été */
        {"ok\xff", 3, 2},                          /* a byte never in UTF-8 */
        {"ok\xc3", 3, 2},                          /* cut: a lead byte at the end */
        {"\xe2\x82", 2, 0},                        /* cut three-byte form */
        {"\xe2\x82\xac", 3, 3},                    /* euro sign */
        {"\xc0\xaf", 2, 0},                        /* overlong */
        {"a\xed\xa0\x80", 4, 1},                   /* a surrogate */
        {"\xf4\x90\x80\x80", 4, 0},                /* past U+10FFFF */
        {"\xf0\x9f\x98\x80!", 5, 5},               /* four bytes, then more */
        {"x\x80", 2, 1},                           /* a lone continuation byte */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        ck_assert_msg(wd_utf8_check(cases[i].s, cases[i].len) == cases[i].bad, "case %zu", i);
}
END_TEST

START_TEST(text_clean_leaves_one_line_of_valid_utf8)
{
    static const struct { const char *in, *out; } cases[] = {
        {"plain text", "plain text"},
        {"na\xc3\xafve \xe2\x82\xac \xf0\x9f\x98\x80", "na\xc3\xafve \xe2\x82\xac \xf0\x9f\x98\x80"},
        {"two\nlines\tand\x7f", "two?lines?and?"},
        {"cud\xef-vmm", "cud?-vmm"},                  /* a lead byte without its continuation */
        {"\xc0\xaf overlong", "?? overlong"},        /* an overlong '/' */
        {"\xed\xa0\x80 surrogate", "??? surrogate"},
        {"\xf4\x90\x80\x80 past U+10FFFF", "???? past U+10FFFF"},
        {"cut \xe2\x82", "cut ??"},                  /* cut short at the end */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char buf[64];
        snprintf(buf, sizeof buf, "%s", cases[i].in);
        wd_text_clean(buf);
        ck_assert_str_eq(buf, cases[i].out);
    }
}
END_TEST

START_TEST(size_parse_units)
{
    uint64_t v;

    ck_assert_int_eq(wd_size_parse("512", &v), 0);
    ck_assert_uint_eq(v, 512);
    ck_assert_int_eq(wd_size_parse("5GB", &v), 0);
    ck_assert_uint_eq(v, 5000000000ULL);
    ck_assert_int_eq(wd_size_parse("5G", &v), 0);
    ck_assert_uint_eq(v, 5000000000ULL);
    ck_assert_int_eq(wd_size_parse("8GiB", &v), 0);
    ck_assert_uint_eq(v, 8ULL << 30);
    ck_assert_int_eq(wd_size_parse("1.5KiB", &v), 0);
    ck_assert_uint_eq(v, 1536);
    ck_assert_int_eq(wd_size_parse(" 20 mib ", &v), 0);
    ck_assert_uint_eq(v, 20ULL << 20);
    ck_assert_int_eq(wd_size_parse("2T", &v), 0);
    ck_assert_uint_eq(v, 2000000000000ULL);
}
END_TEST

START_TEST(size_parse_rejects_garbage)
{
    uint64_t v = 7;

    ck_assert_int_eq(wd_size_parse("", &v), -EINVAL);
    ck_assert_int_eq(wd_size_parse("-1G", &v), -EINVAL);
    ck_assert_int_eq(wd_size_parse("12Q", &v), -EINVAL);
    ck_assert_int_eq(wd_size_parse("1G 2", &v), -EINVAL);
    ck_assert_int_eq(wd_size_parse("inf", &v), -EINVAL);
    ck_assert_int_eq(wd_size_parse("0x10", &v), -EINVAL);
    ck_assert_int_eq(wd_size_parse("99999999T", &v), -ERANGE);
    ck_assert_uint_eq(v, 7);
}
END_TEST

START_TEST(size_format_binary_and_rate_decimal)
{
    char buf[32];

    ck_assert_str_eq(wd_size_format(512, buf, sizeof buf), "512 B");
    ck_assert_str_eq(wd_size_format(3ULL << 29, buf, sizeof buf), "1.50 GiB");
    ck_assert_str_eq(wd_rate_format(41.6e9, buf, sizeof buf), "41.6 GB/s");
}
END_TEST

START_TEST(grow_doubles_and_refuses_overflow)
{
    uint32_t *a = NULL;
    size_t cap = 0;

    ck_assert_uint_eq(wd_grow_cap(0, 1, 16, 4), 16);
    ck_assert_uint_eq(wd_grow_cap(16, 16, 16, 4), 16);   /* room already */
    ck_assert_uint_eq(wd_grow_cap(16, 17, 16, 4), 32);
    ck_assert_uint_eq(wd_grow_cap(16, 100, 16, 4), 128);
    ck_assert_uint_eq(wd_grow_cap(0, SIZE_MAX, 16, 1), 0);
    ck_assert_uint_eq(wd_grow_cap(0, SIZE_MAX / 8, 16, 16), 0); /* the bytes overflow */
    for (uint32_t i = 0; i < 1000; i++) {
        ck_assert_int_eq(WD_GROW(a, cap, (size_t)i + 1, 8), 0);
        a[i] = i;
    }
    ck_assert_uint_eq(cap, 1024);
    for (uint32_t i = 0; i < 1000; i++)
        ck_assert_uint_eq(a[i], i);
    ck_assert_int_eq(WD_GROW(a, cap, SIZE_MAX, 8), -ENOMEM);
    ck_assert_uint_eq(cap, 1024); /* unchanged, and a still good */
    ck_assert_uint_eq(a[999], 999);
    free(a);
}
END_TEST

Suite *errors_suite(void)
{
    Suite *s = suite_create("errors");
    TCase *tc = tcase_create("errors");

    tcase_add_test(tc, errname_round_trips_every_table_entry);
    tcase_add_test(tc, errname_of_unknown_value_is_numeric);
    tcase_add_test(tc, error_set_and_prefix);
    tcase_add_test(tc, error_prefix_truncates_instead_of_overflowing);
    tcase_add_test(tc, text_clean_leaves_one_line_of_valid_utf8);
    tcase_add_test(tc, utf8_check_finds_the_first_bad_byte);
    suite_add_tcase(s, tc);
    return s;
}

Suite *size_suite(void)
{
    Suite *s = suite_create("size");
    TCase *tc = tcase_create("size");

    tcase_add_test(tc, size_parse_units);
    tcase_add_test(tc, size_parse_rejects_garbage);
    tcase_add_test(tc, size_format_binary_and_rate_decimal);
    tcase_add_test(tc, grow_doubles_and_refuses_overflow);
    suite_add_tcase(s, tc);
    return s;
}
