"""A torch worker for the GPU sleep test: it attaches a model through the
Python client, captures a CUDA graph that computes over one attached tensor,
replays it, and keeps the result. Then, on stdin:

    status    the attachment's state and the tensor's data_ptr()
    replay    replay the graph: whether it gives what it gave first
    quit      close the attachment

Each answer is one JSON line. Usage: sleep_worker.py SOCKET MODEL TENSOR"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "client", "python"))
import weightd  # noqa: E402


def main(sock, model, name):
    att = weightd.Client(sock).attach(model, device=0, framework="torch")
    w = att[name]
    stream = torch.cuda.Stream()
    # Integer arithmetic on the raw bits: the checkpoint's bytes are random,
    # and as bf16 many are NaN (which equals nothing, not even itself).
    out = torch.zeros(w.shape[-1], dtype=torch.int64, device=w.device)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        # kernels that read every byte of the tensor where it is mapped now
        out.copy_((w.view(torch.int16).to(torch.int64) * 3 + 1).sum(dim=0))
    graph.replay()
    torch.cuda.synchronize()
    first = out.clone()
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    deterministic = bool(torch.equal(out, first))
    raw = int(w.view(torch.int16).sum(dtype=torch.int64))
    print(json.dumps({"ready": True, "ptr": w.data_ptr(), "dtype": str(w.dtype), "shape": list(w.shape),
                      "deterministic": deterministic, "raw": raw}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "status":
            print(json.dumps({"asleep": att.asleep, "wake_error": att.wake_error, "ptr": w.data_ptr()}), flush=True)
        elif cmd == "replay":
            out.zero_()
            graph.replay()
            torch.cuda.synchronize()
            print(json.dumps({"same": bool(torch.equal(out, first)), "ptr": w.data_ptr(),
                              "raw": int(w.view(torch.int16).sum(dtype=torch.int64))}), flush=True)
        elif cmd == "quit":
            break
    del graph, w
    att.close()
    print(json.dumps({"closed": True}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
