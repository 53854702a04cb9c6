"""On the GPU machine (make gpu-test): sleep gives every byte of a model back
to the GPU (cuMemGetInfo, through stats' free_bytes), wake brings identical
contents, and workers keep their tensors at the same addresses: a CUDA graph
captured over attached weights before the sleep replays after the wake with
the same output, in a torch worker (the Python client) and in a C one
(libweightd-client)."""

import json
import os
import subprocess
import sys

from tests.e2e import harness as h
from tests.e2e.test_attach import worker_env

HERE = os.path.dirname(os.path.abspath(__file__))
TENSOR = "model.layers.0.self_attn.q_proj.weight"


def free(d):
    return d.stats()["devices"][0]["free_bytes"]


def reserved(d):
    return d.stats()["devices"][0]["reserved_bytes"]["current"]


class Worker:
    def __init__(self, tc, cmd):
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=h.child_env(worker_env()), start_new_session=True)
        tc.addCleanup(self.close)
        self.first = self.read()
        tc.assertTrue(self.first.get("ready"), (self.first, self.p.stderr.read() if self.p.poll() is not None else ""))

    def read(self):
        line = self.p.stdout.readline()
        if not line:
            raise AssertionError("the worker ended: %s" % self.p.stderr.read()[-3000:])
        return json.loads(line)

    def ask(self, cmd):
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self.read()

    def close(self):
        if self.p.poll() is None:
            try:
                self.ask("quit")
                self.p.wait(timeout=h.T(30))
            except (OSError, AssertionError, subprocess.TimeoutExpired):
                self.p.kill()
        self.p.communicate(timeout=h.T(30))


class GpuSleep(h.E2ETestCase):

    def cuda_daemon(self, *args):
        d = self.daemon("--backend", "cuda", *args, host_flags=False)
        # The first load makes what the context keeps: measure after one.
        h.load_ok(self, d, h.checkpoint("qwen"), "--name", "warmup")
        self.assertEqual(d.ctl("unload", "warmup").rc, 0)
        return d

    def test_sleep_gives_every_byte_back_to_the_gpu(self):
        self.check_every_byte_back()

    def test_with_the_host_copy_pinned(self):
        # --sleep-pin on: each offload pins its host copy and the wake copies
        # from it; the pinning is undone when the copy goes, so the second
        # offload pins its own again
        d = self.check_every_byte_back("--sleep-pin", "on", modes=("offload", "offload", "discard"))
        self.assertEqual(d.log().count("b: its host copy pinned"), 2, d.log())
        self.assertNotIn("shards of its host copy pinned (then:", d.log())

    def check_every_byte_back(self, *args, modes=("offload", "discard")):
        d = self.cuda_daemon(*args)
        base = free(d)
        h.load_ok(self, d, h.checkpoint("big"), "--name", "b")
        held = reserved(d)
        for mode in modes:
            r = d.ctl_json("sleep", "b", "--" + mode)
            self.assertEqual(r.rc, 0, r)
            self.assertEqual(reserved(d), 0)
            # Others on the GPU may move its free figure a little: compare
            # with what the model had reserved.
            self.assertGreaterEqual(free(d) - (base - held), -0.001 * held, (mode, base, held, free(d)))
            self.assertGreaterEqual(r.json["free_bytes_after"] - r.json["free_bytes_before"], 0.999 * held, r.json)
            r = d.ctl_json("wake", "b")
            self.assertEqual(r.rc, 0, r)
            self.assertEqual(reserved(d), held)
            for args in ((), ("--quick",)):
                r = d.ctl_json("verify", "b", *args)
                self.assertTrue(r.json["match"], r)
        self.assertEqual(d.ctl("unload", "b").rc, 0)
        self.assertClean(d, d.stop())
        return d

    def check_graph_worker(self, cmd, status, asleep_of):
        d = self.cuda_daemon()
        h.load_ok(self, d, h.checkpoint("medium"), "--name", "m")
        held = reserved(d)
        w = Worker(self, cmd(d))
        awake_free = free(d)
        # The sleep waits for the worker to unmap (a C worker reads its
        # events when it polls).
        sleeper = h.CtlProcess(d.sock, "sleep", "m", json_mode=True)
        self.addCleanup(sleeper.kill)
        h.wait_until(lambda: asleep_of(w.ask(status)), h.T(20), what="the worker to unmap")
        r = sleeper.finish()
        self.assertEqual(r.rc, 0, r)
        st = w.ask(status)
        self.assertEqual(st["ptr"], w.first["ptr"])
        # The worker unmapped: the memory is the GPU's again.
        self.assertGreaterEqual(free(d) - awake_free, 0.999 * held)
        r = d.ctl_json("wake", "m")
        self.assertEqual(r.rc, 0, r)
        h.wait_until(lambda: not asleep_of(w.ask(status)), h.T(20),
                     what="the worker to map the model again")
        r = w.ask("replay")
        self.assertTrue(r["same"], (r, w.first))
        if "deterministic" in w.first:  # the torch worker's graph gives one answer, and the bytes are the same
            self.assertTrue(w.first["deterministic"], w.first)
            self.assertEqual(r["raw"], w.first["raw"])
        self.assertEqual(d.ctl("verify", "m", "--quick").rc, 0)

    def test_a_torch_workers_cuda_graph_replays_after_sleep_and_wake(self):
        self.check_graph_worker(lambda d: [sys.executable, os.path.join(HERE, "sleep_worker.py"), d.sock, "m",
                                           TENSOR], "status", lambda st: st["asleep"])

    def test_a_c_workers_cuda_graph_replays_after_sleep_and_wake(self):
        exe = os.path.join(h.BUILD, "tests", "graph_worker")
        self.assertTrue(os.path.exists(exe), "make gpu-test builds it")
        self.check_graph_worker(lambda d: [exe, d.sock, "m", TENSOR], "poll", lambda st: st["state"] == 1)

    def test_the_seeds_scenario_with_a_gpt_oss_shaped_model(self):
        """A capped GPU: model B (the same checkpoint again, under another
        name) fits only if every byte of the sleeping A came back."""
        ckpt = h.checkpoint("huge")
        probe = self.cuda_daemon()
        h.load_ok(self, probe, ckpt, "--name", "a")
        held = reserved(probe)
        self.assertClean(probe, probe.stop())
        d = self.cuda_daemon("--device-capacity", str(held + (256 << 20)))
        h.load_ok(self, d, ckpt, "--name", "a")
        r = d.ctl_json("load", ckpt, "--name", "b")
        self.assertEqual(r.json["error"]["code"], "ENOMEM", r)
        self.assertEqual(d.ctl_json("sleep", "a").rc, 0)
        h.load_ok(self, d, ckpt, "--name", "b")
        self.assertEqual(d.ctl("unload", "b").rc, 0)
        r = d.ctl_json("wake", "a")
        self.assertEqual(r.rc, 0, r)
        r = d.ctl_json("verify", "a")
        self.assertTrue(r.json["match"], r)
        self.assertClean(d, d.stop())


if __name__ == "__main__":
    sys.exit("run with: make gpu-test")
