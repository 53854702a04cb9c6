/* What a reload (SIGHUP) decides without a server: which options are live,
 * loading again with the same command line, the differences, moving the
 * live values, and roles from the administrator lists. */
#include "tests/unit/suites.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "daemon/daemon.h"

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
}

/* The decision, written down once more: the table says it, this checks it. */
START_TEST(the_table_says_which_options_are_live)
{
    static const char *const live[] = {"log_level", "log_rate", "max_clients", "max_clients_per_uid",
                                       "max_requests_per_client", "max_requests_per_uid", "max_leases_per_client",
                                       "max_leases_per_uid", "hello_timeout",
                                       "idle_timeout", "admin_uids", "admin_groups", "slab_size", "checksums",
                                       "attach_writable", "sleep_timeout", "sleep_pin"};
    size_t n_live = 0;

    for (int id = 0; id < WD_OPTION_COUNT; id++) {
        bool listed = false;
        for (size_t i = 0; i < sizeof live / sizeof live[0]; i++)
            listed |= strcmp(live[i], wd_option_name((wd_option_id)id)) == 0;
        ck_assert_msg(wd_option_live((wd_option_id)id) == listed, "%s", wd_option_name((wd_option_id)id));
        n_live += listed;
    }
    ck_assert_uint_eq(n_live, sizeof live / sizeof live[0]);
}
END_TEST

/* --help marks exactly the live options. */
START_TEST(help_marks_the_live_options)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);

    ck_assert_ptr_nonnull(f);
    wd_config_usage(f);
    fclose(f);
    for (int id = 0; id < WD_OPTION_COUNT; id++) {
        char flag[64], *line, *end;
        snprintf(flag, sizeof flag, "  --%s ", wd_option_name((wd_option_id)id));
        for (char *p = flag; *p; p++)
            if (*p == '_')
                *p = '-';
        ck_assert_msg((line = strstr(text, flag)), "%s is not in --help", flag);
        end = strchr(line, '\n');
        ck_assert_ptr_nonnull(end);
        *end = '\0';
        ck_assert_msg((strstr(line, " (live)") != NULL) == wd_option_live((wd_option_id)id), "%s", line);
        *end = '\n';
    }
    free(text);
}
END_TEST

START_TEST(a_reload_reads_the_file_again_under_the_same_command_line)
{
    char *path = wd_test_path("weightd.conf");
    wd_config running, next;
    wd_error err = {0};
    char where[600], want[600];

    write_file(path, "max_clients = 300\nlog_level = notice\n");
    char *argv[] = {"weightd", "--config", path, "--max-clients-per-uid", "7", NULL};
    setenv("WEIGHTD_IDLE_TIMEOUT", "60", 1);
    ck_assert_msg(wd_config_load(&running, 5, argv, stdout, &err) == 0, "%s", err.msg);
    /* The caller's argv may go: the configuration has its own copy. */
    argv[4] = "999";
    write_file(path, "# edited\nmax_clients = 200\nmax_clients_per_uid = 3\nidle_timeout = 5\nhost_capacity = 2GiB\n");
    ck_assert_msg(wd_config_reload(&running, &next, &err) == 0, "%s", err.msg);
    ck_assert_int_eq(next.max_clients, 200);                /* the file, as it is now */
    ck_assert_int_eq(next.max_clients_per_uid, 7);          /* the command line still wins */
    ck_assert_int_eq(next.idle_timeout, 60);                /* and the environment */
    ck_assert_int_eq(next.log_level, WD_LOG_info);          /* gone from the file: the default */
    snprintf(want, sizeof want, "%s:2", path);
    ck_assert_str_eq(wd_config_origin(&next, WD_OPT_max_clients, where, sizeof where), want);
    ck_assert_str_eq(wd_config_origin(&next, WD_OPT_max_clients_per_uid, where, sizeof where),
                     "--max-clients-per-uid");
    ck_assert_str_eq(wd_config_origin(&next, WD_OPT_idle_timeout, where, sizeof where), "WEIGHTD_IDLE_TIMEOUT");
    ck_assert_str_eq(wd_config_origin(&next, WD_OPT_log_level, where, sizeof where), "the default");
    wd_config_free(&next);
    wd_config_free(&running);
    unsetenv("WEIGHTD_IDLE_TIMEOUT");
    free(path);
}
END_TEST

START_TEST(a_bad_file_fails_the_reload_naming_file_and_line)
{
    static const char *const cases[][2] = {
        {"max_clients = 10\nno_such_option = 1\n", "unknown option \"no_such_option\""},
        {"max_clients = 10\nmax_clients = 0\n", "max_clients must be a whole number"},
        {"max_clients = 10\nbackend = tpu\n", "unknown backend"},
    };
    char *path = wd_test_path("weightd.conf");
    wd_config running, next;
    wd_error err = {0};
    char want[600];

    write_file(path, "max_clients = 10\n");
    char *argv[] = {"weightd", "--config", path, NULL};
    ck_assert_msg(wd_config_load(&running, 3, argv, stdout, &err) == 0, "%s", err.msg);
    snprintf(want, sizeof want, "%s:2: ", path);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        write_file(path, cases[i][0]);
        memset(&err, 0, sizeof err);
        ck_assert_int_eq(wd_config_reload(&running, &next, &err), -EINVAL);
        ck_assert_msg(strstr(err.msg, want) && strstr(err.msg, cases[i][1]), "%s", err.msg);
    }
    ck_assert_int_eq(running.max_clients, 10);
    /* The lists resolve only once loaded: their errors name the line too. */
    write_file(path, "max_clients = 10\nadmin_uids = 0, no-such-user-here\n");
    ck_assert_msg(wd_config_reload(&running, &next, &err) == 0, "%s", err.msg);
    {
        wd_auth auth;
        ck_assert_int_eq(wd_auth_init(&auth, &next, &err), -EINVAL);
        ck_assert_msg(strstr(err.msg, want) && strstr(err.msg, "no user named \"no-such-user-here\""), "%s",
                      err.msg);
    }
    wd_config_free(&next);
    unlink(path);
    ck_assert_int_eq(wd_config_reload(&running, &next, &err), -ENOENT);
    ck_assert_ptr_nonnull(strstr(err.msg, "No such file"));
    wd_config_free(&running);
    free(path);
}
END_TEST

START_TEST(the_differences_and_what_moves)
{
    char *path = wd_test_path("weightd.conf");
    wd_config running, next;
    wd_option_change changes[WD_OPTION_COUNT];
    wd_error err = {0};
    size_t n;

    write_file(path, "host_capacity = 4GiB\nmax_clients = 1024\n");
    char *argv[] = {"weightd", "--config", path, NULL};
    ck_assert_msg(wd_config_load(&running, 3, argv, stdout, &err) == 0, "%s", err.msg);
    ck_assert_uint_eq(wd_config_diff(&running, &running, changes), 0);
    write_file(path, "host_capacity = 5G\nmax_clients = 512\nlog_level = debug\nadmin_uids = 61002\n"
                     "checksums = off\n");
    ck_assert_msg(wd_config_reload(&running, &next, &err) == 0, "%s", err.msg);
    n = wd_config_diff(&running, &next, changes);
    /* In the table's order, with the values as the log shows them. */
    ck_assert_uint_eq(n, 5);
    ck_assert_int_eq(changes[0].id, WD_OPT_host_capacity);
    ck_assert(!changes[0].live);
    ck_assert_str_eq(changes[0].from, "4GiB");
    ck_assert_str_eq(changes[0].to, "5G");
    ck_assert_int_eq(changes[1].id, WD_OPT_log_level);
    ck_assert_str_eq(changes[1].from, "info");
    ck_assert_str_eq(changes[1].to, "debug");
    ck_assert_int_eq(changes[2].id, WD_OPT_max_clients);
    ck_assert(changes[2].live);
    ck_assert_str_eq(changes[2].from, "1024");
    ck_assert_str_eq(changes[2].to, "512");
    ck_assert_int_eq(changes[3].id, WD_OPT_admin_uids);
    ck_assert_str_eq(changes[3].from, "\"\"");
    ck_assert_str_eq(changes[3].to, "\"61002\"");
    ck_assert_int_eq(changes[4].id, WD_OPT_checksums);
    ck_assert_str_eq(changes[4].from, "on");
    ck_assert_str_eq(changes[4].to, "off");

    /* The live values move; the others stay as they started. */
    wd_config_take_live(&running, &next);
    ck_assert_int_eq(running.log_level, WD_LOG_debug);
    ck_assert_int_eq(running.max_clients, 512);
    ck_assert_str_eq(running.admin_uids, "61002");
    ck_assert(!running.checksums);
    ck_assert_uint_eq(running.host_capacity, 4ULL << 30);
    ck_assert_int_eq(running.origin[WD_OPT_admin_uids], WD_ORIGIN_FILE);
    ck_assert_uint_eq(running.line[WD_OPT_admin_uids], 4);
    /* next holds the old live values now, and frees them. */
    ck_assert_str_eq(next.admin_uids, "");
    ck_assert_int_eq(next.max_clients, 1024);
    wd_config_free(&next);
    /* What is left to differ from the file is what waits for a restart. */
    ck_assert_msg(wd_config_reload(&running, &next, &err) == 0, "%s", err.msg);
    n = wd_config_diff(&running, &next, changes);
    ck_assert_uint_eq(n, 1);
    ck_assert_int_eq(changes[0].id, WD_OPT_host_capacity);
    wd_config_free(&next);
    wd_config_free(&running);
    free(path);
}
END_TEST

START_TEST(stats_shows_the_lists_to_administrators_only)
{
    char *argv[] = {"weightd", "--admin-uids", "61002", "--max-clients", "77", NULL};
    wd_config c;
    wd_error err = {0};
    cJSON *all, *some;

    ck_assert_msg(wd_config_load(&c, 5, argv, stdout, &err) == 0, "%s", err.msg);
    all = wd_config_json(&c, true);
    some = wd_config_json(&c, false);
    ck_assert_str_eq(cJSON_GetObjectItemCaseSensitive(all, "admin_uids")->valuestring, "61002");
    ck_assert_ptr_null(cJSON_GetObjectItemCaseSensitive(some, "admin_uids"));
    ck_assert_ptr_null(cJSON_GetObjectItemCaseSensitive(some, "admin_groups"));
    ck_assert_int_eq(cJSON_GetObjectItemCaseSensitive(some, "max_clients")->valueint, 77);
    ck_assert_int_eq(cJSON_GetArraySize(all), WD_OPTION_COUNT);
    cJSON_Delete(all);
    cJSON_Delete(some);
    wd_config_free(&c);
}
END_TEST

/* Roles come from the lists in force and the credentials a peer connected
 * with: the same connection changes role when the lists change. */
START_TEST(roles_follow_the_lists)
{
    char *none[] = {"weightd", NULL};
    char *lists[] = {"weightd", "--admin-uids", "61002", "--admin-groups", "62000", NULL};
    gid_t groups[] = {100, 62000};
    wd_conn reader = {.uid = 61001, .gid = 61001}, by_uid = {.uid = 61002, .gid = 61002},
            by_group = {.uid = 61003, .gid = 61003, .groups = groups, .n_groups = 2},
            by_gid = {.uid = 61004, .gid = 62000}, unknown = {.uid = (uid_t)-1, .gid = (gid_t)-1},
            root = {.uid = 0, .gid = 0};
    wd_config c;
    wd_auth a;
    wd_error err = {0};

    ck_assert_int_eq(wd_config_load(&c, 1, none, stdout, &err), 0);
    ck_assert_int_eq(wd_auth_init(&a, &c, &err), 0);
    ck_assert_int_eq(wd_auth_role(&a, &by_uid), WD_ROLE_READER);
    ck_assert_int_eq(wd_auth_role(&a, &by_group), WD_ROLE_READER);
    ck_assert_int_eq(wd_auth_role(&a, &root), WD_ROLE_ADMIN);
    wd_auth_free(&a);
    wd_config_free(&c);

    ck_assert_int_eq(wd_config_load(&c, 5, lists, stdout, &err), 0);
    ck_assert_int_eq(wd_auth_init(&a, &c, &err), 0);
    ck_assert_int_eq(wd_auth_role(&a, &reader), WD_ROLE_READER);
    ck_assert_int_eq(wd_auth_role(&a, &by_uid), WD_ROLE_ADMIN);
    ck_assert_int_eq(wd_auth_role(&a, &by_group), WD_ROLE_ADMIN);
    ck_assert_int_eq(wd_auth_role(&a, &by_gid), WD_ROLE_ADMIN);
    ck_assert_int_eq(wd_auth_role(&a, &unknown), WD_ROLE_READER);
    wd_auth_free(&a);
    wd_config_free(&c);
}
END_TEST

Suite *daemon_reload_suite(void)
{
    Suite *s = suite_create("daemon_reload");
    TCase *tc = tcase_create("reload");

    tcase_add_checked_fixture(tc, wd_test_tmp_setup, wd_test_tmp_teardown);
    tcase_add_test(tc, the_table_says_which_options_are_live);
    tcase_add_test(tc, help_marks_the_live_options);
    tcase_add_test(tc, a_reload_reads_the_file_again_under_the_same_command_line);
    tcase_add_test(tc, a_bad_file_fails_the_reload_naming_file_and_line);
    tcase_add_test(tc, the_differences_and_what_moves);
    tcase_add_test(tc, stats_shows_the_lists_to_administrators_only);
    tcase_add_test(tc, roles_follow_the_lists);
    suite_add_tcase(s, tc);
    return s;
}
