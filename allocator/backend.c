/* Backends by name. */
#include "allocator/backend.h"

#include <stdbool.h>
#include <string.h>

const char *wa_backend_names(void)
{
#ifdef WD_WITH_CUDA
    return "host fake cuda cuda-ipc";
#else
    return "host fake";
#endif
}

int wa_backend_create(const wa_backend_opts *opts, wa_backend **out, wd_error *err)
{
    bool emulated = strcmp(opts->name, "host") == 0 || strcmp(opts->name, "fake") == 0;

    if (emulated && (opts->n_devices < 1 || opts->n_devices > 64))
        return wd_error_set(err, -EINVAL, "the %s backend needs 1 to 64 devices, not %d", opts->name,
                            opts->n_devices);
    if (strcmp(opts->name, "host") == 0)
        return wa_backend_host_create(opts->n_devices, opts->capacity, out, err);
    if (strcmp(opts->name, "fake") == 0)
        return wa_backend_fake_create(opts->n_devices, opts->capacity, out, err);
#ifdef WD_WITH_CUDA
    if (strcmp(opts->name, "cuda") == 0)
        return wa_backend_cuda_create(opts, out, err);
    if (strcmp(opts->name, "cuda-ipc") == 0)
        return wa_backend_cuda_ipc_create(opts, out, err);
#else
    if (strcmp(opts->name, "cuda") == 0 || strcmp(opts->name, "cuda-ipc") == 0)
        return wd_error_set(err, -ENOTSUP, "backend \"%s\" is not built into this weightd (built: %s; build "
                            "where the CUDA toolkit is found)", opts->name, wa_backend_names());
#endif
    return wd_error_set(err, -EINVAL, "unknown backend \"%s\" (built: %s)", opts->name, wa_backend_names());
}
