/* The CUDA driver, loaded at run time: libcuda.so.1 is opened on first use,
 * so every program starts on machines without a driver and says clearly why
 * the cuda backends cannot run there. Only allocator/backend_cuda.c and
 * allocator/cuda_driver.c include this. */
#ifndef WA_CUDA_DRIVER_H
#define WA_CUDA_DRIVER_H

#include <cuda.h>

#include "common/errors.h"

/* X(function): each resolved with cuGetProcAddress; the member is typed from
 * cuda.h's own declaration (the macro names, cuMemAlloc -> cuMemAlloc_v2,
 * apply to members and calls alike). */
#define WA_CUDA_FUNCTIONS(X)                                                                            \
    X(cuInit) X(cuGetErrorString) X(cuDeviceGetCount) X(cuDeviceGet) X(cuDeviceGetName)                 \
    X(cuDeviceGetUuid) X(cuDeviceGetAttribute) X(cuDevicePrimaryCtxSetFlags) X(cuDevicePrimaryCtxRetain) \
    X(cuDevicePrimaryCtxRelease) X(cuCtxSetCurrent) X(cuMemGetInfo) X(cuMemGetAllocationGranularity)    \
    X(cuMemCreate) X(cuMemRelease) X(cuMemAddressReserve) X(cuMemAddressFree) X(cuMemMap) X(cuMemUnmap) \
    X(cuMemSetAccess) X(cuMemExportToShareableHandle) X(cuMemAlloc) X(cuMemFree) X(cuIpcGetMemHandle)   \
    X(cuMemHostAlloc) X(cuMemFreeHost) X(cuMemHostRegister) X(cuMemHostUnregister) X(cuStreamCreate)    \
    X(cuStreamDestroy) X(cuStreamSynchronize) X(cuMemcpyHtoDAsync) X(cuMemcpyHtoD) X(cuMemcpyDtoH)

typedef struct wa_cuda {
#define X(f) __typeof__(f) *f;
    WA_CUDA_FUNCTIONS(X)
#undef X
} wa_cuda;

/* Loads the driver (once) and cuInit()s it. */
int wa_cuda_load(const wa_cuda **out, wd_error *err);

/* "cuMemCreate: out of memory (CUDA_ERROR_OUT_OF_MEMORY)" into err, with the
 * errno that fits: -ENOMEM for out-of-memory, -ENODEV for no device, else -EIO. */
int wa_cuda_error(CUresult r, const char *what, wd_error *err);

#endif
