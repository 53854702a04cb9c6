"""On the GPU machine (make gpu-test): weights served to workers.

Hugging Face models (transformers, torch) saved with save_pretrained as
sharded checkpoints, loaded by weightd on a CUDA backend, and run by a
separate worker process built on the meta device from served tensors alone:
its logits must equal, bit for bit, those of from_pretrained(dir). Also:
weightctl attach --verify on both CUDA backends, and what a read-only
mapping does to a worker that writes through it."""

import json
import os
import subprocess
import sys
import unittest

from tests.e2e import harness as h
from tests.gpu.test_gpu import gpu_count

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_worker.py")


def worker(tc, *args, expect_rc=0):
    env = {"WEIGHTD_CLIENT_LIB": os.path.join(h.BUILD, "libweightd-client.so.0"), "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, WORKER] + [str(a) for a in args], capture_output=True, text=True,
                       timeout=h.T(600), env=h.child_env(env))
    if expect_rc is not None:
        tc.assertEqual(p.returncode, expect_rc, "hf_worker %s\nstdout:\n%s\nstderr:\n%s" % (" ".join(map(str, args)),
                                                                                           p.stdout, p.stderr[-6000:]))
    return p


def last_json(p):
    return json.loads(p.stdout.strip().splitlines()[-1])


class Serving(h.E2ETestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.models = h.new_tempdir("wdgpu-hf-")
        cls.saved = {}

    @classmethod
    def tearDownClass(cls):
        import shutil
        shutil.rmtree(cls.models, True)

    def model_dir(self, kind):
        if kind not in self.saved:
            out = os.path.join(self.models, kind)
            res = last_json(worker(self, "save", kind, out))
            self.assertGreater(res["shards"], 1, "a sharded checkpoint")
            self.assertTrue(os.path.exists(os.path.join(out, "model.safetensors.index.json")))
            self.saved[kind] = out
        return self.saved[kind]

    def serve(self, kind, backend):
        path = self.model_dir(kind)
        d = self.daemon("--backend", backend, host_flags=False, sock=os.path.join(self.tmp, backend + ".sock"))
        h.load_ok(self, d, path, "--name", kind)
        res = last_json(worker(self, "serve", d.sock, kind, path))
        print("\n%s on %s: %s" % (kind, backend, json.dumps(res)), file=sys.stderr)
        self.assertEqual((res["missing"], res["unexpected"]), ([], []))
        self.assertTrue(res["zero_copy"], "the parameters are the served memory")
        self.assertEqual(res["devices"], ["cuda:0"])
        self.assertTrue(res["finite"])
        self.assertTrue(res["bit_for_bit"], "served logits differ from from_pretrained's by %g" % res["max_abs_diff"])
        self.assertEqual(d.ctl_json("leases").json["leases"], [])
        self.assertClean(d, d.stop())
        return res

    def test_a_dense_model_on_served_weights_matches_from_pretrained(self):
        res = self.serve("llama", "cuda")
        self.assertEqual(res["handle_type"], "cuda-vmm")

    def test_gpt_oss_with_fused_experts_on_served_weights_matches_from_pretrained(self):
        self.serve("gpt-oss", "cuda")

    def test_the_legacy_ipc_backend_serves_the_same(self):
        res = self.serve("llama", "cuda-ipc")
        self.assertEqual(res["handle_type"], "cuda-ipc")

    def test_weightctl_attach_verifies_on_both_cuda_backends(self):
        medium = h.checkpoint("medium")
        for backend in ("cuda", "cuda-ipc"):
            d = self.daemon("--backend", backend, host_flags=False, sock=os.path.join(self.tmp, backend + "-v.sock"))
            h.load_ok(self, d, medium, "--name", "m")
            r = h.run_ctl(d.sock, "attach", "m", "--verify", json_mode=True, timeout=h.T(120))
            self.assertEqual(r.rc, 0, r)
            self.assertTrue(r.json["match"], r.json)
            self.assertEqual(r.json["tensors"], 41)
            print("\nweightctl attach on %s: %s" % (backend, r.out.replace("\n", " ")), file=sys.stderr)
            self.assertClean(d, d.stop())

    def test_a_write_through_a_read_only_mapping_faults_in_the_worker_alone(self):
        d = self.daemon("--backend", "cuda", host_flags=False, sock=os.path.join(self.tmp, "ro.sock"))
        h.load_ok(self, d, h.checkpoint("small"), "--name", "m")
        p = worker(self, "write", d.sock, "m", expect_rc=None)
        self.assertNotEqual(p.returncode, 0, p.stdout)
        self.assertIn("illegal memory access", p.stderr)
        self.assertNotIn("wrote", p.stdout)
        self.assertEqual(d.ctl("verify", "m").rc, 0, "the daemon's copy is as it was")
        h.load_ok(self, d, h.checkpoint("qwen"), "--name", "after")  # and the daemon goes on
        self.assertEqual(d.ctl("attach", "after", "--verify").rc, 0)
        # writable where the daemon allows it: the write lands in its memory
        d2 = self.daemon("--backend", "cuda", "--attach-writable", "on", host_flags=False,
                         sock=os.path.join(self.tmp, "rw.sock"))
        h.load_ok(self, d2, h.checkpoint("small"), "--name", "m")
        p = worker(self, "write", d2.sock, "m", "--writable")
        self.assertIn("wrote", p.stdout)
        self.assertEqual(d2.ctl("verify", "m").rc, 1, "verify sees the worker's write")

    @unittest.skipUnless(gpu_count() >= 2, "needs two GPUs")
    def test_a_worker_per_gpu_under_expert_parallel_placement(self):
        d = self.daemon("--backend", "cuda", "--devices", "0,1", host_flags=False,
                        sock=os.path.join(self.tmp, "ep.sock"))
        small = h.checkpoint("small")
        h.load_ok(self, d, small, "--name", "ep", "--devices", "0,1", "--placement", "expert-parallel")
        for dev in ("0", "1"):
            r = h.run_ctl(d.sock, "attach", "ep", "--device", dev, "--verify", json_mode=True, timeout=h.T(120))
            self.assertEqual(r.rc, 0, r)
            self.assertEqual([x["device"] for x in r.json["devices"]], [int(dev)])
        self.assertClean(d, d.stop())


if __name__ == "__main__":
    unittest.main()
