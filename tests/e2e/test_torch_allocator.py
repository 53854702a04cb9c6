"""libweightd-torch.so, the allocator inside a PyTorch process, on the host
backend: each scenario of torch_host.py in a process of its own, through the
Python module (weightd.torch_allocator) and the library's two pluggable
functions. The same on GPUs, with PyTorch: tests/gpu/test_torch_allocator.py."""

import os
import signal
import subprocess
import sys
import unittest

from tests.e2e import harness as h

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_host.py")


def run(scenario, **env):
    e = h.child_env({"WEIGHTD_TORCH_LIB": os.path.join(h.BUILD, "libweightd-torch.so"),
                     "WEIGHTD_TORCH_BACKEND": "host", "WEIGHTD_TORCH_CAPACITY": "256MiB",
                     # the scenarios check the NULLs refusals return (the default aborts)
                     "WEIGHTD_TORCH_OOM": "null",
                     "PYTHONPATH": os.path.join(h.REPO, "client", "python")})
    e.update({k: v for k, v in h.client_lib_env().items() if k != "WEIGHTD_CLIENT_LIB"})
    e.update(env)
    return subprocess.run([h.PEER_PYTHON, SCRIPT, scenario], env=e, capture_output=True, text=True,
                          timeout=h.T(120))


class TorchAllocatorOnHost(unittest.TestCase):
    def scenario(self, name, **env):
        r = run(name, **env)
        self.assertEqual(r.returncode, 0, "%s:\n%s%s" % (name, r.stdout, r.stderr))
        h.assert_no_sanitizer(r.stderr, name)
        return r

    def test_a_sleeping_tag_gives_every_byte_back_and_wakes_with_its_bytes_at_the_same_addresses(self):
        self.scenario("sleep_and_wake")

    def test_touching_a_sleeping_tag_is_a_fault(self):
        r = run("touch_asleep")
        self.assertIn("touching", r.stdout)
        self.assertEqual(r.returncode, -signal.SIGSEGV, r.stderr)

    def test_policies_push_and_pop_every_key(self):
        self.scenario("policies", WEIGHTD_ALLOC_CONF="max_split_size_mb:100,garbage_collection_threshold:0.5")

    def test_a_block_freed_on_a_stream_is_reused_on_it_only(self):
        self.scenario("streams")

    def test_statistics_carry_pytorchs_names(self):
        self.scenario("stats_names")

    def test_errors_are_clear_and_harmless(self):
        r = self.scenario("errors")
        self.assertIn("which it did not hand out", r.stderr)

    def test_a_bad_environment_fails_every_call_saying_why(self):
        r = self.scenario("bad_environment", WEIGHTD_TORCH_CAPACITY="lots")
        self.assertIn("WEIGHTD_TORCH_CAPACITY", r.stderr)

    def test_a_request_that_cannot_be_met_stops_the_process_saying_why(self):
        # PyTorch would take a NULL for memory: a tensor at address 0
        for env in ({"WEIGHTD_TORCH_OOM": "abort"}, {"WEIGHTD_TORCH_OOM": ""}):
            r = run("out_of_memory", **env)
            self.assertEqual(r.returncode, -signal.SIGABRT, r.stdout + r.stderr)
            self.assertNotIn("returned", r.stdout)
            self.assertIn("weightd's allocator: 1099511627776 bytes on device 0:", r.stderr)
            self.assertIn("stopping the process (PyTorch would take a NULL for memory", r.stderr)
        r = run("out_of_memory")  # the runner's null: returned, and said why
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("returned", r.stdout)

    def test_threads_at_once(self):
        self.scenario("threads", WEIGHTD_TORCH_CAPACITY="4GiB")  # 8 x 16 blocks live at most


if __name__ == "__main__":
    unittest.main()
