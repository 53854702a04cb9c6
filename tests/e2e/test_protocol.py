"""The wire protocol by hand, over raw Unix sockets: hello and versions, ids,
error replies, bad input of every kind, oversize lines, clients that
misbehave while others are served, many clients, clients that vanish, and
file descriptors sent to the daemon."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

from . import harness as h

MiB = 1 << 20


class Hello(h.E2ETestCase):

    def test_hello_first(self):
        d = self.daemon()
        c = self.raw(d, hello=False)
        r = c.request("list", id=1)
        h.assert_error_reply(self, r, "EPROTO", 1)
        self.assertIn("hello", r["error"]["message"])
        r = c.request("stats", id="s")
        h.assert_error_reply(self, r, "EPROTO", "s")
        r = c.hello()
        self.assertTrue(r["ok"], r)
        self.assertEqual(r["result"]["version"], "1.0")
        self.assertTrue(r["result"]["server"].startswith("weightd "))
        r = c.request("list")
        self.assertEqual(r["result"], {"models": [], "next": None})

    def test_versions(self):
        d = self.daemon()
        c = self.raw(d, hello=False)
        for version in ("2.0", "0.9", "2", "10.0"):
            with self.subTest(version=version):
                r = c.request("hello", {"version": version})
                err = h.assert_error_reply(self, r, "EPROTONOSUPPORT", r.get("id"), check_id=False)
                self.assertIn(version, err["message"])
                self.assertIn("1.0", err["message"], "the error says what the daemon speaks")
                # still not said hello
                h.assert_error_reply(self, c.request("list"), "EPROTO", check_id=False)
        for version in (1, 1.0, None, True, [1], {"major": 1}, "", "one", "x.1", "1x"):
            with self.subTest(version=version):
                r = c.request("hello", {"version": version})
                h.assert_error_reply(self, r, "EINVAL", check_id=False)
        r = c.request("hello", {})
        h.assert_error_reply(self, r, "EINVAL", check_id=False)
        self.assertIn("version", r["error"]["message"])
        r = c.request("hello")
        h.assert_error_reply(self, r, "EINVAL", check_id=False)
        # a minor version of our own major is fine, and hello may be repeated
        for version in ("1.0", "1.7", "1"):
            with self.subTest(version=version):
                self.assertTrue(c.request("hello", {"version": version})["ok"])
        self.assertTrue(c.request("list")["ok"])


class Messages(h.E2ETestCase):

    def test_ids_are_echoed(self):
        d = self.daemon()
        c = self.raw(d)
        for id in (0, 7, -3, 2 ** 40, 10 ** 15 - 1, "abc", "", "ünïcode ✓", "x" * 128):
            with self.subTest(id=id):
                r = c.request("list", id=id)
                self.assertEqual(r["id"], id)
                self.assertIs(r["ok"], True)
                e = c.request("info", {"name": "none"}, id=id)
                self.assertEqual(e["id"], id)
                h.assert_error_reply(self, e, "ENOENT", id)
        # no id at all, or null: the reply's id is null
        c.send({"op": "list"})
        r = c.recv()
        self.assertIn("id", r)
        self.assertIsNone(r["id"])
        self.assertTrue(r["ok"])
        c.send({"op": "list", "id": None})
        self.assertIsNone(c.recv()["id"])
        # ids that are neither: an error with a null id
        for id in ([1], {"a": 1}, True):
            with self.subTest(id=id):
                c.send({"op": "list", "id": id})
                r = c.recv()
                h.assert_error_reply(self, r, "EINVAL", None)
                self.assertIn("id", r["error"]["message"])

    def test_pipelined_requests_answer_in_order(self):
        d = self.daemon()
        c = self.raw(d, hello=False)
        lines = [json.dumps({"id": i, "op": op, "args": {"version": "1.0"} if op == "hello" else {}})
                 for i, op in enumerate(["hello", "list", "stats", "list", "nosuch"])]
        c.send("\n\n".join(lines) + "\n")
        replies = [c.recv() for _ in lines]
        self.assertEqual([r["id"] for r in replies], [0, 1, 2, 3, 4])
        self.assertEqual([r["ok"] for r in replies], [True, True, True, True, False])
        self.assertEqual(replies[4]["error"]["code"], "ENOSYS")

    def test_unknown_op(self):
        d = self.daemon()
        c = self.raw(d)
        for op in ("frobnicate", "LIST", "", "hello ", "x" * 5000):
            with self.subTest(op=op[:20]):
                r = c.request(op, id=9)
                err = h.assert_error_reply(self, r, "ENOSYS", 9)
                self.assertIn(op[:40], err["message"])
                self.assertLess(len(err["message"]), 400, "a long op name is not echoed whole")
        # also before hello
        c2 = self.raw(d, hello=False)
        h.assert_error_reply(self, c2.request("frobnicate", id=1), "ENOSYS", 1)

    def test_bad_messages_get_an_error_and_the_connection_survives(self):
        d = self.daemon()
        c = self.raw(d)
        bad_lines = [
            b"{",
            b"not json at all",
            b'{"id": 1, "op": "list"',
            b"[1, 2, 3]",
            b'["list"]',
            b'"list"',
            b"42",
            b"null",
            b"true",
            b'{"id": 1, "op": "list"} trailing',
            b'{"id": 1, "op": "list"}{"id": 2}',
            b'{"id": 1, "op": "li\x00st"}',
            b"\xff\xfe\xfd",
            b'{"id": 1, "op": "list", "args": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
        ]
        for line in bad_lines:
            with self.subTest(line=line[:40]):
                c.send(line + b"\n")
                r = c.recv()
                h.assert_error_reply(self, r, None, None, check_id=True)
                self.assertIn(r["error"]["code"], ("EBADMSG", "EINVAL"))
                # the connection still works
                self.assertTrue(c.request("list")["ok"])
        self.assertTrue(d.running())
        self.assertIn("bad message", d.log())

    def test_wrong_types(self):
        d = self.daemon(devices=2)
        small = h.checkpoint("small")
        c = self.raw(d)
        cases = [
            ({"id": 1, "op": 5}, "op"),
            ({"id": 1}, "op"),
            ({"id": 1, "op": None}, "op"),
            ({"id": 1, "op": "list", "args": [1]}, "args"),
            ({"id": 1, "op": "list", "args": "x"}, "args"),
            ({"id": 1, "op": "list", "args": {"events": "yes"}}, "events"),
            ({"id": 1, "op": "info", "args": {}}, "name"),
            ({"id": 1, "op": "info", "args": {"name": 5}}, "name"),
            ({"id": 1, "op": "info", "args": {"name": ["a"]}}, "name"),
            ({"id": 1, "op": "unload", "args": {"name": {}}}, "name"),
            ({"id": 1, "op": "verify", "args": {"name": True}}, "name"),
            ({"id": 1, "op": "load", "args": {}}, "path"),
            ({"id": 1, "op": "load", "args": {"path": 5}}, "path"),
            ({"id": 1, "op": "load", "args": {"path": "relative/path"}}, "absolute"),
            ({"id": 1, "op": "load", "args": {"path": small, "device": [1]}}, "device"),
            ({"id": 1, "op": "load", "args": {"path": small, "device": 1.5}}, "device"),
            ({"id": 1, "op": "load", "args": {"path": small, "device": -1}}, "device"),
            ({"id": 1, "op": "load", "args": {"path": small, "device": 1e300}}, "device"),
            ({"id": 1, "op": "load", "args": {"path": small, "name": 7}}, "name"),
            ({"id": 1, "op": "load", "args": {"path": small, "name": ""}}, "name"),
            ({"id": 1, "op": "load", "args": {"path": "/" + "a" * 5000}}, "too long"),
        ]
        for msg, words in cases:
            with self.subTest(msg=str(msg)[:80]):
                c.send(msg)
                r = c.recv()
                err = h.assert_error_reply(self, r, None, None, check_id=False)
                self.assertIn(err["code"], ("EINVAL", "ENAMETOOLONG"), r)
                self.assertIn(words, err["message"])
                self.assertTrue(c.request("list")["ok"])
        for device in (2, "7", "GPU-00000000"):
            r = c.request("load", {"path": small, "device": device})
            h.assert_error_reply(self, r, "ENODEV", check_id=False)
        r = c.request("load", {"path": "/nonexistent/model"})
        err = h.assert_error_reply(self, r, "ENOENT", check_id=False)
        self.assertIn("/nonexistent/model", err["message"])
        r = c.request("info", {"name": "x", "offset": -1})
        h.assert_error_reply(self, r, "ENOENT", check_id=False)  # the name is checked first
        self.assertEqual(d.models(), [])
        self.assertEqual(d.device(0)["reserved_bytes"]["current"], 0)

    def test_info_arguments(self):
        d = self.daemon()
        h.load_ok(self, d, h.checkpoint("small"))
        c = self.raw(d)
        for args in ({"offset": -1}, {"offset": "0"}, {"limit": 0}, {"limit": 100001}, {"limit": 2.5}):
            with self.subTest(args=args):
                a = dict(args, name="small")
                h.assert_error_reply(self, c.request("info", a), "EINVAL", check_id=False)
        r = c.request("info", {"name": "small", "limit": 5, "offset": 20})
        self.assertEqual(len(r["result"]["tensor_list"]), 2)
        self.assertIsNone(r["result"]["next"])
        r = c.request("info", {"name": "small", "limit": 5})
        self.assertEqual(r["result"]["next"], 5)


class EventsAndPrivileges(h.E2ETestCase):

    def test_events_only_when_asked(self):
        d = self.daemon(capacity="2GiB")
        c = self.raw(d)
        r = c.request("load", {"path": h.checkpoint("medium"), "name": "quiet"}, id="q", timeout=h.T(60))
        self.assertTrue(r["ok"], r)
        self.assertEqual(c.events, [], "no events for a request that did not ask")
        r = c.request("load", {"path": h.checkpoint("medium"), "name": "loud"}, id="l", events=True,
                      timeout=h.T(60))
        self.assertTrue(r["ok"], r)
        self.assertTrue(c.events, "a 300 MB load sends progress events")
        for e in c.events:
            self.assertEqual((e["event"], e["id"]), ("progress", "l"))
        self.assertEqual(r["result"]["name"], "loud")

    def test_privileged_operations_need_the_daemons_user(self):
        if os.geteuid() != 0:
            self.skipTest("needs root to connect as another user")
        d = self.daemon()
        h.load_ok(self, d, h.checkpoint("small"))
        os.chmod(self.tmp, 0o755)
        os.chmod(d.sock, 0o666)
        script = r"""
import json, os, socket, sys
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX); s.settimeout(30); s.connect(sys.argv[1])
f = s.makefile("rwb")
out = []
for i, (op, args) in enumerate([("hello", {"version": "1.0"}), ("list", {}), ("info", {"name": "small"}),
                                ("stats", {}), ("verify", {"name": "small"}), ("load", {"path": sys.argv[2]}),
                                ("unload", {"name": "small"}), ("shutdown", {})]):
    f.write((json.dumps({"id": i, "op": op, "args": args}) + "\n").encode()); f.flush()
    r = json.loads(f.readline())
    out.append([op, r["ok"], r.get("error", {}).get("code"), r.get("error", {}).get("message", "")])
print(json.dumps(out))
"""
        p = subprocess.run([sys.executable, "-c", script, d.sock, h.checkpoint("qwen")], capture_output=True,
                           text=True, timeout=h.T(60))
        self.assertEqual(p.returncode, 0, p.stderr)
        got = {op: (ok, code, msg) for op, ok, code, msg in json.loads(p.stdout)}
        for op in ("hello", "list", "info", "stats"):
            self.assertEqual(got[op][:2], (True, None), op)
        for op in ("verify", "load", "unload", "shutdown"):
            self.assertEqual(got[op][:2], (False, "EPERM"), op)
            self.assertIn("uid 65534", got[op][2])
        self.assertTrue(d.running())
        self.assertEqual([m["name"] for m in d.models()], ["small"])


class Abuse(h.E2ETestCase):

    def test_a_client_that_shuts_its_sending_side_gets_every_reply(self):
        # End of the client's stream closed the connection at once: a client
        # that sends, shuts its side (socat, nc -N) and reads got a cut line.
        d = self.daemon()
        h.load_ok(self, d, h.checkpoint("qwen-many"), "--name", "m")
        c = self.raw(d)
        c.sock.sendall(b"".join(b'{"id": %d, "op": "info", "args": {"name": "m"}}\n' % i for i in range(30)))
        c.sock.shutdown(socket.SHUT_WR)
        time.sleep(0.5)
        while True:
            chunk = c.sock.recv(1 << 16)
            if not chunk:
                break
            c.buf += chunk
        self.assertTrue(c.buf.endswith(b"\n"), "no cut line")
        replies = [json.loads(l) for l in c.buf.split(b"\n") if l]
        self.assertEqual([r["id"] for r in replies], list(range(30)))
        self.assertTrue(d.running())

    def assert_list_answers_quickly(self, d, within=1.0):
        t0 = time.monotonic()
        with h.RawClient(d.sock, timeout=h.T(5)) as c:
            self.assertTrue(c.hello()["ok"])
            r = c.request("list")
        elapsed = time.monotonic() - t0
        self.assertTrue(r["ok"], r)
        self.assertLess(elapsed, within * h.SLOW, "another client's list took %.2f s" % elapsed)
        return r

    def test_line_over_1_mib(self):
        d = self.daemon()
        for size, newline in ((MiB + 10, True), (2 * MiB, True), (2 * MiB, False)):
            with self.subTest(size=size, newline=newline):
                c = self.raw(d)
                payload = b'{"id": 1, "op": "list", "args": {"pad": "' + b"x" * size + b'"}}'
                if newline:
                    payload += b"\n"
                try:
                    c.send(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the daemon closed on us mid-line: allowed
                replies = []
                while True:
                    try:
                        m = c.recv(timeout=h.T(10))
                    except (ConnectionResetError, BrokenPipeError):
                        m = None
                    if m is None:
                        break
                    replies.append(m)
                # an error reply (EMSGSIZE) and then the connection closed
                self.assertTrue(replies, "an oversize line gets an error reply")
                h.assert_error_reply(self, replies[0], "EMSGSIZE", None)
                self.assertIn("longer than", replies[0]["error"]["message"])
                self.assertTrue(c.eof)
                self.assert_list_answers_quickly(d)
        # exactly at the limit minus one: fine
        c = self.raw(d)
        line = json.dumps({"id": 5, "op": "list", "args": {"pad": ""}})
        pad = MiB - len(line) - 1
        line = json.dumps({"id": 5, "op": "list", "args": {"pad": "y" * pad}}) + "\n"
        self.assertEqual(len(line), MiB)
        c.send(line)
        self.assertEqual(c.recv(timeout=h.T(10))["id"], 5)
        self.assertTrue(d.running())

    def test_others_are_served_while_one_client_misbehaves(self):
        d = self.daemon()
        h.load_ok(self, d, h.checkpoint("small"))
        stop = threading.Event()
        errors = []

        def garbage():
            try:
                with h.RawClient(d.sock) as c:
                    junk = (b"\x00garbage{[}" * 1000 + b"\n") * 10
                    while not stop.is_set():
                        c.sock.sendall(junk)
                        c.sock.settimeout(0.01)
                        try:
                            while c.sock.recv(1 << 20):
                                pass
                        except (socket.timeout, BlockingIOError):
                            pass
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        def big_line():
            try:
                with h.RawClient(d.sock) as c:
                    c.sock.sendall(b'{"id": 1, "op": "list", "pad": "' + b"z" * (2 * MiB))
                    stop.wait(h.T(30))
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        half = self.raw(d)
        half.send(b'{"id": 1, "op": "li')  # and never the rest
        slow = self.raw(d)
        slow.send(b'{"id": 1, ')
        threads = [threading.Thread(target=garbage), threading.Thread(target=big_line)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.2)
            for _ in range(10):
                self.assert_list_answers_quickly(d)
            r = d.ctl("info", "small")
            self.assertEqual(r.rc, 0, r)
            # the half-written line completes later and is answered
            slow.send(b'"op": "list"}\n')
            self.assertTrue(slow.recv()["ok"])
        finally:
            stop.set()
            for t in threads:
                t.join(h.T(30))
        self.assertEqual(errors, [])
        self.assertTrue(d.running())
        self.assertEqual(d.ctl("verify", "small").rc, 0)

    def test_many_clients_at_once(self):
        d = self.daemon()
        h.load_ok(self, d, h.checkpoint("small"))
        clients = [h.RawClient(d.sock, timeout=h.T(20)) for _ in range(50)]
        try:
            for i, c in enumerate(clients):
                c.send({"id": i, "op": "hello", "args": {"version": "1.0"}})
            for i, c in enumerate(clients):
                r = c.recv()
                self.assertEqual((r["id"], r["ok"]), (i, True))
            self.assertEqual(d.stats()["connections"], 51)
            for i, c in enumerate(clients):
                c.send({"id": "l%d" % i, "op": "list"})
                c.send({"id": "i%d" % i, "op": "info", "args": {"name": "small"}})
            for i, c in enumerate(clients):
                r1, r2 = c.recv(), c.recv()
                self.assertEqual((r1["id"], r2["id"]), ("l%d" % i, "i%d" % i))
                self.assertEqual(r1["result"]["models"][0]["name"], "small")
                self.assertEqual(len(r2["result"]["tensor_list"]), 22)
        finally:
            for c in clients:
                c.close()
        # and from 50 threads, each its own connection and weightctl
        results = []

        def one():
            results.append(d.ctl("list").rc)

        threads = [threading.Thread(target=one) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(h.T(60))
        self.assertEqual(results, [0] * 20)
        h.wait_until(lambda: d.stats()["connections"] == 1, h.T(10), what="the connections to close")

    def test_max_clients(self):
        # (these tests run as root: an administrator, who gets 16 more)
        d = self.daemon("--max-clients", "3")
        held = [self.raw(d) for _ in range(3 + 16)]
        extra = h.RawClient(d.sock)
        try:
            r = extra.recv(timeout=h.T(10))
            h.assert_error_reply(self, r, "EBUSY", None)
            self.assertIn("max_clients 3", r["error"]["message"])
            self.assertIsNone(extra.recv(timeout=h.T(10)))
        finally:
            extra.close()
        self.assertTrue(held[0].request("list")["ok"])
        held[2].close()

        def slot_free():
            with h.RawClient(d.sock) as c:
                return c.hello().get("ok")

        h.wait_until(slot_free, h.T(10), what="a free slot")
        self.assertIn("refused a client", d.log())

    def test_clients_that_vanish(self):
        d = self.daemon()
        h.load_ok(self, d, h.checkpoint("qwen"))
        for op, args in (("list", {}), ("info", {"name": "qwen"}), ("stats", {}), ("verify", {"name": "qwen"})):
            with self.subTest(op=op):
                c = h.RawClient(d.sock)
                c.send({"id": 0, "op": "hello", "args": {"version": "1.0"}})
                c.send({"id": 1, "op": op, "args": args})
                c.close()  # without reading anything
                self.assertTrue(d.running())
                self.assert_list_answers_quickly(d)
        # one that resets the connection (unread data + SO_LINGER 0)
        c = h.RawClient(d.sock, hello=True)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        c.send_request("info", {"name": "qwen"})
        c.close()
        # one that stops reading but keeps sending: the others are still served
        hog = self.raw(d)
        req = (json.dumps({"id": 1, "op": "info", "args": {"name": "qwen"}}) + "\n").encode() * 200
        stop = threading.Event()
        sent = [0]

        def flood():
            hog.sock.settimeout(0.05)
            while not stop.is_set():
                try:
                    sent[0] += hog.sock.send(req)
                except socket.timeout:
                    pass
                except OSError:
                    break  # dropped by the daemon: fine

        t = threading.Thread(target=flood)
        t.start()
        try:
            h.wait_until(lambda: sent[0] > 0, h.T(10), what="the flood to start")
            for _ in range(5):
                self.assert_list_answers_quickly(d)
                time.sleep(0.1)
        finally:
            stop.set()
            t.join(h.T(30))
        hog.close()
        h.wait_until(lambda: d.stats()["connections"] == 1, h.T(10), what="the vanished clients to be closed")
        self.assertEqual(d.ctl("verify", "qwen").rc, 0)

    def test_a_slow_reader_loses_nothing(self):
        # Far more replies than the socket holds: the daemon stops reading this
        # client while its replies wait, serves others meanwhile, and answers
        # every request once the client reads.
        d = self.daemon()
        h.load_ok(self, d, h.checkpoint("qwen"))
        c = self.raw(d)
        n = 3000
        blob = "".join(json.dumps({"id": i, "op": "info", "args": {"name": "qwen"}}) + "\n" for i in range(n))
        sender = threading.Thread(target=lambda: c.sock.sendall(blob.encode()))
        c.sock.settimeout(h.T(60))
        sender.start()
        try:
            time.sleep(0.3)
            self.assert_list_answers_quickly(d)
            ids = []
            for _ in range(n):
                m = c.recv(timeout=h.T(30))
                self.assertIsNotNone(m, "closed after %d replies" % len(ids))
                self.assertTrue(m["ok"], m)
                ids.append(m["id"])
        finally:
            sender.join(h.T(60))
        self.assertEqual(ids, list(range(n)))
        self.assertTrue(c.request("list")["ok"])

    def test_blank_lines_are_allowed(self):
        d = self.daemon()
        c = self.raw(d, hello=False)
        c.send(b"\n\n\r\n")
        r = c.hello()
        # "\r" alone is not a message; an error reply for it is acceptable, then hello works
        while r.get("id") is None:
            r = c.recv()
        self.assertTrue(r["ok"])

    def test_the_fuzz_corpus_replayed_against_the_daemon(self):
        """Each input of tests/fuzz/corpus/proto (fuzz_proto.c) as one
        connection's bytes: every line answered with one JSON object per line,
        and the daemon still serving afterwards; an input that asks for a
        shutdown may end it, in order."""
        corpus = os.path.join(h.REPO, "tests", "fuzz", "corpus", "proto")
        d = self.daemon()
        for name in sorted(os.listdir(corpus)):
            with open(os.path.join(corpus, name), "rb") as f:
                data = f.read()
            with self.subTest(input=name):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(h.T(10))
                s.connect(d.sock)
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                got = b""
                while True:
                    chunk = s.recv(1 << 16)
                    if not chunk:
                        break
                    got += chunk
                s.close()
                for line in got.splitlines():
                    self.assertIsInstance(json.loads(line), dict)
                if not d.running():
                    self.assertIn(b"shutdown", data)
                    self.assertEqual(d.wait(), 0)
                    d = self.daemon()
        self.assert_list_answers_quickly(d)


class DescriptorPassing(h.E2ETestCase):

    def test_descriptors_sent_to_the_daemon_are_not_leaked(self):
        d = self.daemon()
        h.load_ok(self, d, h.checkpoint("small"))
        with h.RawClient(d.sock, hello=True):
            pass
        h.wait_until(lambda: d.stats()["connections"] == 1, h.T(10), what="connections to settle")
        # the count with no client but the one stats uses
        base = h.fd_count(d.pid)
        files = [open(os.devnull, "rb") for _ in range(8)]
        r, w = os.pipe()
        try:
            fds = [f.fileno() for f in files] + [r, w]
            for _ in range(3):
                c = h.RawClient(d.sock)
                # on hello, on a request, on garbage, split over a line, and with no newline at all
                c.send_fds(json.dumps({"id": 1, "op": "hello", "args": {"version": "1.0"}}) + "\n", fds)
                self.assertTrue(c.recv()["ok"])
                c.send_fds(json.dumps({"id": 2, "op": "list"}) + "\n", fds[:3])
                self.assertTrue(c.recv()["ok"])
                c.send_fds("garbage\n", fds[:1])
                self.assertFalse(c.recv()["ok"])
                c.send_fds('{"id": 3, ', fds)
                c.send_fds('"op": "stats"}\n', fds)
                self.assertTrue(c.recv()["ok"])
                # as many descriptors as the kernel lets a message carry, in
                # three messages at once: closed as they come, never refused
                many = [os.dup(fds[0]) for _ in range(253)]
                try:
                    for rid in (4, 5, 6):
                        c.send_fds(json.dumps({"id": rid, "op": "list"}) + "\n", many)
                finally:
                    for fd in many:
                        os.close(fd)
                self.assertEqual([c.recv()["id"] for _ in range(3)], [4, 5, 6])
                during = h.fd_count(d.pid)
                c.send_fds('{"id": 5, "op": "list"', fds)  # left unfinished
                c.close()
            h.wait_until(lambda: d.stats()["connections"] == 1, h.T(10), what="connections to close")
            h.wait_until(lambda: h.fd_count(d.pid) == base, h.T(10),
                         what="the daemon's descriptor count to return to %d (now %d, during %d)" %
                         (base, h.fd_count(d.pid), during))
        finally:
            for f in files:
                f.close()
            os.close(r)
            os.close(w)
        self.assertEqual(d.ctl("verify", "small").rc, 0)
