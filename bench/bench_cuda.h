/* What the CUDA bench programs (pipebw, vmmcost) share: a check that exits
 * on a failed driver call, and device 0's primary context made current. */
#ifndef BENCH_CUDA_H
#define BENCH_CUDA_H

#include <stdio.h>
#include <stdlib.h>

#include "common/cuda_driver.h"

#define CHECK(x)                                                      \
    do {                                                              \
        CUresult r_ = (x);                                            \
        if (r_ != CUDA_SUCCESS) {                                     \
            fprintf(stderr, "%s failed: %d\n", #x, (int)r_);          \
            exit(1);                                                  \
        }                                                             \
    } while (0)

/* Loads the driver and makes device 0's primary context current; exits on
 * failure. */
static inline const wd_cuda *bench_cuda_init(CUcontext *ctx)
{
    const wd_cuda *cu;
    wd_error err = {0};
    CUdevice dev;

    if (wd_cuda_load(&cu, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        exit(1);
    }
    CHECK(cu->cuDeviceGet(&dev, 0));
    CHECK(cu->cuDevicePrimaryCtxRetain(ctx, dev));
    CHECK(cu->cuCtxSetCurrent(*ctx));
    return cu;
}

#endif
