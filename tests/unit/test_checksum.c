/* common/checksum.c: the streaming form, in pieces of any size, gives what
 * the readers' block form gives; the edges of blocks; hex both ways. */
#include <check.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <xxhash.h>

#include "common/checksum.h"
#include "tests/unit/suites.h"

/* The definition, spelled out: block k seeded with k, then XXH3 of the hashes. */
static uint64_t by_definition(const unsigned char *data, uint64_t len)
{
    size_t n = (size_t)wd_sum_blocks(len);
    uint64_t *h = calloc(n + 1, sizeof *h), sum;

    for (size_t k = 0; k < n; k++) {
        uint64_t at = (uint64_t)k * WD_SUM_BLOCK, m = len - at < WD_SUM_BLOCK ? len - at : WD_SUM_BLOCK;
        h[k] = XXH3_64bits_withSeed(data + at, (size_t)m, k);
    }
    sum = XXH3_64bits(h, n * sizeof *h);
    free(h);
    return sum;
}

START_TEST(streaming_in_any_pieces_is_the_definition)
{
    static const uint64_t lens[] = {0, 1, WD_SUM_BLOCK - 1, WD_SUM_BLOCK, WD_SUM_BLOCK + 1, 3 * WD_SUM_BLOCK + 4097};
    unsigned char *data = malloc(4 * WD_SUM_BLOCK);
    wd_summer *s = wd_summer_new();
    unsigned seed = 7;

    ck_assert_ptr_nonnull(s);
    for (size_t i = 0; i < 4 * WD_SUM_BLOCK; i++)
        data[i] = (unsigned char)(rand_r(&seed) >> 7);
    for (size_t l = 0; l < sizeof lens / sizeof lens[0]; l++) {
        uint64_t len = lens[l], want = by_definition(data, len);
        for (unsigned trial = 0; trial < 20; trial++) {
            int complete = 0;
            wd_summer_start(s, len);
            for (uint64_t at = 0; at < len;) {
                uint64_t n = 1 + (uint64_t)rand_r(&seed) % (trial < 10 ? 100000 : 3 * WD_SUM_BLOCK);
                if (n > len - at)
                    n = len - at;
                wd_summer_feed(s, data + at, (size_t)n);
                at += n;
            }
            ck_assert_uint_eq(wd_summer_end(s, &complete), want);
            ck_assert_int_eq(complete, 1);
        }
        /* and block by block, as the readers do, in pieces */
        {
            size_t n = (size_t)wd_sum_blocks(len);
            uint64_t *h = calloc(n + 1, sizeof *h);
            for (size_t k = n; k-- > 0;) { /* any order */
                uint64_t at = (uint64_t)k * WD_SUM_BLOCK, m = len - at < WD_SUM_BLOCK ? len - at : WD_SUM_BLOCK;
                wd_summer_block_start(s, k);
                wd_summer_block_feed(s, data + at, (size_t)(m / 3));
                wd_summer_block_feed(s, data + at + m / 3, (size_t)(m - m / 3));
                h[k] = wd_summer_block_end(s);
                ck_assert_uint_eq(h[k], wd_sum_block(data + at, (size_t)m, k));
            }
            ck_assert_uint_eq(wd_sum_of_blocks(h, n), want);
            free(h);
        }
    }
    wd_summer_free(s);
    free(data);
}
END_TEST

START_TEST(too_few_bytes_is_not_a_checksum)
{
    wd_summer *s = wd_summer_new();
    unsigned char b[10] = {0};
    int complete = 1;

    wd_summer_start(s, 11);
    wd_summer_feed(s, b, sizeof b);
    ck_assert_uint_eq(wd_summer_end(s, &complete), 0);
    ck_assert_int_eq(complete, 0);
    wd_summer_free(s);
}
END_TEST

START_TEST(hex_round_trips)
{
    char buf[17];
    uint64_t v = 0;

    ck_assert_str_eq(wd_sum_format(0x00ab00cd00ef0012ull, buf), "00ab00cd00ef0012");
    ck_assert_int_eq(wd_sum_parse(buf, &v), 0);
    ck_assert_uint_eq(v, 0x00ab00cd00ef0012ull);
    ck_assert_int_eq(wd_sum_parse("abc", &v), -EINVAL);
    ck_assert_int_eq(wd_sum_parse("00ab00cd00ef001g", &v), -EINVAL);
    ck_assert_int_eq(wd_sum_parse(NULL, &v), -EINVAL);
}
END_TEST

Suite *checksum_suite(void)
{
    Suite *s = suite_create("checksum");
    TCase *tc = tcase_create("checksum");

    tcase_add_test(tc, streaming_in_any_pieces_is_the_definition);
    tcase_add_test(tc, too_few_bytes_is_not_a_checksum);
    tcase_add_test(tc, hex_round_trips);
    tcase_set_timeout(tc, 60);
    suite_add_tcase(s, tc);
    return s;
}
