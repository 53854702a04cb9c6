/* Every Check suite of the unit-test runner, one line each. */
#ifndef WD_TEST_SUITES_H
#define WD_TEST_SUITES_H

#include <check.h>

#define WD_TEST_SUITES(X) \
    X(errors)             \
    X(size)               \
    X(checksum)           \
    X(safetensors)        \
    X(checkpoint)         \
    X(mkckpt)             \
    X(moe)                \
    X(placement)          \
    X(loader)             \
    X(allocator)          \
    X(alloc_config)       \
    X(alloc_tags)         \
    X(backend_host)       \
    X(proto)              \
    X(daemon_config)      \
    X(daemon_reload)      \
    X(registry)

#define X(name) Suite *name##_suite(void);
WD_TEST_SUITES(X)
#undef X

/* A fresh temporary directory for a test (mkdtemp under $TMPDIR or /tmp);
 * removed with everything in it by wd_test_rmtree(). */
char *wd_test_tmpdir(void);
void wd_test_rmtree(const char *path);

/* A checked fixture: a fresh wd_test_tmp for each test, removed after it. */
extern char *wd_test_tmp;
void wd_test_tmp_setup(void);
void wd_test_tmp_teardown(void);
/* "wd_test_tmp/name", malloc'd. */
char *wd_test_path(const char *name);

#endif
