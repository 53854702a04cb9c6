/* Test-only fault injection: the environment variable WEIGHTD_FAULTS,
 * "POINT:N[,POINT:N...]", makes the Nth pass through POINT (counted over
 * the process) fail, and "POINT:N+" every pass from the Nth. The points:
 *   alloc       the allocations of a load (host memory and device segments)
 *   read        a read of a checkpoint file (fails with EIO)
 *   short_read  a read of a checkpoint file (returns half of what was asked)
 * Built in unless WD_RELEASE is defined (make RELEASE=1): release builds
 * have no hook at all. */
#ifndef WD_FAULT_H
#define WD_FAULT_H

#include <stdbool.h>
#include <stddef.h>

#define WD_FAULT_POINTS(X) X(alloc) X(read) X(short_read)
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
static inline const char *wd_fault_armed(void)
{
    return NULL;
}
#else
/* Whether this pass through p is to fail. Thread-safe. */
bool wd_fault(wd_fault_point p);
/* WEIGHTD_FAULTS when it arms anything, else NULL (for a log line). */
const char *wd_fault_armed(void);
#endif

#endif
