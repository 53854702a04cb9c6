/* A worker for the GPU sleep test, in C over libweightd-client: it attaches
 * a model on the cuda backend, captures a CUDA graph that reads one of the
 * attached tensors (a device-to-device copy of its bytes into a buffer of
 * its own), replays it, and keeps the result. Then, on stdin:
 *   poll      wdc_poll, and print the attachment's state and the tensor's address
 *   replay    replay the graph and say whether it gives what it gave first
 *   quit      detach
 * Each answer is one JSON line. Usage: graph_worker SOCKET MODEL TENSOR */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/weightd-client.h"
#include "common/cuda_driver.h"

static const wd_cuda *cu;

static int check(CUresult r, const char *what)
{
    if (r == CUDA_SUCCESS)
        return 0;
    fprintf(stderr, "graph_worker: %s failed (%d)\n", what, (int)r);
    exit(1);
}

int main(int argc, char **argv)
{
    wdc_client *c = wdc_new();
    wdc_attachment *a;
    const wdc_tensor *t;
    wd_error err = {0};
    CUdevice dev;
    CUcontext ctx;
    CUstream stream;
    CUgraph graph;
    CUgraphExec exec;
    CUdeviceptr out;
    unsigned char *first, *now;
    char line[64];
    size_t n;

    if (argc != 4) {
        fprintf(stderr, "usage: graph_worker SOCKET MODEL TENSOR\n");
        return 2;
    }
    if (wdc_connect(c, argv[1], 10000) || wdc_attach(c, argv[2], "0", 0, 30000, &a)) {
        fprintf(stderr, "graph_worker: %s\n", wdc_error_message(c));
        return 1;
    }
    if (!(t = wdc_attachment_find(a, argv[3])) || t->n_parts != 1) {
        fprintf(stderr, "graph_worker: no tensor %s in one part\n", argv[3]);
        return 1;
    }
    if (wd_cuda_load(&cu, &err)) {
        fprintf(stderr, "graph_worker: %s\n", err.msg);
        return 1;
    }
    n = t->parts[0].bytes;
    check(cu->cuDeviceGet(&dev, t->parts[0].cuda_device), "cuDeviceGet");
    check(cu->cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
    check(cu->cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
    check(cu->cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
    check(cu->cuMemAlloc(&out, n), "cuMemAlloc");
    /* The graph reads the tensor where it is mapped now: its address is
     * baked into the graph. */
    check(cu->cuStreamBeginCapture(stream, CU_STREAM_CAPTURE_MODE_GLOBAL), "cuStreamBeginCapture");
    check(cu->cuMemcpyDtoDAsync(out, (CUdeviceptr)(uintptr_t)t->parts[0].ptr, n, stream), "cuMemcpyDtoDAsync");
    check(cu->cuStreamEndCapture(stream, &graph), "cuStreamEndCapture");
    check(cu->cuGraphInstantiateWithFlags(&exec, graph, 0), "cuGraphInstantiate");
    first = malloc(n);
    now = malloc(n);
    check(cu->cuGraphLaunch(exec, stream), "cuGraphLaunch");
    check(cu->cuStreamSynchronize(stream), "cuStreamSynchronize");
    check(cu->cuMemcpyDtoH(first, out, n), "cuMemcpyDtoH");
    printf("{\"ready\": true, \"ptr\": %llu, \"bytes\": %zu}\n", (unsigned long long)(uintptr_t)t->parts[0].ptr, n);
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "poll", 4) == 0) {
            int rc = wdc_poll(c, 0);
            printf("{\"poll\": %d, \"state\": %d, \"ptr\": %llu}\n", rc, wdc_attachment_state(a),
                   (unsigned long long)(uintptr_t)t->parts[0].ptr);
        } else if (strncmp(line, "replay", 6) == 0) {
            /* Cleared first: what the replay copies is read now. */
            check(cu->cuMemsetD8(out, 0, n), "cuMemsetD8");
            check(cu->cuGraphLaunch(exec, stream), "cuGraphLaunch");
            check(cu->cuStreamSynchronize(stream), "cuStreamSynchronize");
            check(cu->cuMemcpyDtoH(now, out, n), "cuMemcpyDtoH");
            printf("{\"same\": %s}\n", memcmp(first, now, n) == 0 ? "true" : "false");
        } else if (strncmp(line, "quit", 4) == 0) {
            break;
        }
        fflush(stdout);
    }
    cu->cuGraphExecDestroy(exec);
    cu->cuGraphDestroy(graph);
    cu->cuMemFree(out);
    wdc_detach(c, a, 10000);
    wdc_close(c);
    free(first);
    free(now);
    printf("{\"closed\": true}\n");
    return 0;
}
