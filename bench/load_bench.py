#!/usr/bin/env python3
"""Load benchmark, on the GPU machine, all in one call and side by side.

On a gpt-oss-120b-shaped checkpoint written by weightd-mkckpt:
  - the machine's limits, measured now on the same files: a parallel read
    of the shards (`pipebw -m read`: 16 threads of preads, in 16 MiB pieces
    and in 2 MiB pieces, whose buffers stay in the CPU's cache) and a pinned
    host-to-device copy (16 MiB pieces on 16 streams, 64 MiB on 4); each
    limit is the faster of its two ways;
  - safetensors.torch.load_file(shard, device="cuda") over every shard;
  - weightd (cuda backend): `weightctl --json load`, the daemon's own time.
Each cold (page cache dropped before the run) and warm, RUNS times; medians
with min and max. Writes OUT/load.json and OUT/load.md and prints the table.

Usage: bench/load_bench.py --build build --work /tmp/wdbench --out DIR [--layers 12] [--runs 3]
"""
import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time


# The limits, each measured two ways; each is the faster way's median.
READS = ((16, "read16m"), (2, "read2m"))           # piece MiB, result key
COPIES = ((16, 16, "copy16m"), (64, 4, "copy64m"))  # piece MiB, streams, result key


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def parallel_read(pipebw, shards, piece_mib=16):
    """GB/s of 16 threads reading the shards in pieces, bytes thrown away."""
    out = subprocess.run([pipebw, "-m", "read", "-t", "16", "-s", str(piece_mib << 10)] + shards, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)["gbps"]


def prepare(cold, shards, pipebw):
    """A cold run starts with the page cache dropped, a warm one with the
    shards read into it."""
    if cold:
        drop_caches()
    else:
        parallel_read(pipebw, shards)


def gpu_name():
    return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"], check=True,
                          capture_output=True, text=True).stdout.strip()


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def read_limit(pipebw, shards, cold, piece_mib):
    prepare(cold, shards, pipebw)
    return parallel_read(pipebw, shards, piece_mib)


def copy_limit(torch, piece_mib, n_streams, to_device=True):
    """GB/s of copies between pinned host memory and the GPU (to_device:
    host to device; else device to host), piece_mib at a time on n_streams."""
    size, piece = 1 << 30, piece_mib << 20
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(size, dtype=torch.uint8, device="cuda")
    src, dst = (host, gpu) if to_device else (gpu, host)
    streams = [torch.cuda.Stream() for _ in range(n_streams)]

    def once():
        for i in range(size // piece):
            with torch.cuda.stream(streams[i % n_streams]):
                dst[i * piece:(i + 1) * piece].copy_(src[i * piece:(i + 1) * piece], non_blocking=True)
        torch.cuda.synchronize()

    once()
    t0 = time.perf_counter()
    for _ in range(4):
        once()
    secs = time.perf_counter() - t0
    del src, dst, host, gpu
    torch.cuda.empty_cache()
    return 4 * size / secs / 1e9


def safetensors_load(torch, shards, total, cold, pipebw):
    from safetensors.torch import load_file
    prepare(cold, shards, pipebw)
    t0 = time.perf_counter()
    loaded = [load_file(s, device="cuda") for s in shards]
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    del loaded
    torch.cuda.empty_cache()
    return total / secs / 1e9


class Daemon:
    def __init__(self, build, work, extra):
        self.sock = os.path.join(work, "weightd.sock")
        self.log = open(os.path.join(work, "weightd.log"), "a")
        self.ctl = os.path.join(build, "weightctl")
        self.phases = []  # each load's phases (open, allocate, read), in seconds
        self.p = subprocess.Popen([os.path.join(build, "weightd"), "--backend", "cuda", "--socket", self.sock] + extra,
                                  stderr=self.log)
        for _ in range(300):
            if os.path.exists(self.sock):
                return
            time.sleep(0.05)
        raise RuntimeError("weightd did not start; see weightd.log")

    def run(self, *args):
        r = subprocess.run([self.ctl, "--socket", self.sock, "--json", "--timeout", "600"] + list(args),
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError("weightctl %s: %s %s" % (args, r.stdout, r.stderr))
        return json.loads(r.stdout)

    def load(self, path, total, cold, shards, pipebw):
        prepare(cold, shards, pipebw)
        res = self.run("load", path, "--name", "bench")
        assert res["bytes"] == total, res
        self.phases.append(res["phases"])
        self.run("unload", "bench")
        return total / res["seconds"] / 1e9

    def stop(self):
        subprocess.run([self.ctl, "--socket", self.sock, "shutdown"], capture_output=True)
        self.p.wait(timeout=60)
        self.log.close()


def common_args(ap):
    """The arguments every GPU benchmark here takes."""
    ap.add_argument("--build", default="build")
    ap.add_argument("--work", default="/tmp/wdbench")
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--runs", type=int, default=3)


def gpt_oss_checkpoint(build, work, layers):
    """The gpt-oss-120b-shaped checkpoint of `layers` layers in work (written
    by weightd-mkckpt on first use): its path and its shards."""
    ckpt = os.path.join(work, "gpt-oss-120b-%dl" % layers)
    if not os.path.exists(os.path.join(ckpt, "model.safetensors.index.json")):
        subprocess.run([os.path.join(build, "weightd-mkckpt"), "--preset", "gpt-oss-120b", "--layers", str(layers),
                        "--quiet", "--out", ckpt], check=True)
    return ckpt, sorted(glob.glob(os.path.join(ckpt, "*.safetensors")))


def main():
    ap = argparse.ArgumentParser()
    common_args(ap)
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=FLAGS: a weightd configuration to measure (repeatable; default: weightd's defaults)")
    ap.add_argument("--warm-only", action="store_true", help="only warm runs (quick)")
    ap.add_argument("--cold-only", action="store_true", help="only cold runs")
    ap.add_argument("--no-torch", action="store_true", help="weightd and the read limit only")
    a = ap.parse_args()
    torch = None
    if not a.no_torch:
        import torch

    os.makedirs(a.work, exist_ok=True)
    ckpt, shards = gpt_oss_checkpoint(a.build, a.work, a.layers)
    total = int(json.loads(subprocess.run([os.path.join(a.build, "weightctl"), "--json", "inspect", ckpt],
                                          check=True, capture_output=True, text=True).stdout)["bytes"])
    pipebw = os.path.join(a.build, "pipebw")
    print("checkpoint: %s, %d shards, %.2f GB of tensors" % (ckpt, len(shards), total / 1e9), flush=True)

    res = {"checkpoint": {"path": ckpt, "shards": len(shards), "bytes": total, "layers": a.layers},
           "gpu": torch.cuda.get_device_name(0) if torch else gpu_name(),
           "torch": torch.__version__ if torch else "not used", "date": time.strftime("%Y-%m-%d")}
    variants = [v.split("=", 1) for v in a.variant] or [["weightd", ""]]
    temps = ("warm",) if a.warm_only else ("cold",) if a.cold_only else ("cold", "warm")
    for temp in temps:
        cold = temp == "cold"
        for piece, key in READS:
            res[key + "_" + temp] = summary([read_limit(pipebw, shards, cold, piece) for _ in range(a.runs)])
        res["read_" + temp] = max((res[key + "_" + temp] for _, key in READS), key=lambda x: x["median"])
        for name, flags in variants:
            d = Daemon(a.build, a.work, flags.split())
            try:
                res[name + "_" + temp] = summary([d.load(ckpt, total, cold, shards, pipebw) for _ in range(a.runs)])
                res[name + "_" + temp]["phases"] = d.phases
            finally:
                d.stop()
        if not a.no_torch:
            res["safetensors_" + temp] = summary([safetensors_load(torch, shards, total, cold, pipebw)
                                                  for _ in range(a.runs)])
        print(temp, {k: round(v["median"], 2) for k, v in res.items() if k.endswith(temp)}, flush=True)
    if not a.no_torch:
        for piece, n_streams, key in COPIES:
            res[key] = summary([copy_limit(torch, piece, n_streams) for _ in range(a.runs)])
        res["copy"] = max((res[key] for _, _, key in COPIES), key=lambda x: x["median"])
    res["weightd_log"] = open(os.path.join(a.work, "weightd.log")).read()[-4000:]


    def cell(x):
        return "%.2f (%.2f-%.2f)" % (x["median"], x["min"], x["max"]) if x else "-"

    rows = [("parallel read of the shards (16 threads, %d MiB pieces)" % piece, key) for piece, key in READS]
    if "copy" in res:
        rows += [("pinned host-to-device copy (%d MiB pieces, %d streams)" % (piece, n), key)
                 for piece, n, key in COPIES]
    if not a.no_torch:
        rows.append(("safetensors.torch.load_file(device=\"cuda\")", "safetensors"))
    rows += [("weightd %s" % (flags or "(defaults)"), name) for name, flags in variants]
    lines = ["Load benchmark, %s, %s, PyTorch %s: %s, %d shards, %.2f GB of tensors; GB/s, median (min-max) of %d" %
             (res["date"], res["gpu"], res["torch"], os.path.basename(ckpt), len(shards), total / 1e9, a.runs), "",
             "| | cold | warm |", "| --- | ---: | ---: |"]
    for label, key in rows:
        c = res[key] if key.startswith("copy") else res.get(key + "_cold")
        w = res[key] if key.startswith("copy") else res.get(key + "_warm")
        lines.append("| %s | %s | %s |" % (label, cell(c), cell(w)))
    lines.append("")
    for name, _ in variants:
        if "copy" in res and name + "_warm" in res:
            limit = min(res["read_warm"]["median"], res["copy"]["median"])
            lines.append("%s warm / lower of the read (%.2f) and copy (%.2f) limits: %.1f%% (goal 90%%)" %
                         (name, res["read_warm"]["median"], res["copy"]["median"],
                          100 * res[name + "_warm"]["median"] / limit))
        if name + "_cold" in res:
            lines.append("%s cold / read limit: %.1f%% (goal 95%%)" %
                         (name, 100 * res[name + "_cold"]["median"] / res["read_cold"]["median"]))
        for temp in temps:
            if "safetensors_" + temp in res:
                lines.append("%s / safetensors, %s: %.2fx" % (name, temp, res[name + "_" + temp]["median"] /
                                                               res["safetensors_" + temp]["median"]))
    text = "\n".join(lines) + "\n"
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "load.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out, "load.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
