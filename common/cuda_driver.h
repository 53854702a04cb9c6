/* The CUDA driver, loaded at run time: libcuda.so.1 is opened on first use,
 * so every program starts on machines without a driver and says clearly why
 * CUDA cannot be used there. One shim for the two sides that call CUDA: the
 * daemon's backends (allocator/backend_cuda.c: make, export, copy) and the
 * worker's client library (client/attach.c: import, map, read). */
#ifndef WD_CUDA_DRIVER_H
#define WD_CUDA_DRIVER_H

#include <cuda.h>

#include "common/errors.h"

/* X(function): each resolved with cuGetProcAddress; the member is typed from
 * cuda.h's own declaration (the macro names, cuMemAlloc -> cuMemAlloc_v2,
 * apply to members and calls alike). */
#define WD_CUDA_FUNCTIONS(X)                                                                            \
    X(cuInit) X(cuGetErrorString) X(cuDeviceGetCount) X(cuDeviceGet) X(cuDeviceGetName)                 \
    X(cuDeviceGetUuid) X(cuDeviceGetAttribute) X(cuDevicePrimaryCtxSetFlags) X(cuDevicePrimaryCtxRetain) \
    X(cuDevicePrimaryCtxRelease) X(cuCtxSetCurrent) X(cuMemGetInfo) X(cuMemGetAllocationGranularity)    \
    X(cuMemCreate) X(cuMemRelease) X(cuMemAddressReserve) X(cuMemAddressFree) X(cuMemMap) X(cuMemUnmap) \
    X(cuMemSetAccess) X(cuMemExportToShareableHandle) X(cuMemAlloc) X(cuMemFree) X(cuIpcGetMemHandle)   \
    X(cuMemHostAlloc) X(cuMemFreeHost) X(cuMemHostRegister) X(cuMemHostUnregister) X(cuStreamCreate)    \
    X(cuStreamDestroy) X(cuStreamSynchronize) X(cuCtxSynchronize) X(cuMemcpyHtoDAsync) X(cuMemcpyHtoD) X(cuMemcpyDtoH)     \
    X(cuCtxPushCurrent) X(cuCtxPopCurrent) X(cuMemImportFromShareableHandle) X(cuIpcOpenMemHandle)      \
    X(cuIpcCloseMemHandle) X(cuMemcpyDtoDAsync) X(cuStreamBeginCapture) X(cuStreamEndCapture)            \
    X(cuGraphInstantiateWithFlags) X(cuGraphLaunch) X(cuGraphDestroy) X(cuGraphExecDestroy) X(cuMemsetD8)

typedef struct wd_cuda {
#define X(f) __typeof__(f) *f;
    WD_CUDA_FUNCTIONS(X)
#undef X
} wd_cuda;

/* Loads the driver (once) and cuInit()s it. */
int wd_cuda_load(const wd_cuda **out, wd_error *err);

/* "cuMemCreate: out of memory (CUDA_ERROR_OUT_OF_MEMORY)" into err, with the
 * errno that fits: -ENOMEM for out-of-memory, -ENODEV for no device, else -EIO. */
int wd_cuda_error(CUresult r, const char *what, wd_error *err);

#endif
