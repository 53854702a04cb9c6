"""The Python client (client/python/weightd) against a real daemon."""

import os
import socket
import sys
import threading

from . import harness as h

sys.path.insert(0, os.path.join(h.REPO, "client", "python"))
import weightd  # noqa: E402


class PythonClient(h.E2ETestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.small = h.checkpoint("small")
        cls.qwen_many = h.checkpoint("qwen-many")

    def test_a_model_from_load_to_unload(self):
        d = self.daemon(devices=2)
        events = []
        with weightd.Client(d.sock) as c:
            self.assertEqual((c.server_info["version"].split(".")[0], c.server_info["backend"]), ("1", "host"))
            res = c.load(self.small, name="m", devices=["host-1", 0], placement="expert-parallel",
                         on_progress=events.append)
            self.assertEqual((res["name"], res["devices"], res["placement"]), ("m", [1, 0], "expert-parallel"))
            self.assertEqual(res["bytes"], h.checkpoint_bytes(self.small))
            self.assertTrue(events and events[-1]["event"] == "progress")
            self.assertEqual(events[-1]["bytes_done"], events[-1]["bytes_total"])
            self.assertEqual([m["name"] for m in c.list()], ["m"])
            tensors = list(c.tensors("m"))
            self.assertEqual(len(tensors), 22)
            self.assertTrue(all(t["placements"] for t in tensors))
            self.assertIs(c.verify("m")["match"], True)
            self.assertEqual([x["uuid"] for x in c.stats()["devices"]], ["host-0", "host-1"])
            self.assertEqual(c.unload("m")["name"], "m")
            self.assertEqual(c.list(), [])

    def test_a_timeout_shorter_than_the_load(self):
        # The timeout bounds each wait for a message; progress events, sent
        # every 0.2 s whether or not a callback is given, keep a long load
        # (and one queued behind it) alive.
        big = h.checkpoint("big")
        d = self.daemon(capacity="4GiB")
        first = weightd.Client(d.sock, timeout=h.T(0.35))
        self.addCleanup(first.close)
        done = []
        t = threading.Thread(target=lambda: done.append(first.load(big, name="first")))
        t.start()
        h.wait_until(lambda: d.stats()["jobs"], h.T(10), what="the first load")
        with weightd.Client(d.sock, timeout=h.T(0.35)) as c:
            phases = []
            res = c.load(self.small, name="second", devices="0", on_progress=lambda ev: phases.append(ev["phase"]))
            self.assertEqual(res["name"], "second")
        t.join()
        self.assertEqual(done[0]["name"], "first")
        self.assertIn("reading", phases)
        with weightd.Client(d.sock, timeout=h.T(0.35)) as c:
            self.assertIs(c.verify("first")["match"], True)
            self.assertEqual(sorted(m["name"] for m in c.list()), ["first", "second"])

    def test_info_pages_are_gathered(self):
        d = self.daemon()
        with weightd.Client(d.sock) as c:
            c.load(self.qwen_many, name="many")
            first = c.info("many", limit=10)
            self.assertEqual((len(first["tensor_list"]), first["next"]), (10, 10))
            names = [t["name"] for t in c.tensors("many")]
            self.assertEqual(len(names), 1032)
            self.assertEqual(len(set(names)), 1032)

    def test_errors_raise_with_the_daemons_code(self):
        d = self.daemon()
        with weightd.Client(d.sock) as c:
            with self.assertRaises(weightd.WeightdError) as e:
                c.unload("nope")
            self.assertEqual(e.exception.code, "ENOENT")
            self.assertIn('"nope"', e.exception.message)
            with self.assertRaises(weightd.WeightdError) as e:
                c.load(self.small, device="GPU-0000")
            self.assertEqual(e.exception.code, "ENODEV")
            with self.assertRaises(weightd.WeightdError) as e:
                c.policy("max_split_size_mb:banana")
            self.assertEqual(e.exception.code, "EINVAL")
            with self.assertRaises(ValueError):
                c.call("list", {"pad": "x" * (1 << 20)})
            self.assertEqual(c.list(), [])  # the connection is still good

    def test_socket_paths_and_a_daemon_that_is_gone(self):
        d = self.daemon()
        env = dict(os.environ)
        try:
            os.environ.pop("WEIGHTD_SOCKET", None)
            os.environ["XDG_RUNTIME_DIR"] = "/run/user/1000"
            expected = "/run/weightd/weightd.sock" if os.geteuid() == 0 else "/run/user/1000/weightd.sock"
            self.assertEqual(weightd.default_socket(), expected)
            os.environ["WEIGHTD_SOCKET"] = d.sock
            self.assertEqual(weightd.default_socket(), d.sock)
            with weightd.Client() as c:
                self.assertEqual(c.path, d.sock)
                c.shutdown()
        finally:
            os.environ.clear()
            os.environ.update(env)
        self.assertEqual(d.wait(), 0)
        with self.assertRaises(OSError):
            weightd.Client(d.sock, timeout=2)

    def test_a_refusal_that_came_before_the_hello_is_raised_not_retried(self):
        # A connection refused and closed before the client's hello went
        # made the client connect again, and again, for as long as the
        # daemon refused (tests/e2e/test_reload.py's lowered
        # max_clients_per_uid found it).
        path = os.path.join(self.tmp, "refusing.sock")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(8)
        refused, accepts = threading.Event(), []

        def refuse():
            conn, _ = srv.accept()
            accepts.append(conn)
            conn.sendall(b'{"id":null,"ok":false,"error":{"code":"EBUSY","message":'
                         b'"weightd refused the connection: full"}}\n')
            conn.close()
            refused.set()

        class Late(weightd.Client):
            def _connect(self, timeout):
                super()._connect(timeout)
                refused.wait(10)  # the refusal is there before the hello goes

        t = threading.Thread(target=refuse)
        t.start()
        try:
            with self.assertRaises(weightd.WeightdError) as e:
                Late(path, timeout=2)
            self.assertEqual((e.exception.code, e.exception.message), ("EBUSY", "weightd refused the connection: full"))
        finally:
            t.join()
            srv.close()
        self.assertEqual(len(accepts), 1)

    def test_a_silent_peer_times_out(self):
        path = os.path.join(self.tmp, "silent.sock")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(1)
        accepted = []
        t = threading.Thread(target=lambda: accepted.append(srv.accept()[0]))
        t.start()
        try:
            with self.assertRaises(TimeoutError):
                weightd.Client(path, timeout=0.3)
        finally:
            t.join()
            for conn in accepted:
                conn.close()
            srv.close()
