/* Arrays that grow as items are appended: one way for the whole tree. */
#ifndef WD_GROW_H
#define WD_GROW_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "common/fault.h"

/* The capacity to give an array of `cap` items of `size` bytes so that it
 * holds `need`: cap itself when it already does, else doubled from `first`
 * (or from cap) until it does; 0 when that overflows. */
static inline size_t wd_grow_cap(size_t cap, size_t need, size_t first, size_t size)
{
    size_t n = cap ? cap : first ? first : 1;

    if (need <= cap)
        return cap;
    while (n < need) {
        if (n > SIZE_MAX / 2)
            return 0;
        n *= 2;
    }
    return n > SIZE_MAX / size ? 0 : n;
}

/* Makes room in arr (a pointer, with cap items) for need items, doubling
 * from first: 0, or -ENOMEM with arr and cap as they were. */
#define WD_GROW(arr, cap, need, first)                                                        \
    __extension__({                                                                           \
        size_t n_ = wd_grow_cap((cap), (need), (first), sizeof *(arr));                       \
        int rc_ = 0;                                                                          \
        if (n_ == 0) {                                                                        \
            rc_ = -ENOMEM;                                                                    \
        } else if (n_ != (cap)) {                                                             \
            __typeof__(arr) grown_ = wd_realloc((arr), n_ * sizeof *(arr));                   \
            if (grown_) {                                                                     \
                (arr) = grown_;                                                               \
                (cap) = n_;                                                                   \
            } else {                                                                          \
                rc_ = -ENOMEM;                                                                \
            }                                                                                 \
        }                                                                                     \
        rc_;                                                                                  \
    })

#endif
