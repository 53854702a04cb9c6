/* vmmcost: what the CUDA driver's virtual-memory calls cost on this machine,
 * for N pages of 2 MiB mapped one by one against one allocation of the same
 * size, so that weightd's page mapping can be sized from figures. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "bench/bench_cuda.h"

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}


int main(int argc, char **argv)
{
    const wd_cuda *cu;
    int n = argc > 1 ? atoi(argv[1]) : 1024;
    size_t page = 2u << 20;
    CUcontext ctx;
    CUdeviceptr va;
    CUmemAllocationProp prop = {0};
    CUmemAccessDesc acc = {0};
    CUmemGenericAllocationHandle *h = calloc((size_t)n, sizeof *h);
    int *fd = calloc((size_t)n, sizeof *fd);
    double t0, t1, t2, t3, t4, t5;

    cu = bench_cuda_init(&ctx);
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    acc.location = prop.location;
    acc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    CHECK(cu->cuMemAddressReserve(&va, page * (size_t)n, page, 0, 0));
    t0 = now();
    for (int i = 0; i < n; i++)
        CHECK(cu->cuMemCreate(&h[i], page, &prop, 0));
    t1 = now();
    for (int i = 0; i < n; i++)
        CHECK(cu->cuMemMap(va + (size_t)i * page, page, 0, h[i], 0));
    t2 = now();
    CHECK(cu->cuMemSetAccess(va, page * (size_t)n, &acc, 1));
    t3 = now();
    for (int i = 0; i < n; i++)
        CHECK(cu->cuMemExportToShareableHandle(&fd[i], h[i], CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0));
    t4 = now();
    for (int i = 0; i < n; i++) {
        cu->cuMemUnmap(va + (size_t)i * page, page);
        cu->cuMemRelease(h[i]);
        close(fd[i]);
    }
    t5 = now();
    printf("%d pages of 2 MiB: create %.1f us, map %.1f us, set access (one call) %.1f us in all, export %.1f us, "
           "unmap+release %.1f us a page\n",
           n, (t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6, (t3 - t2) * 1e6, (t4 - t3) / n * 1e6, (t5 - t4) / n * 1e6);
    /* The same bytes as one allocation. */
    t0 = now();
    CHECK(cu->cuMemCreate(&h[0], page * (size_t)n, &prop, 0));
    CHECK(cu->cuMemMap(va, page * (size_t)n, 0, h[0], 0));
    CHECK(cu->cuMemSetAccess(va, page * (size_t)n, &acc, 1));
    CHECK(cu->cuMemExportToShareableHandle(&fd[0], h[0], CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0));
    t1 = now();
    cu->cuMemUnmap(va, page * (size_t)n);
    cu->cuMemRelease(h[0]);
    close(fd[0]);
    t2 = now();
    printf("one allocation of %d MiB: create+map+access+export %.1f us, unmap+release %.1f us\n", n * 2,
           (t1 - t0) * 1e6, (t2 - t1) * 1e6);
    return 0;
}
