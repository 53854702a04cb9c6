/* Loading the CUDA driver at run time. */
#include "common/cuda_driver.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

static wd_cuda driver;
static int driver_rc = 1; /* 1: not tried yet */
static char driver_msg[512];
static pthread_mutex_t driver_lock = PTHREAD_MUTEX_INITIALIZER;

typedef CUresult (*get_proc_fn)(const char *, void **, int, cuuint64_t, CUdriverProcAddressQueryResult *);

static int load(void)
{
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    get_proc_fn get_proc;
    CUresult r;

    if (!lib) {
        snprintf(driver_msg, sizeof driver_msg, "the CUDA driver (libcuda.so.1) is not installed here: %s", dlerror());
        return -ENOTSUP;
    }
    /* cuGetProcAddress gives each function in the version this code was
     * written against, whatever the driver's newest is. */
    if (!(get_proc = (get_proc_fn)dlsym(lib, "cuGetProcAddress_v2"))) {
        snprintf(driver_msg, sizeof driver_msg, "the CUDA driver is too old (no cuGetProcAddress_v2); need 12.0 or newer");
        return -ENOTSUP;
    }
#define X(f)                                                                                          \
    if (get_proc(#f, (void **)&driver.f, 12000, CU_GET_PROC_ADDRESS_DEFAULT, NULL) != CUDA_SUCCESS ||  \
        !driver.f) {                                                                                  \
        snprintf(driver_msg, sizeof driver_msg, "the CUDA driver lacks %s", #f);                      \
        return -ENOTSUP;                                                                              \
    }
    WD_CUDA_FUNCTIONS(X)
#undef X
    if ((r = driver.cuInit(0)) != CUDA_SUCCESS) {
        const char *s = NULL;
        driver.cuGetErrorString(r, &s);
        snprintf(driver_msg, sizeof driver_msg, "cuInit: %s (error %d)", s ? s : "unknown error", (int)r);
        return r == CUDA_ERROR_NO_DEVICE ? -ENODEV : -EIO;
    }
    return 0;
}

int wd_cuda_load(const wd_cuda **out, wd_error *err)
{
    int rc;

    pthread_mutex_lock(&driver_lock);
    if (driver_rc == 1)
        driver_rc = load();
    rc = driver_rc;
    pthread_mutex_unlock(&driver_lock);
    if (rc)
        return wd_error_set(err, rc, "%s", driver_msg);
    *out = &driver;
    return 0;
}

int wd_cuda_error(CUresult r, const char *what, wd_error *err)
{
    const char *s = NULL;
    int code = r == CUDA_ERROR_OUT_OF_MEMORY ? -ENOMEM
               : r == CUDA_ERROR_NO_DEVICE || r == CUDA_ERROR_INVALID_DEVICE ? -ENODEV
               : -EIO;

    if (driver.cuGetErrorString)
        driver.cuGetErrorString(r, &s);
    return wd_error_set(err, code, "%s: %s (CUDA error %d)", what, s ? s : "unknown error", (int)r);
}
