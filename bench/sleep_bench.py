#!/usr/bin/env python3
"""Sleep and wake benchmark, on the GPU machine, in one run, side by side.

On a gpt-oss-120b-shaped checkpoint written by weightd-mkckpt (cuda backend,
warm page cache):
  - the pinned copy limits both ways (torch: 1 GiB of pinned memory copied
    in 16 MiB pieces on 4 streams; host to device and device to host);
  - warm loads (unload, load again);
  - RUNS times each: sleep --offload then wake (from host memory), and
    sleep --discard then wake (from the checkpoint), with the GPU's free
    memory (cuMemGetInfo, through stats) before the load, loaded, asleep and
    awake; verify --quick and verify after the last wake;
  - the same offload sleep and wake with --sleep-pin on (the host copy
    pinned: a wake copies from it without staging), in a daemon of its own;
  - the seed's scenario: a daemon capped (--device-capacity) at what the
    model reserves plus 256 MiB loads it as A, fails to load it again as B,
    sleeps A, loads B, unloads B, wakes A and verifies A.
Writes OUT/sleep.json and OUT/sleep.md and prints the table.

Usage: bench/sleep_bench.py --build build --work /tmp/wdsleep --out DIR [--layers 11] [--runs 3]
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from load_bench import Daemon, copy_limit, gpt_oss_checkpoint, gpu_name, summary  # noqa: E402


def device(d):
    return d.run("stats")["devices"][0]


def free(d):
    return device(d)["free_bytes"]


def reserved(d):
    return device(d)["reserved_bytes"]["current"]


def say(*what):
    """A figure as soon as it is measured (a run cut short still tells)."""
    print(*what, flush=True)


def sleep_and_wake(d, mode, runs, free_loaded, label=None):
    """runs times: sleep --mode, then wake; times and free memory."""
    sleeps, wakes, asleep, awake = [], [], [], []
    for _ in range(runs):
        s = d.run("sleep", "m", "--" + mode)
        sleeps.append(s["seconds"])
        asleep.append(free(d))
        assert reserved(d) == 0, "reserved bytes left after the sleep"
        w = d.run("wake", "m")
        wakes.append(w["seconds"])
        awake.append(free(d))
        say(label or mode, "sleep s:", s["seconds"], "wake s:", w["seconds"], "free asleep:", asleep[-1])
    return {"sleep": summary(sleeps), "wake": summary(wakes), "free_asleep": summary(asleep),
            "free_awake": summary(awake), "returned": min(asleep) - free_loaded}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--work", default="/tmp/wdsleep")
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=11)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    import torch
    os.makedirs(a.work, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    ckpt, shards = gpt_oss_checkpoint(a.build, a.work, a.layers)
    total = sum(os.path.getsize(s) for s in shards)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": gpu_name(), "command": " ".join(sys.argv),
           "checkpoint": {"layers": a.layers, "file_bytes": total, "shards": len(shards)}}
    torch.zeros(1, device="cuda")
    out["copy_h2d"] = summary([copy_limit(torch, 16, 4, True) for _ in range(a.runs)])
    out["copy_d2h"] = summary([copy_limit(torch, 16, 4, False) for _ in range(a.runs)])
    say("copy limits GB/s: h2d", out["copy_h2d"]["runs"], "d2h", out["copy_d2h"]["runs"])
    torch.cuda.empty_cache()

    d = Daemon(a.build, a.work, [])
    try:
        # warm: the page cache holds the checkpoint after the first load
        d.run("load", ckpt, "--name", "m")
        d.run("unload", "m")
        free0 = free(d)
        warm = []
        for i in range(a.runs):
            if i:
                d.run("unload", "m")
            res = d.run("load", ckpt, "--name", "m")
            warm.append(res["seconds"])
        out["warm_load"] = summary(warm)
        say("warm load s:", warm)
        out["model_bytes"] = res["device_bytes"]
        held = reserved(d)
        out["reserved_loaded"] = held
        out["free"] = {"before_load": free0, "loaded": free(d)}
        for mode in ("offload", "discard"):
            out[mode] = sleep_and_wake(d, mode, a.runs, out["free"]["loaded"])
        t0 = time.monotonic()
        out["verify_quick"] = {"match": d.run("verify", "m", "--quick")["match"], "seconds": time.monotonic() - t0}
        t0 = time.monotonic()
        out["verify"] = {"match": d.run("verify", "m")["match"], "seconds": time.monotonic() - t0}
        d.run("unload", "m")
        out["free"]["unloaded"] = free(d)
    finally:
        d.stop()

    # The host copy pinned (--sleep-pin on), beside the staged one above.
    work = os.path.join(a.work, "pinned")
    os.makedirs(work, exist_ok=True)
    d = Daemon(a.build, work, ["--sleep-pin", "on"])
    try:
        d.run("load", ckpt, "--name", "m")
        out["offload_pinned"] = sleep_and_wake(d, "offload", a.runs, free(d), "offload, pinned")
        out["offload_pinned"]["verify_quick"] = d.run("verify", "m", "--quick")["match"]
        d.run("unload", "m")
    finally:
        d.stop()
    with open(os.path.join(work, "weightd.log")) as f:
        log = f.read()
    out["offload_pinned"]["pinned"] = log.count("m: its host copy pinned") >= a.runs  # (the log is appended to)

    # The seed's scenario on a capped GPU.
    cap = held + (256 << 20)
    work = os.path.join(a.work, "capped")
    os.makedirs(work, exist_ok=True)
    d = Daemon(a.build, work, ["--device-capacity", str(cap)])
    seed = {"capacity": cap}
    try:
        d.run("load", ckpt, "--name", "a")
        r = subprocess.run([d.ctl, "--socket", d.sock, "--json", "load", ckpt, "--name", "b"], capture_output=True,
                           text=True)
        seed["b_while_a_awake"] = json.loads(r.stdout)["error"]["code"] if r.returncode else "loaded"
        seed["sleep_a"] = d.run("sleep", "a")["seconds"]
        seed["b_while_a_asleep"] = d.run("load", ckpt, "--name", "b")["seconds"]
        d.run("unload", "b")
        seed["wake_a"] = d.run("wake", "a")["seconds"]
        seed["verify_a"] = d.run("verify", "a")["match"]
    finally:
        d.stop()
    out["seed"] = seed

    with open(os.path.join(a.out, "sleep.json"), "w") as f:
        json.dump(out, f, indent=1)
    gb = out["model_bytes"] / 1e9
    h2d, d2h = out["copy_h2d"]["median"], out["copy_d2h"]["median"]
    gib = 1 << 30

    def row(what, s, limit=None):
        rate = gb / s["median"]
        return "| %s | %.2f (%.2f-%.2f) | %.1f | %s |" % (what, s["median"], s["min"], s["max"], rate,
                                                          "%.0f %%" % (100 * rate / limit) if limit else "")
    lines = [
        "# Sleep and wake: %s, %.1f GB gpt-oss-120b-shaped (%d layers), %s" % (out["machine"], gb, a.layers,
                                                                                 out["date"]),
        "",
        "`%s`" % out["command"],
        "",
        "Pinned copy limits in the same run (1 GiB, 16 MiB pieces, 4 streams): host to device %.1f GB/s, "
        "device to host %.1f GB/s." % (h2d, d2h),
        "",
        "| what | seconds (median, min-max of %d) | GB/s | of the copy limit |" % a.runs,
        "| --- | --- | --- | --- |",
        row("warm load (page cache)", out["warm_load"], h2d),
        row("sleep --offload (device to host memory)", out["offload"]["sleep"], d2h),
        row("wake from host memory", out["offload"]["wake"], h2d),
        row("sleep --offload, --sleep-pin on (the copy, then pinning it)", out["offload_pinned"]["sleep"], d2h),
        row("wake from pinned host memory%s" % ("" if out["offload_pinned"]["pinned"] else " (NOT PINNED: see the log)"),
            out["offload_pinned"]["wake"], h2d),
        row("sleep --discard", out["discard"]["sleep"]),
        row("wake from the checkpoint (page cache)", out["discard"]["wake"], h2d),
        "",
        "GPU free memory (cuMemGetInfo): before the load %.2f GiB, loaded %.2f GiB, asleep %.2f GiB (offload) and "
        "%.2f GiB (discard), awake %.2f GiB, unloaded %.2f GiB. The model reserved %.2f GiB; a sleep gave back "
        "%.2f GiB (offload) and %.2f GiB (discard)." % (
            out["free"]["before_load"] / gib, out["free"]["loaded"] / gib, out["offload"]["free_asleep"]["median"] / gib,
            out["discard"]["free_asleep"]["median"] / gib, out["offload"]["free_awake"]["median"] / gib,
            out["free"]["unloaded"] / gib, held / gib, out["offload"]["returned"] / gib,
            out["discard"]["returned"] / gib),
        "",
        "After the last wake: verify --quick %s (%.1f s), verify %s (%.1f s)." % (
            "matches" if out["verify_quick"]["match"] else "DIFFERS", out["verify_quick"]["seconds"],
            "matches" if out["verify"]["match"] else "DIFFERS", out["verify"]["seconds"]),
        "",
        "The seed's scenario, capacity %.2f GiB (the model's reservation and 256 MiB): B while A is awake: %s; "
        "A asleep in %.2f s; B loaded in %.2f s; A awake again in %.2f s; verify A: %s." % (
            cap / gib, seed["b_while_a_awake"], seed["sleep_a"], seed["b_while_a_asleep"], seed["wake_a"],
            "matches" if seed["verify_a"] else "DIFFERS"),
    ]
    with open(os.path.join(a.out, "sleep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if out["verify"]["match"] and out["offload_pinned"]["verify_quick"] and seed["verify_a"] and seed["b_while_a_awake"] == "ENOMEM" else 1


if __name__ == "__main__":
    sys.exit(main())
