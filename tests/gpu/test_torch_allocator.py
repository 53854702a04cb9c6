"""On the GPU machine (make gpu-test): libweightd-torch.so inside a real
PyTorch process. Weights loaded and rewritten under the load policy and a
tag sleep with every byte back to the GPU (cudaMemGetInfo) and wake at the
same addresses with the same bytes; a CUDA graph captured before the sleep
replays after the wake with the same output."""

import json
import os
import subprocess
import sys
import unittest

from tests.e2e import harness as h

HERE = os.path.dirname(os.path.abspath(__file__))


class TorchAllocatorOnGpu(unittest.TestCase):
    def test_weights_sleep_and_wake_under_a_graph(self):
        env = h.child_env({"WEIGHTD_TORCH_LIB": os.path.join(h.BUILD, "libweightd-torch.so"),
                           "PYTHONPATH": os.path.join(h.REPO, "client", "python")})
        r = subprocess.run([sys.executable, os.path.join(HERE, "torch_alloc_worker.py")], env=env,
                           capture_output=True, text=True, timeout=h.T(300))
        self.assertEqual(r.returncode, 0, r.stderr[-4000:])
        out = json.loads(r.stdout.strip().splitlines()[-1])
        self.assertGreater(out["tag_bytes"], 0, out)
        self.assertGreaterEqual(out["given_back"], 0.999 * out["tag_bytes"], out)
        self.assertTrue(out["same_ptrs"], out)
        self.assertTrue(out["same_bytes"], out)
        self.assertTrue(out["graph_same"], out)


if __name__ == "__main__":
    unittest.main()
