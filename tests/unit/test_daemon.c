/* The daemon's option table and its model registry. */
#include "tests/unit/suites.h"

#include <stdlib.h>
#include <string.h>

#include "daemon/daemon.h"

static FILE *sink(void)
{
    FILE *f = fopen("/dev/null", "w");
    ck_assert_ptr_nonnull(f);
    return f;
}

START_TEST(defaults_come_from_the_table)
{
    char *argv[] = {"weightd", NULL};
    wd_config c;
    wd_error err = {0};

    unsetenv("WEIGHTD_HOST_CAPACITY");
    ck_assert_int_eq(wd_config_load(&c, 1, argv, stdout, &err), 0);
    ck_assert_str_eq(c.backend, "host");
    ck_assert_int_eq(c.host_devices, 1);
    ck_assert_uint_eq(c.host_capacity, 8ULL << 30);
    ck_assert_str_eq(c.load_alloc_conf, WA_WEIGHTD_POLICY);
    ck_assert_int_eq(c.log_level, WD_LOG_info);
    wd_config_free(&c);
}
END_TEST

START_TEST(command_line_beats_environment_beats_file)
{
    char *dir = wd_test_tmpdir(), path[512];
    FILE *f;
    wd_config c;
    wd_error err = {0};

    snprintf(path, sizeof path, "%s/weightd.conf", dir);
    f = fopen(path, "w");
    fprintf(f, "# a comment\nhost-devices = 3\nhost_capacity = 2GiB\nlog-level = debug\n");
    fclose(f);
    char *argv[] = {"weightd", "--config", path, "--host-devices=5", NULL};
    setenv("WEIGHTD_HOST_CAPACITY", "3GiB", 1);
    setenv("WEIGHTD_HOST_DEVICES", "4", 1);
    ck_assert_msg(wd_config_load(&c, 4, argv, stdout, &err) == 0, "%s", err.msg);
    ck_assert_int_eq(c.host_devices, 5);             /* command line */
    ck_assert_uint_eq(c.host_capacity, 3ULL << 30);  /* environment */
    ck_assert_int_eq(c.log_level, WD_LOG_debug);     /* file */
    wd_config_free(&c);
    unsetenv("WEIGHTD_HOST_CAPACITY");
    unsetenv("WEIGHTD_HOST_DEVICES");
    wd_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(bad_options_are_errors_that_name_them)
{
    static const char *const cases[][3] = {
        {"--host-devices", "0", "host_devices"},     {"--host-devices", "x", "host_devices"},
        {"--host-capacity", "lots", "host_capacity"}, {"--log-level", "loud", "log_level"},
        {"--colour", "red", "unknown option"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *argv[] = {"weightd", (char *)cases[i][0], (char *)cases[i][1], NULL};
        wd_config c;
        wd_error err = {0};
        ck_assert_int_eq(wd_config_load(&c, 3, argv, stdout, &err), -EINVAL);
        ck_assert_msg(strstr(err.msg, cases[i][2]), "%s", err.msg);
    }
    char *argv[] = {"weightd", "--socket", NULL};
    wd_config c;
    wd_error err = {0};
    ck_assert_int_eq(wd_config_load(&c, 2, argv, stdout, &err), -EINVAL);
    ck_assert_ptr_nonnull(strstr(err.msg, "needs a value"));
    /* Values that only make sense together, or parse only as a whole. */
    char *gpus[] = {"weightd", "--backend", "host", "--devices", "0,1", NULL};
    ck_assert_int_eq(wd_config_load(&c, 5, gpus, stdout, &err), -EINVAL);
    ck_assert_ptr_nonnull(strstr(err.msg, "--host-devices"));
    char *backend[] = {"weightd", "--backend", "tpu", NULL};
    ck_assert_int_eq(wd_config_load(&c, 3, backend, stdout, &err), -EINVAL);
    ck_assert_ptr_nonnull(strstr(err.msg, "unknown backend \"tpu\""));
    char *conf[] = {"weightd", "--load-alloc-conf", "max_split_size_mb:2", NULL};
    ck_assert_int_eq(wd_config_load(&c, 3, conf, stdout, &err), -EINVAL);
    ck_assert_ptr_nonnull(strstr(err.msg, "load_alloc_conf"));
}
END_TEST

START_TEST(help_and_version_print_and_stop)
{
    char *help[] = {"weightd", "--help", NULL}, *version[] = {"weightd", "--version", NULL};
    wd_config c;
    wd_error err = {0};
    FILE *out = sink();

    ck_assert_int_eq(wd_config_load(&c, 2, help, out, &err), 1);
    ck_assert_int_eq(wd_config_load(&c, 2, version, out, &err), 1);
    fclose(out);
}
END_TEST

START_TEST(config_file_errors_name_file_and_line)
{
    char *dir = wd_test_tmpdir(), path[512];
    FILE *f;
    wd_config c;
    wd_error err = {0};

    snprintf(path, sizeof path, "%s/bad.conf", dir);
    f = fopen(path, "w");
    fprintf(f, "backend = host\nthis line has no equals\n");
    fclose(f);
    char *argv[] = {"weightd", "--config", path, NULL};
    ck_assert_int_eq(wd_config_load(&c, 3, argv, stdout, &err), -EINVAL);
    ck_assert_ptr_nonnull(strstr(err.msg, "bad.conf:2"));
    wd_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(model_names_are_checked)
{
    wd_error err = {0};

    ck_assert_int_eq(wd_model_name_check("gpt-oss_120b.v2", &err), 0);
    ck_assert_int_eq(wd_model_name_check("", &err), -EINVAL);
    ck_assert_int_eq(wd_model_name_check("../etc", &err), -EINVAL);
    ck_assert_int_eq(wd_model_name_check("a/b", &err), -EINVAL);
    ck_assert_int_eq(wd_model_name_check("-rf", &err), -EINVAL);
    ck_assert_int_eq(wd_model_name_check("naïve", &err), -EINVAL);
    char long_name[WD_MODEL_NAME_MAX + 2];
    memset(long_name, 'a', sizeof long_name - 1);
    long_name[sizeof long_name - 1] = '\0';
    ck_assert_int_eq(wd_model_name_check(long_name, &err), -EINVAL);
}
END_TEST

START_TEST(registry_adds_finds_and_removes)
{
    wd_server s;
    wd_model *a, *b, *c;
    const int devs[] = {1, 0};
    wd_error err = {0};
    char text[16];

    memset(&s, 0, sizeof s);
    ck_assert_int_eq(wd_registry_add(&s, "a", "/x/a", devs + 1, 1, WL_REPLICATE, &a, &err), 0);
    ck_assert_int_eq(wd_registry_add(&s, "b", "/x/b", devs, 2, WL_EXPERT_PARALLEL, &b, &err), 0);
    ck_assert_int_eq(wd_registry_add(&s, "a", "/x/a2", devs, 1, WL_REPLICATE, &c, &err), -EEXIST);
    ck_assert_str_eq(wd_model_devices_text(a, text, sizeof text), "0");
    ck_assert_str_eq(wd_model_devices_text(b, text, sizeof text), "1,0");
    ck_assert_int_eq(b->placement, WL_EXPERT_PARALLEL);
    ck_assert_ptr_eq(wd_registry_find(&s, "b"), b);
    ck_assert_ptr_eq(s.models, a); /* arrival order */
    ck_assert_int_eq(a->state, WD_MODEL_LOADING);
    ck_assert_uint_eq(wd_registry_count(&s), 2);
    wd_registry_remove(&s, a, false);
    ck_assert_ptr_null(wd_registry_find(&s, "a"));
    ck_assert_uint_eq(wd_registry_count(&s), 1);
    wd_registry_remove(&s, b, false);
    ck_assert_ptr_null(s.models);
}
END_TEST

Suite *daemon_config_suite(void)
{
    Suite *s = suite_create("daemon_config");
    TCase *tc = tcase_create("config");

    tcase_add_test(tc, defaults_come_from_the_table);
    tcase_add_test(tc, command_line_beats_environment_beats_file);
    tcase_add_test(tc, bad_options_are_errors_that_name_them);
    tcase_add_test(tc, help_and_version_print_and_stop);
    tcase_add_test(tc, config_file_errors_name_file_and_line);
    suite_add_tcase(s, tc);
    return s;
}

Suite *registry_suite(void)
{
    Suite *s = suite_create("registry");
    TCase *tc = tcase_create("registry");

    tcase_add_test(tc, model_names_are_checked);
    tcase_add_test(tc, registry_adds_finds_and_removes);
    suite_add_tcase(s, tc);
    return s;
}
