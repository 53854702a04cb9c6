/* Test-only fault injection, set by the environment variable WEIGHTD_FAULTS:
 * a comma-separated list of
 *   alloc:FILE:LINE[@N]  the Nth pass (default 1) through the allocation at
 *                        FILE:LINE (as "loader/loader.c:760") fails, once
 *                        the daemon serves (wd_fault_serving)
 *   alloc:list           nothing fails; the first four passes through each
 *                        allocation once the daemon serves are written to
 *                        stderr ("weightd: fault site: alloc FILE:LINE,
 *                        pass N"), so that a test can name every one a
 *                        load goes through and fail each in turn (a line
 *                        that allocates twice is two passes a time)
 *   read:N[+]            the Nth read of a checkpoint file fails with EIO
 *                        (with '+', every read from the Nth)
 *   short_read:N[+]      the Nth read returns half of what it asked
 * The allocations are the wd_malloc family below, which the load's path
 * (loader/, allocator/, the daemon's jobs, registry, attach and sleep) uses
 * instead of malloc, and WD_GROW. Built in unless WD_RELEASE is defined
 * (make RELEASE=1): release builds have no hook at all. */
#ifndef WD_FAULT_H
#define WD_FAULT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#define WD_FAULT_POINTS(X) X(read) X(short_read)
typedef enum wd_fault_point {
#define X(name) WD_FAULT_##name,
    WD_FAULT_POINTS(X)
#undef X
    WD_FAULT_COUNT
} wd_fault_point;

#ifdef WD_RELEASE
static inline bool wd_fault(wd_fault_point p)
{
    (void)p;
    return false;
}
#define wd_fault_site() false
static inline const char *wd_fault_armed(void)
{
    return NULL;
}
static inline void wd_fault_serving(void)
{
}
#else
/* Whether this pass through p is to fail. Thread-safe. */
bool wd_fault(wd_fault_point p);
/* Whether this pass through the allocation at file:line is to fail. */
bool wd_fault__site(const char *file, int line);
#define wd_fault_site() wd_fault__site(__FILE__, __LINE__)
/* WEIGHTD_FAULTS when it arms anything, else NULL (for a log line). */
const char *wd_fault_armed(void);
/* From now on allocations count: the daemon serves (what it did to start is
 * not a load's). */
void wd_fault_serving(void);
#endif

/* malloc and its family, failing where WEIGHTD_FAULTS says. */
#define wd_malloc(n) (wd_fault_site() ? NULL : malloc(n))
#define wd_calloc(n, size) (wd_fault_site() ? NULL : calloc((n), (size)))
#define wd_realloc(p, n) (wd_fault_site() ? NULL : realloc((p), (n)))
#define wd_strdup(s) (wd_fault_site() ? NULL : strdup(s))
#define wd_strndup(s, n) (wd_fault_site() ? NULL : strndup((s), (n)))

#endif
