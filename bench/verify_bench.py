#!/usr/bin/env python3
"""Integrity on the GPU machine: how fast the checksums of a load are
checked, side by side in one run, on the gpt-oss-shaped checkpoint that
load_bench.py writes (warm page cache):

  - verify --quick: every copy on the GPU hashed against the load's checksums
    (device-to-host reads, the files untouched);
  - verify: the files re-read and compared byte for byte;
  - attach --verify: a fresh worker maps the model and hashes it (and
    compares it with the files) on its side.

The cost of computing the checksums while loading is load_bench.py's, with
--variant checksums= --variant "nochecksums=--checksums off".

Usage: bench/verify_bench.py --build build --work /tmp/wdbench --out DIR [--layers 12] [--runs 3]
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from load_bench import Daemon, common_args, gpt_oss_checkpoint, gpu_name, parallel_read, summary  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    common_args(ap)
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    ckpt, shards = gpt_oss_checkpoint(a.build, a.work, a.layers)
    parallel_read(os.path.join(a.build, "pipebw"), shards)  # warm
    d = Daemon(a.build, a.work, [])
    res = {"gpu": gpu_name(), "date": time.strftime("%Y-%m-%d"), "checkpoint": ckpt}
    try:
        loaded = d.run("load", ckpt, "--name", "m")
        res["bytes"] = loaded["device_bytes"]
        quick, full, worker = [], [], []
        for _ in range(a.runs):
            r = d.run("verify", "m", "--quick")
            assert r["match"], r
            quick.append(r["bytes"] / r["seconds"] / 1e9)
            r = d.run("verify", "m")
            assert r["match"], r
            full.append(r["bytes"] / r["seconds"] / 1e9)
            r = d.run("attach", "m", "--verify")
            assert r["match"] and r["checksums_checked"] == r["tensors"], r
            worker.append(res["bytes"] / r["verify_seconds"] / 1e9)
        res["verify_quick"] = summary(quick)
        res["verify_files"] = summary(full)
        res["attach_verify"] = summary(worker)
    finally:
        d.stop()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "verify.json"), "w") as f:
        json.dump(res, f, indent=1)

    def cell(x):
        return "%.2f (%.2f-%.2f)" % (x["median"], x["min"], x["max"])

    lines = ["| what | GB/s, median (min-max) of %d |" % a.runs, "| --- | --- |",
             "| verify --quick (every copy on the GPU hashed against the load's checksums) | %s |"
             % cell(res["verify_quick"]),
             "| verify (the files re-read and compared, warm page cache) | %s |" % cell(res["verify_files"]),
             "| attach --verify (a worker hashes its mapping and compares it with the files) | %s |"
             % cell(res["attach_verify"])]
    with open(os.path.join(a.out, "verify.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
