#!/usr/bin/env python3
"""Restart benchmark, on the GPU machine, all in one call and side by side.

There is no systemd there: tests/e2e/fdstore.FakeSystemd plays its part (the
notify socket with the fd store, the listening socket, LISTEN_FDS and
LISTEN_FDNAMES for each start), as systemd 252 does after a crash.

On a gpt-oss-120b-shaped checkpoint written by weightd-mkckpt (cuda backend):
  - a cold load (page cache dropped) and warm reloads (unload, load again);
  - then, RUNS times: the daemon is killed (SIGKILL) with the checkpoint
    moved away, and started again; a worker that has imported torch and made
    its CUDA context beforehand attaches as soon as it can. "restart to
    attach" is from the new daemon's exec to that worker holding every
    tensor as a CUDA torch tensor; "ready" is to the daemon's READY=1. The
    new daemon's /proc/PID/io says what it read (read_bytes: from storage;
    rchar: every read, the record's memfd included);
  - once, the same after SIGTERM (`systemctl restart`);
  - after the last restart, every byte is checked: `weightctl attach
    --verify` (each tensor's checksum as a worker maps it against the one
    computed while loading) and `verify --quick` (the daemon's own copies);
  - the cuda-ipc backend under the same harness: what stats says.
Writes OUT/restart.json and OUT/restart.md and prints the table.

Usage: bench/restart_bench.py --build build --work /tmp/wdrestart --out DIR [--layers 11] [--runs 3]
       (--backend host: the same run without a GPU, for trying the script; its figures mean nothing)
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)
from load_bench import drop_caches, gpt_oss_checkpoint, gpu_name  # noqa: E402
from tests.e2e.fdstore import FakeSystemd  # noqa: E402


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


# ---- the worker (a fresh process, made ready before the daemon comes back) --------

def worker(sock, name, gpu):
    import torch
    if gpu:
        torch.zeros(1, device="cuda:0")
        torch.cuda.synchronize()
    sys.path.insert(0, os.path.join(REPO, "client", "python"))
    import weightd
    print("READY", flush=True)
    sys.stdin.readline()
    # As soon as the daemon answers: its socket is systemd's, so the connect
    # waits in the backlog until the new daemon accepts.
    while True:
        try:
            att = weightd.Client(sock, timeout=60).attach(name, device=0, framework="torch", reconnect=0)
            break
        except (ConnectionError, OSError, weightd.WeightdError) as e:
            if "ECONNRESET" not in str(e) and "EPIPE" not in str(e) and not isinstance(e, ConnectionError):
                raise
            time.sleep(0.005)
    sd = att.state_dict()
    done_at = time.monotonic()
    assert all(t.device.type == ("cuda" if gpu else "cpu") for t in sd.values())
    print(json.dumps({"done_at": done_at, "tensors": len(sd), "bytes": att.info["bytes"],
                      "library": att.info["client"]["seconds"]}), flush=True)
    att.close()


class Service:
    """weightd as a service of FakeSystemd."""

    def __init__(self, build, work, args):
        self.build = build
        self.sock = os.path.join(work, "weightd.sock")
        for p in (self.sock, os.path.join(work, "notify.sock")):
            if os.path.exists(p):
                os.unlink(p)
        self.systemd = FakeSystemd(work, self.sock)
        self.args = [os.path.join(build, "weightd")] + args
        self.log = open(os.path.join(work, "weightd.log"), "a")
        self.p = None

    def start(self):
        cmd, fds = self.systemd.command(self.args)
        mark = len(self.systemd.messages)
        t0 = time.monotonic()
        self.p = subprocess.Popen(cmd, pass_fds=fds, stderr=self.log, env=dict(os.environ, **self.systemd.env()))
        while not any(m.startswith("READY=1") for m in self.systemd.messages[mark:]):
            if self.p.poll() is not None:
                raise RuntimeError("weightd exited %d; see weightd.log" % self.p.returncode)
            time.sleep(0.001)
        return t0, time.monotonic()

    def ctl(self, *args):
        r = subprocess.run([os.path.join(self.build, "weightctl"), "--socket", self.sock, "--json", "--timeout", "600"]
                           + list(args), capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError("weightctl %s: %s %s" % (args, r.stdout, r.stderr))
        return json.loads(r.stdout) if r.stdout.strip() else {}

    def io(self):
        with open("/proc/%d/io" % self.p.pid) as f:
            return {k: int(v) for k, v in (line.split(": ") for line in f)}

    def kill(self, sig):
        self.p.send_signal(sig)
        self.p.wait(timeout=120)

    def close(self):
        if self.p and self.p.poll() is None:
            self.kill(signal.SIGTERM)
        self.systemd.close()
        self.log.close()


def ready_worker(build, sock, name, gpu):
    env = dict(os.environ, WEIGHTD_CLIENT_LIB=os.path.join(build, "libweightd-client.so.0"), PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, __file__, "worker", sock, name] + ([] if gpu else ["--host"]),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if p.stdout.readline().strip() != "READY":
        raise RuntimeError("worker: %s" % p.stderr.read())
    return p


def restart_once(svc, ckpt, build, gpu, sig):
    """Kills the daemon with sig, the checkpoint moved away, and starts it
    again with a worker waiting: the figures of that restart."""
    w = ready_worker(build, svc.sock, "m", gpu)
    svc.kill(sig)
    os.rename(ckpt, ckpt + ".away")
    try:
        w.stdin.write("GO\n")
        w.stdin.flush()
        t_exec, t_ready = svc.start()
        res = json.loads(w.stdout.readline())
        w.wait(timeout=60)
        io = svc.io()
    finally:
        os.rename(ckpt + ".away", ckpt)
    return {"ready": t_ready - t_exec, "attach": res["done_at"] - t_exec, "tensors": res["tensors"],
            "bytes": res["bytes"], "read_bytes": io["read_bytes"], "rchar": io["rchar"]}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3], "--host" not in sys.argv)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--work", default="/tmp/wdrestart")
    ap.add_argument("--out", default="build/bench")
    ap.add_argument("--layers", type=int, default=11)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--backend", default="cuda")
    a = ap.parse_args()
    gpu = a.backend == "cuda"
    os.makedirs(a.work, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    ckpt, shards = gpt_oss_checkpoint(a.build, a.work, a.layers)
    total = sum(os.path.getsize(s) for s in shards)
    extra = ["--backend", a.backend] + ([] if gpu else ["--host-capacity", "64GiB"])
    out = {"date": time.strftime("%Y-%m-%d"), "machine": gpu_name() if gpu else "host backend (no GPU)",
           "command": " ".join(sys.argv), "checkpoint": {"layers": a.layers, "file_bytes": total,
                                                          "shards": len(shards)}}
    svc = Service(a.build, a.work, extra)
    try:
        svc.start()
        if gpu:
            drop_caches()
        t0 = time.monotonic()
        res = svc.ctl("load", ckpt, "--name", "m")
        out["cold_load"] = {"seconds": res["seconds"], "wall": time.monotonic() - t0, "bytes": res["bytes"]}
        warm = []
        for _ in range(a.runs):
            svc.ctl("unload", "m")
            res = svc.ctl("load", ckpt, "--name", "m")
            warm.append(res["seconds"])
        out["warm_load"] = summary(warm)
        out["model_bytes"] = res["bytes"]
        stored = svc.systemd.wait_settled()
        out["fd_store"] = {"descriptors": len(stored), "stats": svc.ctl("stats")["fd_store"]}
        runs = [restart_once(svc, ckpt, a.build, gpu, signal.SIGKILL) for _ in range(a.runs)]
        out["restart_sigkill"] = {k: summary([r[k] for r in runs]) for k in ("ready", "attach", "read_bytes", "rchar")}
        out["restart_sigkill"]["tensors"] = runs[0]["tensors"]
        out["restart_sigterm"] = restart_once(svc, ckpt, a.build, gpu, signal.SIGTERM)
        t0 = time.monotonic()
        r = subprocess.run([os.path.join(a.build, "weightctl"), "--socket", svc.sock, "attach", "m", "--device", "0",
                            "--verify"], capture_output=True, text=True)
        out["attach_verify"] = {"rc": r.returncode, "seconds": time.monotonic() - t0, "tail": r.stdout[-300:]}
        t0 = time.monotonic()
        out["verify_quick"] = {"result": svc.ctl("verify", "m", "--quick"), "seconds": time.monotonic() - t0}
    finally:
        svc.close()
    if gpu:
        ipc_work = os.path.join(a.work, "ipc")
        os.makedirs(ipc_work, exist_ok=True)
        ipc = Service(a.build, ipc_work, ["--backend", "cuda-ipc"])
        try:
            ipc.start()
            out["cuda_ipc"] = {"fd_store": ipc.ctl("stats")["fd_store"]}
        finally:
            ipc.close()
        with open(os.path.join(ipc_work, "weightd.log")) as f:
            out["cuda_ipc"]["log"] = [line.strip() for line in f if "fd store" in line]
    with open(os.path.join(a.out, "restart.json"), "w") as f:
        json.dump(out, f, indent=1)
    gb = out["model_bytes"] / 1e9
    k, t = out["restart_sigkill"], out["restart_sigterm"]
    lines = [
        "# Restart to serving: %s, %.1f GB gpt-oss-120b-shaped (%d layers, %d tensors), %s" %
        (out["machine"], gb, a.layers, k["tensors"], out["date"]),
        "",
        "`%s`" % out["command"],
        "",
        "| what | seconds (median, min-max of %d) | GB/s |" % a.runs,
        "| --- | --- | --- |",
        "| cold load (page cache dropped) | %.2f | %.2f |" % (out["cold_load"]["seconds"],
                                                            gb / out["cold_load"]["seconds"]),
        "| warm reload (unload, load) | %.2f (%.2f-%.2f) | %.2f |" % (out["warm_load"]["median"], out["warm_load"]["min"],
                                                                   out["warm_load"]["max"],
                                                                   gb / out["warm_load"]["median"]),
        "| SIGKILL, restart to READY=1 (CUDA initialisation, restore) | %.3f (%.3f-%.3f) | |" %
        (k["ready"]["median"], k["ready"]["min"], k["ready"]["max"]),
        "| SIGKILL, restart to a worker holding every tensor | %.3f (%.3f-%.3f) | |" %
        (k["attach"]["median"], k["attach"]["min"], k["attach"]["max"]),
        "| SIGTERM (`systemctl restart`), to a worker holding every tensor | %.3f | |" % t["attach"],
        "",
        "Bytes the new daemon read (`/proc/PID/io`), checkpoint moved away: read_bytes %s, rchar %s (median)." %
        (k["read_bytes"]["median"], k["rchar"]["median"]),
        "Restart to attach against the warm reload: %.1fx faster." % (out["warm_load"]["median"] / k["attach"]["median"]),
        "fd store: %d descriptors held for the model." % out["fd_store"]["descriptors"],
        "After the restarts: `weightctl attach --verify` exit %d in %.1f s; `verify --quick` %s in %.1f s." %
        (out["attach_verify"]["rc"], out["attach_verify"]["seconds"],
         "ok" if out["verify_quick"]["result"] else "?", out["verify_quick"]["seconds"]),
    ]
    if "cuda_ipc" in out:
        lines.append("cuda-ipc: stats fd_store %s." % json.dumps(out["cuda_ipc"]["fd_store"]))
    with open(os.path.join(a.out, "restart.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
