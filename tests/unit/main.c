/* The unit-test runner: every suite in suites.h, forked, with a summary.
 * Usage: unit-tests [SUITE...]  (default: all). CK_RUN_CASE works too. */
#define _XOPEN_SOURCE 700
#include "tests/unit/suites.h"

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int rm_one(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb; (void)flag; (void)ftw;
    return remove(path);
}

void wd_test_rmtree(const char *path)
{
    if (path)
        nftw(path, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

char *wd_test_tmpdir(void)
{
    const char *base = getenv("TMPDIR");
    char *path;

    if (!base || !*base)
        base = "/tmp";
    if (asprintf(&path, "%s/weightd-unit.XXXXXX", base) < 0)
        return NULL;
    if (!mkdtemp(path)) {
        free(path);
        return NULL;
    }
    return path;
}

char *wd_test_tmp;

void wd_test_tmp_setup(void)
{
    wd_test_tmp = wd_test_tmpdir();
    ck_assert_ptr_nonnull(wd_test_tmp);
}

void wd_test_tmp_teardown(void)
{
    wd_test_rmtree(wd_test_tmp);
    free(wd_test_tmp);
    wd_test_tmp = NULL;
}

char *wd_test_path(const char *name)
{
    char *p;
    ck_assert_int_ge(asprintf(&p, "%s/%s", wd_test_tmp, name), 0);
    return p;
}

static int wanted(int argc, char **argv, const char *name)
{
    if (argc < 2)
        return 1;
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], name) == 0)
            return 1;
    return 0;
}

int main(int argc, char **argv)
{
    SRunner *runner = NULL;
    int failed;

#define X(name)                                                   \
    if (wanted(argc, argv, #name)) {                              \
        if (!runner)                                              \
            runner = srunner_create(name##_suite());              \
        else                                                      \
            srunner_add_suite(runner, name##_suite());            \
    }
    WD_TEST_SUITES(X)
#undef X
    if (!runner) {
        fprintf(stderr, "unit-tests: no such suite\n");
        return 2;
    }
    srunner_run_all(runner, CK_NORMAL);
    failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? 1 : 0;
}
