"""On the GPU machine (make gpu-test): models on the cuda backend survive a
crash through the fd store (fdstore.FakeSystemd plays systemd), every byte
checked after; cuda-ipc says it cannot."""

import os
import signal
import unittest

from tests.e2e import harness as h
from tests.e2e.fdstore import FakeSystemd
from tests.gpu.test_gpu import device_used_mib


class GpuRestart(h.E2ETestCase):
    def service(self, *args):
        systemd = FakeSystemd(self.tmp, os.path.join(self.tmp, "weightd.sock"))
        self.addCleanup(systemd.close)
        d = h.ServiceDaemon(self.tmp, systemd, list(args))
        self.addCleanup(d.close)
        return d.start(), systemd

    def test_cuda_models_survive_a_crash(self):
        d, systemd = self.service("--backend", "cuda")
        src = h.copy_checkpoint(h.checkpoint("medium"), os.path.join(self.tmp, "ckpt"))
        h.load_ok(self, d, src, "--name", "m")
        systemd.wait_settled()
        self.assertTrue(d.stats()["fd_store"]["enabled"])
        os.rename(src, src + ".away")
        d.kill9()
        d.start()
        systemd.wait_settled()
        self.assertIn("restored m from the fd store", d.log())
        self.assertEqual(d.ctl("verify", "m", "--quick").rc, 0)
        self.assertEqual(d.ctl("verify", "m").rc, 0)  # the kept files, moved away
        os.rename(src + ".away", src)
        r = d.ctl("attach", "m", "--verify")  # a worker's mapping against the files
        self.assertEqual(r.rc, 0, r)
        used = device_used_mib()
        self.assertEqual(d.ctl("unload", "m").rc, 0)
        self.assertEqual(d.stats()["devices"][0]["reserved_bytes"]["current"], 0)
        systemd.wait_settled()
        self.assertLess(device_used_mib(), used, "the store let go of the memory")

    def test_cuda_ipc_says_it_cannot(self):
        d, systemd = self.service("--backend", "cuda-ipc")
        st = d.stats()["fd_store"]
        self.assertFalse(st["enabled"], st)
        self.assertFalse(st["survives_restart"], st)
        self.assertIn("dies with the daemon", d.log())


if __name__ == "__main__":
    unittest.main()
