#!/usr/bin/env python3
"""Allocator parity and policy benchmark, side by side, in one run.

For every trace, on the GPU machine:
  - PyTorch's own caching allocator replays it (torch.empty / del, the trace's
    policy lines through torch.cuda.memory._set_allocator_settings, capacity
    through torch.cuda.set_per_process_memory_fraction): peak reserved without
    a cap, and the smallest cap in 64 MiB steps at which it completes; for the
    traces with policy lines also with expandable_segments:True.
  - weightd-replay replays it with --policy pytorch (the same semantics), and
    with --policy weightd (weightd's load policy).
The minimum capacity is searched the same way on both sides: a binary search
between the peak of live bytes and the uncapped peak reserved.

Usage: bench/parity.py --replay build/weightd-replay --out DIR TRACE...
Writes DIR/parity.json and DIR/parity.md, and prints the table.
"""
import argparse
import json
import os
import subprocess
import time

STEP = 64 << 20


def load(path):
    ops, live, peak, sizes = [], 0, 0, {}
    with open(path) as f:
        for raw in f:
            w = raw.split("#", 1)[0].split()
            if not w:
                continue
            if w[0] == "alloc":
                size = int(w[2])
                ops.append((0, w[1], size, int(w[3]) if len(w) > 3 else 0))
                sizes[w[1]] = size
                live += size
                peak = max(peak, live)
            elif w[0] == "free":
                ops.append((1, w[1]))
                live -= sizes.pop(w[1])
            elif w[0] == "policy":
                ops.append((2, " ".join(w[1:])))
    return ops, peak


class TorchReplayer:
    def __init__(self):
        import torch
        self.torch = torch
        self.total = torch.cuda.get_device_properties(0).total_memory
        self.version = torch.__version__
        self.device = torch.cuda.get_device_name(0)

    def run(self, ops, start_conf, cap):
        torch = self.torch
        mem = torch.cuda.memory
        torch.cuda.empty_cache()
        mem._set_allocator_settings(start_conf)
        # The fraction is rounded so that the allocator's limit is exactly cap.
        torch.cuda.set_per_process_memory_fraction(min(1.0, (cap + 0.5) / self.total) if cap else 1.0)
        torch.cuda.reset_peak_memory_stats()
        live, ok = {}, True
        try:
            for op in ops:
                kind = op[0]
                if kind == 0:
                    live[op[1]] = torch.empty(op[2], dtype=torch.uint8, device="cuda:%d" % op[3])
                elif kind == 1:
                    del live[op[1]]
                else:
                    mem._set_allocator_settings(start_conf if op[1] == "default" else op[1])
        except torch.OutOfMemoryError:
            ok = False
        peak = torch.cuda.max_memory_reserved()
        live.clear()
        mem._set_allocator_settings(start_conf)
        torch.cuda.empty_cache()
        return ok, peak

    def figures(self, ops, peak_live, start_conf):
        t0 = time.time()
        ok, peak = self.run(ops, start_conf, 0)
        assert ok, "uncapped replay failed"
        lo, hi = max(peak_live // STEP - 1, 0), (peak + STEP - 1) // STEP
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.run(ops, start_conf, mid * STEP)[0]:
                hi = mid
            else:
                lo = mid
        return {"peak_reserved": peak, "min_capacity": hi * STEP, "seconds": round(time.time() - t0, 1)}


def weightd(replay, path, *args):
    out = subprocess.run([replay, "--min-capacity", "--json", path] + list(args), check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def mib(x):
    return x / (1 << 20)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--replay", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-torch", action="store_true", help="weightd columns only (no GPU)")
    ap.add_argument("traces", nargs="+")
    a = ap.parse_args()
    tr = None if a.no_torch else TorchReplayer()
    rows = []
    for path in a.traces:
        name = os.path.basename(path).rsplit(".", 1)[0]
        ops, peak_live = load(path)
        has_policy = any(op[0] == 2 for op in ops)
        row = {"trace": name, "peak_live": peak_live}
        row["weightd_pytorch"] = weightd(a.replay, path, "--policy", "pytorch")
        row["weightd_policy"] = weightd(a.replay, path, "--policy", "weightd")
        if has_policy:
            row["weightd_pytorch_expandable"] = weightd(a.replay, path, "--policy", "pytorch", "--conf",
                                                        "expandable_segments:True")
        if tr:
            row["torch"] = tr.figures(ops, peak_live, "expandable_segments:False")
            if has_policy:
                row["torch_expandable"] = tr.figures(ops, peak_live, "expandable_segments:True")
        rows.append(row)
        print(json.dumps(row), flush=True)
        # After every trace, so that a run cut short still leaves its figures.
        text = write(a.out, tr, rows)
    print(text)


def write(out, tr, rows):
    os.makedirs(out, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "torch": tr.version if tr else None, "gpu": tr.device if tr else None}
    with open(os.path.join(out, "parity.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)

    lines = ["Parity: PyTorch %s on %s vs weightd-replay --policy pytorch (same trace, same semantics)" %
             (meta["torch"], meta["gpu"]), "",
             "| trace | peak live (B) | peak reserved, PyTorch | weightd | diff | min capacity, PyTorch | weightd | diff (MiB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        w = r["weightd_pytorch"]
        t = r.get("torch")
        if t:
            lines.append("| %s | %d | %d | %d | %+.3f%% | %d | %d | %+.0f |" % (
                r["trace"], r["peak_live"], t["peak_reserved"], w["peak_reserved"],
                100.0 * (w["peak_reserved"] - t["peak_reserved"]) / t["peak_reserved"], t["min_capacity"],
                w["min_capacity"], mib(w["min_capacity"] - t["min_capacity"])))
        else:
            lines.append("| %s | %d | - | %d | - | - | %d | - |" % (r["trace"], r["peak_live"], w["peak_reserved"],
                                                                   w["min_capacity"]))
    lines += ["", "Minimum capacity / peak live: PyTorch's configurations against weightd's load policy",
              "(weightd-replay --policy weightd: each policy line starts weightd's policy, `policy default` ends it)",
              "" if tr else "(no GPU: the PyTorch columns are weightd-replay --policy pytorch, which matches "
              "PyTorch exactly on the trace's own policy lines; run make bench-gpu for PyTorch itself)", "",
              "| trace | PyTorch, trace's policy | PyTorch, + expandable_segments | weightd policy | weightd vs PyTorch's best |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        live = r["peak_live"]
        pt = r.get("torch") or r["weightd_pytorch"]
        pe = r.get("torch_expandable") or r.get("weightd_pytorch_expandable")
        best = min(pt["min_capacity"], pe["min_capacity"] if pe else 1 << 62)
        wp = r["weightd_policy"]["min_capacity"]
        lines.append("| %s | %.4f | %s | %.4f | %+.0f MiB |" % (
            r["trace"], pt["min_capacity"] / live, "%.4f" % (pe["min_capacity"] / live) if pe else "-", wp / live,
            mib(wp - best)))
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "parity.md"), "w") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    main()
