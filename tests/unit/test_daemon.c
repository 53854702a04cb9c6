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
        {"--colour", "red", "unknown option"},       {"--attach-writable", "maybe", "attach_writable"},
        {"--direct-io", "2", "direct_io"},           {"--slab-size", "big", "slab_size"},
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
    /* on/off options take the usual spellings */
    char *on[] = {"weightd", "--attach-writable", "ON", "--direct-io", "yes", NULL};
    ck_assert_int_eq(wd_config_load(&c, 5, on, stdout, &err), 0);
    ck_assert(c.attach_writable && c.direct_io);
    wd_config_free(&c);
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

/* The template (--print-config) names every option of the table, and read
 * back as it is, or with every option uncommented, it gives the defaults. */
START_TEST(config_template_lists_every_option_at_its_default)
{
    char *dir = wd_test_tmpdir(), path[512], line[4096], *text;
    char *plain[] = {"weightd", NULL}, *argv[] = {"weightd", "--config", path, NULL};
    size_t len;
    FILE *f;
    wd_config want, got;
    wd_error err = {0};

    ck_assert_int_eq(wd_config_load(&want, 1, plain, stdout, &err), 0);
    f = open_memstream(&text, &len);
    ck_assert_int_eq(wd_config_template(f), 0);
    fclose(f);
#define X(name, type, def, meta, when, help)                                                          \
    snprintf(line, sizeof line, "\n#%s =%s%s\n", #name, *def ? " " : "", def);                      \
    ck_assert_msg(strcmp(#name, "config") == 0 || strstr(text, line), "no \"%s\" in the template", line + 1); \
    ck_assert_msg(strstr(text, "\n# " #name " " meta " ("), "option %s has no help line", #name);
    WD_OPTION_TABLE(X)
#undef X
    snprintf(path, sizeof path, "%s/weightd.conf", dir);
    for (int uncomment = 0; uncomment < 2; uncomment++) {
        FILE *in = fmemopen(text, len, "r"), *out = fopen(path, "w");
        ck_assert_ptr_nonnull(in);
        ck_assert_ptr_nonnull(out);
        while (fgets(line, sizeof line, in)) {
            size_t k = strspn(line + 1, "abcdefghijklmnopqrstuvwxyz_");
            bool option = line[0] == '#' && k > 0 && strncmp(line + 1 + k, " =", 2) == 0;
            fputs(uncomment && option ? line + 1 : line, out);
        }
        fclose(in);
        fclose(out);
        ck_assert_msg(wd_config_load(&got, 3, argv, stdout, &err) == 0, "%s", err.msg);
#define CMP_STRING(a, b) ck_assert_str_eq(a, b)
#define CMP_INT(a, b) ck_assert_int_eq(a, b)
#define CMP_SIZE(a, b) ck_assert_uint_eq(a, b)
#define CMP_LEVEL(a, b) ck_assert_int_eq(a, b)
#define CMP_BOOL(a, b) ck_assert_int_eq(a, b)
#define X(name, type, def, meta, when, help)    \
    if (strcmp(#name, "config") != 0)     \
        CMP_##type(got.name, want.name);
        WD_OPTION_TABLE(X)
#undef X
        wd_config_free(&got);
    }
    wd_config_free(&want);
    free(text);
    wd_test_rmtree(dir);
    free(dir);
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

/* A model's dests packed into slabs (registry.c): per device, in dest
 * order, each part at a 512-byte boundary and inside one slab. */
START_TEST(slabs_pack_parts_per_device)
{
    wd_server s;
    wd_model *m;
    const int devs[] = {0, 1};
    wd_error err = {0};
    /* tensor, len, device: two devices, an empty tensor, one larger than a slab */
    const struct { uint32_t tensor; uint64_t len; int device; } d[] = {
        {0, 1000, 0}, {0, 1000, 1}, {1, 0, 0}, {1, 0, 1}, {2, 300u << 20, 0}, {2, 300u << 20, 1},
        {3, 100u << 20, 0}, {3, 100u << 20, 1}, {4, 200u << 20, 0}, {4, 200u << 20, 1},
    };
    const size_t n = sizeof d / sizeof d[0];

    memset(&s, 0, sizeof s);
    ck_assert_int_eq(wd_registry_add(&s, "m", "/x", devs, 2, WL_REPLICATE, &m, &err), 0);
    m->n_dest = n;
    m->dest = calloc(n, sizeof *m->dest);
    for (size_t i = 0; i < n; i++)
        m->dest[i] = (wl_dest){.tensor = d[i].tensor, .len = d[i].len, .device = d[i].device};
    /* 256 MiB slabs: 1000 B + 300 MiB go to two slabs (it does not fit
     * after the first part), 100 MiB joins the second... */
    ck_assert_int_eq(wd_model_plan_slabs(m, 256u << 20, &err), 0);
    ck_assert_uint_eq(m->part[2].slab, WD_NO_SLAB);
    ck_assert_uint_eq(m->part[3].slab, WD_NO_SLAB);
    for (size_t i = 0; i < n; i++) {
        const wd_part *p = &m->part[i];
        if (!d[i].len)
            continue;
        ck_assert_uint_lt(p->slab, m->n_slabs);
        ck_assert_int_eq(m->slabs[p->slab].device, d[i].device);
        ck_assert_uint_eq(p->offset % 512, 0);
        ck_assert_uint_le(p->offset + d[i].len, m->slabs[p->slab].bytes);
        ck_assert(m->slabs[p->slab].first_dest <= i && i < m->slabs[p->slab].end_dest);
    }
    /* per device: [1000 B], [300 MiB], [100 MiB], [200 MiB]: a part never
     * straddles, and one too large has its own */
    ck_assert_uint_eq(m->n_slabs, 8);
    ck_assert_uint_eq(m->part[0].slab, 0);
    ck_assert_uint_eq(m->part[1].slab, 1);
    ck_assert_uint_eq(m->part[4].slab, 2);
    ck_assert_uint_eq(m->part[6].slab, 4);
    ck_assert_uint_eq(m->part[8].slab, 6);
    ck_assert_uint_eq(m->slabs[2].bytes, 300u << 20);
    ck_assert_uint_eq(m->slabs[0].bytes, 1000); /* small: shares the small pool's pages */
    for (size_t k = 1; k < m->n_slabs; k++)
        ck_assert_uint_lt(m->slabs[k - 1].first_dest, m->slabs[k].first_dest);
    free(m->dest);
    /* The default: a 32nd of what the device holds (at least 256 MiB), so
     * 64 parts of 600 MiB are 32 slabs of two. */
    m->n_dest = 64;
    m->dest = calloc(64, sizeof *m->dest);
    for (uint32_t i = 0; i < 64; i++)
        m->dest[i] = (wl_dest){.tensor = i, .len = 600u << 20, .device = 1};
    ck_assert_int_eq(wd_model_plan_slabs(m, 0, &err), 0);
    ck_assert_uint_eq(m->n_slabs, 32);
    ck_assert_uint_eq(m->part[63].slab, 31);
    ck_assert_uint_eq(m->part[63].offset, 600u << 20);
    ck_assert_uint_eq(m->slabs[0].bytes, 1200u << 20);
    wd_registry_remove(&s, m, false);
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
    tcase_add_test(tc, config_template_lists_every_option_at_its_default);
    suite_add_tcase(s, tc);
    return s;
}

Suite *registry_suite(void)
{
    Suite *s = suite_create("registry");
    TCase *tc = tcase_create("registry");

    tcase_add_test(tc, model_names_are_checked);
    tcase_add_test(tc, registry_adds_finds_and_removes);
    tcase_add_test(tc, slabs_pack_parts_per_device);
    suite_add_tcase(s, tc);
    return s;
}
