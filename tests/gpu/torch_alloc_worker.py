"""A PyTorch process on weightd's allocator (libweightd-torch.so): loads
weights under the load policy and a tag, rewrites them in place as the seed
describes, captures a CUDA graph over them, sleeps the tag (every byte back
to the GPU, cudaMemGetInfo), wakes it and replays the graph. Prints one JSON
line of figures; test_torch_allocator.py checks them.

The graph is captured with the driver's stream capture: torch.cuda.graph
asks the current allocator for a private pool (beginAllocateToPool), which
a pluggable allocator does not have; the captured work allocates nothing."""

import ctypes
import json
import sys

import torch

from weightd import torch_allocator as wta

MiB = 1 << 20


def driver():
    cu = ctypes.CDLL("libcuda.so.1")
    p = ctypes.c_void_p
    cu.cuStreamBeginCapture_v2.argtypes = [p, ctypes.c_int]
    cu.cuStreamEndCapture.argtypes = [p, ctypes.POINTER(p)]
    cu.cuGraphInstantiateWithFlags.argtypes = [ctypes.POINTER(p), p, ctypes.c_ulonglong]
    cu.cuGraphLaunch.argtypes = [p, p]
    return cu


def check(rc, what):
    if rc != 0:
        raise RuntimeError("%s: CUresult %d" % (what, rc))


def main():
    wta.install()
    torch.cuda.init()
    dev = torch.device("cuda", 0)
    before = wta.stats()["reserved_bytes.all.current"]
    g = torch.Generator(device="cpu").manual_seed(1)
    with wta.load_policy(), wta.tag("weights"):
        # Loaded, then rewritten into new tensors and the old ones freed: the
        # pattern that strands memory under PyTorch's allocator.
        layers = []
        for _ in range(4):
            w13 = torch.randint(-3, 4, (8, 1024, 2 * 1024), generator=g).float().to(dev)
            w2 = torch.randint(-3, 4, (8, 1024, 1024), generator=g).float().to(dev)
            w13 = torch.nn.functional.pad(w13, (0, 64)).contiguous()
            w2 = w2.transpose(1, 2).contiguous()
            layers.append((w13, w2))
        torch.cuda.synchronize()
    tag_bytes = wta.stats()["reserved_bytes.all.current"] - before
    weights = [t for pair in layers for t in pair]
    host_copy = [t.cpu() for t in weights]
    ptrs = [t.data_ptr() for t in weights]

    x = torch.randint(-2, 3, (64, 1024), generator=g).float().to(dev)
    y = torch.empty(64, 2 * 1024 + 64, device=dev)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.matmul(x, layers[0][0][0], out=y)  # warms cuBLAS on this stream
    torch.cuda.synchronize()
    cu = driver()
    graph, exe = ctypes.c_void_p(), ctypes.c_void_p()
    with torch.cuda.stream(s):
        check(cu.cuStreamBeginCapture_v2(ctypes.c_void_p(s.cuda_stream), 2), "cuStreamBeginCapture")  # relaxed
        torch.matmul(x, layers[0][0][0], out=y)
        check(cu.cuStreamEndCapture(ctypes.c_void_p(s.cuda_stream), ctypes.byref(graph)), "cuStreamEndCapture")
    check(cu.cuGraphInstantiateWithFlags(ctypes.byref(exe), graph, 0), "cuGraphInstantiateWithFlags")
    y.zero_()
    check(cu.cuGraphLaunch(exe, ctypes.c_void_p(s.cuda_stream)), "cuGraphLaunch")
    torch.cuda.synchronize()
    ref = y.clone()

    free_awake = torch.cuda.mem_get_info()[0]
    wta.sleep("weights")
    free_asleep = torch.cuda.mem_get_info()[0]
    wta.wake("weights")
    same_ptrs = [t.data_ptr() for t in weights] == ptrs
    same_bytes = all(torch.equal(t.cpu(), c) for t, c in zip(weights, host_copy))
    y.zero_()
    check(cu.cuGraphLaunch(exe, ctypes.c_void_p(s.cuda_stream)), "cuGraphLaunch")
    torch.cuda.synchronize()
    print(json.dumps({"tag_bytes": tag_bytes, "given_back": free_asleep - free_awake, "same_ptrs": same_ptrs,
                      "same_bytes": same_bytes, "graph_same": bool(torch.equal(y, ref)),
                      "stats": wta.stats()}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
