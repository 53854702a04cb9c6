/* The allocator configuration in PyTorch's syntax. */
#include "tests/unit/suites.h"

#include <string.h>

#include "allocator/allocator.h"

#define MiB (1024ULL * 1024ULL)

static wa_config parse_ok(const char *text, const wa_config *base, wa_conf_mode mode)
{
    wa_config c;
    wd_error err = {0};

    ck_assert_msg(wa_config_parse(text, base, mode, &c, &err) == 0, "\"%s\": %s", text, err.msg);
    return c;
}

static void parse_fails(const char *text, const char *fragment)
{
    wa_config c;
    wd_error err = {0};

    ck_assert_msg(wa_config_parse(text, NULL, WA_CONF_OVERLAY, &c, &err) == -EINVAL, "\"%s\" was accepted", text);
    ck_assert_msg(strstr(err.msg, fragment), "\"%s\": message \"%s\" lacks \"%s\"", text, err.msg, fragment);
}

START_TEST(defaults_match_pytorch)
{
    wa_config c;
    wa_config_default(&c);
    ck_assert_uint_eq(c.max_split_size, UINT64_MAX);
    ck_assert_uint_eq(c.max_non_split_rounding, 20 * MiB);
    ck_assert(c.garbage_collection_threshold == 0);
    for (int i = 0; i < WA_ROUNDUP_INTERVALS; i++)
        ck_assert_uint_eq(c.roundup_power2_divisions[i], 0);
    ck_assert(!c.expandable_segments);
}
END_TEST

START_TEST(every_key_parses)
{
    wa_config c = parse_ok("max_split_size_mb:20, max_non_split_rounding_mb:256,garbage_collection_threshold:0.6,"
                           "roundup_power2_divisions:4,release_lock_on_cudamalloc:True,backend:native",
                           NULL, WA_CONF_OVERLAY);
    ck_assert_uint_eq(c.max_split_size, 20 * MiB);
    ck_assert_uint_eq(c.max_non_split_rounding, 256 * MiB);
    ck_assert(c.garbage_collection_threshold == 0.6);
    ck_assert_uint_eq(c.roundup_power2_divisions[0], 4);
    ck_assert_uint_eq(c.roundup_power2_divisions[15], 4);
    ck_assert(c.release_lock_on_cudamalloc);
}
END_TEST

START_TEST(divisions_list_follows_pytorch)
{
    /* The first entry also fills the intervals below it; '>' fills from the
     * last named interval on, that interval included (as PyTorch does). */
    wa_config c = parse_ok("roundup_power2_divisions:[4:2,64:8,>:1]", NULL, WA_CONF_OVERLAY);
    ck_assert_uint_eq(c.roundup_power2_divisions[0], 2);
    ck_assert_uint_eq(c.roundup_power2_divisions[2], 2);
    ck_assert_uint_eq(c.roundup_power2_divisions[3], 0);
    ck_assert_uint_eq(c.roundup_power2_divisions[5], 0);
    ck_assert_uint_eq(c.roundup_power2_divisions[6], 1);
    ck_assert_uint_eq(c.roundup_power2_divisions[15], 1);
}
END_TEST

START_TEST(bad_values_name_the_offending_text)
{
    parse_fails("max_split_size_mb:19", "too small");
    parse_fails("max_split_size_mb:abc", "max_split_size_mb:abc");
    parse_fails("max_split_size_mb", "expected ':'");
    parse_fails("max_split_size_mb:", "needs a value");
    parse_fails("max_split_size_mb:20x", "max_split_size_mb:20x");
    parse_fails("garbage_collection_threshold:1.0", "(0.0, 1.0)");
    parse_fails("garbage_collection_threshold:0", "(0.0, 1.0)");
    parse_fails("roundup_power2_divisions:3", "power of 2");
    parse_fails("roundup_power2_divisions:[3:4]", "power of 2");
    parse_fails("roundup_power2_divisions:[1:4", "']'");
    parse_fails("expandable_segments:yes", "True or False");
    parse_fails("max_split_sise_mb:20", "unknown option \"max_split_sise_mb\"");
    parse_fails("backend:cudaMallocAsync", "cudaMallocAsync");
    /* Spaces are dropped by the lexer, as in PyTorch: the value runs on. */
    parse_fails("max_split_size_mb:20 garbage_collection_threshold:0.5", "not a whole number");
}
END_TEST

START_TEST(pytorch_mode_resets_three_keys_and_keeps_the_rest)
{
    wa_config base = parse_ok("max_split_size_mb:30,max_non_split_rounding_mb:64,garbage_collection_threshold:0.5,"
                              "roundup_power2_divisions:2", NULL, WA_CONF_OVERLAY);
    wa_config c = parse_ok("garbage_collection_threshold:0.8", &base, WA_CONF_PYTORCH);
    ck_assert_uint_eq(c.max_split_size, UINT64_MAX);
    ck_assert_uint_eq(c.roundup_power2_divisions[0], 0);
    ck_assert(c.garbage_collection_threshold == 0.8);
    ck_assert_uint_eq(c.max_non_split_rounding, 64 * MiB);
    /* The overlay keeps everything it does not name. */
    c = parse_ok("garbage_collection_threshold:0.8", &base, WA_CONF_OVERLAY);
    ck_assert_uint_eq(c.max_split_size, 30 * MiB);
    ck_assert_uint_eq(c.roundup_power2_divisions[3], 2);
    /* "default" is the defaults in both modes. */
    c = parse_ok("default", &base, WA_CONF_OVERLAY);
    ck_assert_uint_eq(c.max_split_size, UINT64_MAX);
    ck_assert_uint_eq(c.max_non_split_rounding, 20 * MiB);
}
END_TEST

START_TEST(format_round_trips)
{
    static const char *const texts[] = {
        "default", "max_split_size_mb:20", "garbage_collection_threshold:0.6,roundup_power2_divisions:8",
        "max_split_size_mb:128,max_non_split_rounding_mb:40,roundup_power2_divisions:[1:1,256:4,>:8]",
    };
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        char buf[512];
        wa_config a = parse_ok(texts[i], NULL, WA_CONF_OVERLAY), b;
        wa_config_format(&a, buf, sizeof buf);
        b = parse_ok(buf, NULL, WA_CONF_OVERLAY);
        ck_assert_msg(wa_config_equal(&a, &b), "\"%s\" -> \"%s\"", texts[i], buf);
    }
}
END_TEST

Suite *alloc_config_suite(void)
{
    Suite *s = suite_create("alloc_config");
    TCase *tc = tcase_create("config");

    tcase_add_test(tc, defaults_match_pytorch);
    tcase_add_test(tc, every_key_parses);
    tcase_add_test(tc, divisions_list_follows_pytorch);
    tcase_add_test(tc, bad_values_name_the_offending_text);
    tcase_add_test(tc, pytorch_mode_resets_three_keys_and_keeps_the_rest);
    tcase_add_test(tc, format_round_trips);
    suite_add_tcase(s, tc);
    return s;
}
