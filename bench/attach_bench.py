#!/usr/bin/env python3
"""Attach benchmark, on the GPU machine, all in one call and side by side.

A gpt-oss-120b-shaped checkpoint with all 36 layers (687 tensors; fewer
experts per layer than the real one's 128, to fit the disk), loaded by
weightd on the cuda backend. Then, each in a fresh worker process that has
imported torch and made its CUDA context first (both timed apart):
  - attach: from Client.attach() until every tensor is a torch tensor on
    cuda:0 (att.state_dict() returned), with the client library's own
    split (receive the stream, import the descriptors, map);
  - the same worker loading the checkpoint itself from the warm page cache
    with safetensors.torch.load_file(shard, device="cuda");
and, in the same run, `weightctl load` from the warm page cache, and 8
workers attaching at once. RUNS fresh workers; medians with min and max.
Writes OUT/attach.json and OUT/attach.md and prints the table.

Usage: bench/attach_bench.py --build build --work /tmp/wdattach --out DIR [--experts 32] [--runs 5] [--at-once 8]
       (--backend host --layers N: the same run without a GPU, for trying the script; its figures mean nothing)
"""
import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "client", "python"))
sys.path.insert(0, HERE)
from load_bench import Daemon  # noqa: E402


# ---- the worker (a fresh process each) ------------------------------------------

def worker(sock, name, shards, wait_for_go, gpu):
    t_start = time.perf_counter()
    import torch
    t_torch = time.perf_counter()
    if gpu:
        torch.zeros(1, device="cuda:0")  # the CUDA context, made now and timed apart
        torch.cuda.synchronize()
    t_ctx = time.perf_counter()
    import weightd
    client = weightd.Client(sock)
    if wait_for_go:
        print("READY", flush=True)
        sys.stdin.readline()
    t0 = time.perf_counter()
    att = client.attach(name, device=0, framework="torch")
    sd = att.state_dict()
    t1 = time.perf_counter()
    done_at = time.monotonic()  # one clock for every process: when all were attached
    # usable: every one a CUDA tensor, and a kernel reads each (not timed)
    assert all(isinstance(t, torch.Tensor) and t.device.type == ("cuda" if gpu else "cpu") for t in sd.values())
    checksum = int(sum(int(t.reshape(-1)[:64].view(torch.uint8).sum()) for t in sd.values() if t.numel()))
    info = att.info
    att.close()
    res = {"import_torch": t_torch - t_start, "cuda_context": t_ctx - t_torch, "attach": t1 - t0,
           "client": info["client"], "daemon": info["daemon_seconds"],
           "connect": att.timings["attach"] - att.timings["library"], "wrap": att.timings["wrap"],
           "done_at": done_at, "tensors": len(sd),
           "handles": info["handles"], "descriptors": info["descriptors"], "bytes": info["bytes"],
           "checksum": checksum}
    if shards and gpu:
        from safetensors.torch import load_file
        t2 = time.perf_counter()
        loaded = [load_file(s, device="cuda:0") for s in shards]
        torch.cuda.synchronize()
        res["safetensors"] = time.perf_counter() - t2
        res["safetensors_bytes"] = sum(t.numel() * t.element_size() for part in loaded for t in part.values())
        del loaded
    print(json.dumps(res), flush=True)
    if wait_for_go:
        sys.stdin.readline()


# ---- the driver -------------------------------------------------------------------

def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def ms(s):
    return "%.1f ms (%.1f-%.1f)" % (1e3 * s["median"], 1e3 * s["min"], 1e3 * s["max"])


def start_daemon(build, work, backend):
    """load_bench's daemon wrapper (run a weightctl command as JSON, stop),
    on the cuda backend or, for trying the script, on host."""
    extra = ["--backend", "host", "--host-capacity", "64GiB"] if backend == "host" else []
    return Daemon(build, work, extra)


def worker_env(build):
    env = dict(os.environ, WEIGHTD_CLIENT_LIB=os.path.join(build, "libweightd-client.so.0"), PYTHONUNBUFFERED="1")
    return env


def one_worker(build, sock, name, shards, gpu):
    out = subprocess.run([sys.executable, __file__, "worker", sock, name] + ([] if gpu else ["--host"]) + shards,
                         capture_output=True, text=True, env=worker_env(build), timeout=600)
    if out.returncode:
        raise RuntimeError("worker failed:\n%s" % out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def workers_at_once(build, sock, name, n, gpu):
    procs = [subprocess.Popen([sys.executable, __file__, "worker", sock, name, "--go"] + ([] if gpu else ["--host"]),
                              stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker_env(build))
             for _ in range(n)]
    for p in procs:
        line = p.stdout.readline()
        if line.strip() != "READY":
            raise RuntimeError("worker did not get ready: %r %s" % (line, p.stderr.read()))
    t0 = time.monotonic()
    for p in procs:  # all at once
        p.stdin.write("GO\n")
        p.stdin.flush()
    results = [json.loads(p.stdout.readline()) for p in procs]
    wall = max(r["done_at"] for r in results) - t0
    for p in procs:
        p.stdin.write("EXIT\n")
        p.stdin.flush()
        p.wait(timeout=120)
    return results, wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--work", default="/tmp/wdattach")
    ap.add_argument("--out", default="build/bench")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--at-once", type=int, default=8)
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--backend", default="cuda")
    a = ap.parse_args()
    gpu = a.backend != "host"
    build, work = os.path.abspath(a.build), os.path.abspath(a.work)
    os.makedirs(work, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    ckpt = os.path.join(work, "gpt-oss-%dx%d" % (a.layers, a.experts))
    if not os.path.exists(os.path.join(ckpt, "model.safetensors.index.json")):
        subprocess.run([os.path.join(build, "weightd-mkckpt"), "--preset", "gpt-oss-120b", "--layers", str(a.layers),
                        "--experts", str(a.experts), "--out", ckpt, "--quiet"], check=True)
    shards = sorted(glob.glob(os.path.join(ckpt, "*.safetensors")))
    for s in shards:  # the page cache warm for everything that follows
        with open(s, "rb") as f:
            while f.read(64 << 20):
                pass
    gpu_name = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader", "-i", "0"],
                              capture_output=True, text=True).stdout.strip() if gpu else "none (host backend)"
    d = start_daemon(build, work, a.backend)
    try:
        loads = []
        for i in range(3):
            if i:
                d.run("unload", "gpt")
            res = d.run("load", ckpt, "--name", "gpt")
            loads.append(res["seconds"])
        model_bytes = res["bytes"]
        runs = [one_worker(build, d.sock, "gpt", shards, gpu) for _ in range(a.runs)]
        together, wall = workers_at_once(build, d.sock, "gpt", a.at_once, gpu)
        leases_after = d.run("leases")["leases"]
        info = d.run("info", "gpt")
    finally:
        d.stop()
    assert all(r["tensors"] == info["tensors"] for r in runs + together), "every tensor attached"
    assert len({r["checksum"] for r in runs + together}) == 1, "every worker read the same bytes"
    result = {
        "date": time.strftime("%Y-%m-%d"), "gpu": gpu_name, "backend": a.backend, "checkpoint": {"path": ckpt, "tensors": info["tensors"],
                                                                      "bytes": model_bytes, "shards": len(shards),
                                                                      "experts": a.experts},
        "slabs": len(info["slab_list"]),
        "handles": runs[0]["handles"], "descriptors": runs[0]["descriptors"],
        "weightctl_load_warm": summary(loads),
        "attach": summary([r["attach"] for r in runs]),
        "attach_connect": summary([r["connect"] for r in runs]),
        "attach_daemon": summary([r["daemon"] for r in runs]),
        "attach_setup": summary([r["client"]["setup_seconds"] for r in runs]),
        "attach_receive": summary([r["client"]["receive_seconds"] for r in runs]),
        "attach_wait": summary([r["client"]["wait_seconds"] for r in runs]),
        "attach_read": summary([r["client"]["read_seconds"] for r in runs]),
        "attach_table": summary([r["client"]["table_seconds"] for r in runs]),
        "attach_import": summary([r["client"]["import_seconds"] for r in runs]),
        "attach_map": summary([r["client"]["map_seconds"] for r in runs]),
        "attach_wrap": summary([r["wrap"] for r in runs]),
        "import_torch": summary([r["import_torch"] for r in runs]),
        "cuda_context": summary([r["cuda_context"] for r in runs]),
        "safetensors_warm": summary([r.get("safetensors", 0) for r in runs]),
        "at_once": {"workers": a.at_once, "attach": summary([r["attach"] for r in together]), "wall": wall},
        "leases_after": len(leases_after),
        "runs": runs, "together": together,
    }
    with open(os.path.join(a.out, "attach.json"), "w") as f:
        json.dump(result, f, indent=1)
    gb = model_bytes / 1e9
    lines = [
        "# Attach: %s, %d tensors, %.2f GB in %d shards (%s)" % (os.path.basename(ckpt), info["tensors"], gb,
                                                                 len(shards), result["date"]),
        "",
        "GPU: %s. Handles per model on the device: %d (%d descriptors, one slab each). "
        "Medians (min-max) of %d fresh worker processes." % (gpu_name, result["handles"], result["descriptors"],
                                                             a.runs),
        "",
        "| | time | rate |",
        "| --- | ---: | ---: |",
        "| `Client.attach()` until every tensor is a CUDA torch tensor | %s | %.0f GB/s |" % (
            ms(result["attach"]), gb / result["attach"]["median"]),
        "| - a connection of its own (connect, hello) | %s | |" % ms(result["attach_connect"]),
        "| - the stream: request to reply, importing on the way | %s | |" % ms(result["attach_receive"]),
        "| -- of which reading and parsing the messages (cJSON) | %s | |" % ms(result["attach_read"]),
        "| --- of which waiting for the socket (`poll`) | %s | |" % ms(result["attach_wait"]),
        "| -- of which taking in the handles and tensors | %s | |" % ms(result["attach_table"]),
        "| -- of which the daemon answering (its own clock) | %s | |" % ms(result["attach_daemon"]),
        "| -- of which the CUDA driver and context here (`cuInit`, retain) | %s | |" % ms(result["attach_setup"]),
        "| -- of which importing (`cuMemImportFromShareableHandle`) | %s | |" % ms(result["attach_import"]),
        "| - mapping (`cuMemAddressReserve`, `cuMemMap`, `cuMemSetAccess`) | %s | |" % ms(result["attach_map"]),
        "| - wrapping as torch tensors (Python) | %s | |" % ms(result["attach_wrap"]),
        "| %d workers attaching at once, each | %s | |" % (a.at_once, ms(result["at_once"]["attach"])),
        "| %d workers attaching at once, until the last has every tensor | %.1f ms | |" % (a.at_once, 1e3 * wall),
        "| `safetensors.torch.load_file(device=\"cuda\")`, warm page cache, same worker | %s | %.1f GB/s |" % (
            ms(result["safetensors_warm"]), gb / max(result["safetensors_warm"]["median"], 1e-9)),
        "| `weightctl load`, warm page cache (3 runs) | %s | %.1f GB/s |" % (
            ms(result["weightctl_load_warm"]), gb / result["weightctl_load_warm"]["median"]),
        "| before attach, apart: `import torch` | %s | |" % ms(result["import_torch"]),
        "| before attach, apart: the CUDA context | %s | |" % ms(result["cuda_context"]),
        "",
        "attach against safetensors: %.0fx faster; against a warm weightctl load: %.0fx." % (
            result["safetensors_warm"]["median"] / result["attach"]["median"],
            result["weightctl_load_warm"]["median"] / result["attach"]["median"]),
    ]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, "attach.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        flags = [x for x in sys.argv[2:] if x.startswith("--")]
        rest = [x for x in sys.argv[2:] if not x.startswith("--")]
        worker(rest[0], rest[1], rest[2:], "--go" in flags, "--host" not in flags)
    else:
        main()
