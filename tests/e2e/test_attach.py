"""attach, detach and leases on the host backend: real daemons, real
worker processes (tests/e2e/worker.py through the Python client and
libweightd-client, weightctl attach, raw sockets), real files.

What the workers see is checked against the checkpoint's files byte for
byte; what the daemon holds is checked through its own descriptor count,
list and leases."""

import array
import fcntl
import json
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import unittest

from . import harness as h

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
LIB = os.path.join(h.BUILD, "libweightd-client.so.0")


def python_with(module):
    """A python3 that imports module: this one, else Debian's (which has
    python3-numpy and python3-torch from scripts/bootstrap)."""
    for exe in (sys.executable, "/usr/bin/python3"):
        if exe and os.access(exe, os.X_OK) and subprocess.run([exe, "-c", "import " + module],
                                                               capture_output=True).returncode == 0:
            return exe
    return None


def worker_env():
    return dict(h.client_lib_env(), PYTHONUNBUFFERED="1")


def run_worker(tc, d, *args, python=None, timeout=None, expect_rc=0):
    cmd = [python or sys.executable, WORKER, d.sock] + [str(a) for a in args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout or h.T(120),
                       env=h.child_env(worker_env()), start_new_session=True)
    if expect_rc is not None:
        tc.assertEqual(p.returncode, expect_rc, "%s\nstdout:\n%s\nstderr:\n%s" % (" ".join(cmd), p.stdout,
                                                                                  p.stderr[-4000:]))
    return p


def worker_json(tc, d, *args, **kw):
    p = run_worker(tc, d, *args, **kw)
    return json.loads(p.stdout.strip().splitlines()[-1])


def start_worker(tc, d, *args):
    p = subprocess.Popen([sys.executable, WORKER, d.sock] + [str(a) for a in args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=h.child_env(worker_env()), start_new_session=True)

    def reap():
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)
    tc.addCleanup(reap)
    return p


class StdinWorker:
    """worker.py COMMAND NAME (ride, sleeper): a worker process that prints
    READY LEASE once attached, then answers each line on its stdin with one
    JSON line."""

    def __init__(self, tc, d, command, name):
        self.p = subprocess.Popen([sys.executable, WORKER, d.sock, command, name], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=h.child_env(worker_env()), start_new_session=True)
        tc.addCleanup(self.kill)
        line = self.p.stdout.readline()
        if not line.startswith("READY"):
            self.kill()
            tc.fail("the worker did not attach: %r %s" % (line, self.p.stderr.read()))
        self.lease = int(line.split()[1])

    def ask(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def status(self):
        return self.ask("status")

    def wait(self, predicate, timeout=30, stop=None, context=""):
        """The first status for which predicate holds (or stop gives up)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if predicate(st):
                return st
            if time.monotonic() > deadline or (stop and stop(st)):
                raise AssertionError("the worker never got there: %r%s" % (st, context))
            time.sleep(0.05)

    def quit(self):
        out = self.ask("quit")
        self.p.wait(timeout=30)
        return out

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.communicate(timeout=30)


def wait_ready(tc, p):
    line = p.stdout.readline()
    tc.assertTrue(line.startswith("READY"), "the worker did not attach: %r %s" % (line, p.stderr.read()
                                                                                  if p.poll() is not None else ""))
    return int(line.split()[1])


class RawAttach:
    """The protocol by hand, keeping each message's descriptors with it."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(h.T(20))
        self.sock.connect(path)
        self.buf = b""
        self.fds = []
        self.next_id = 1
        assert self.request("hello", {"version": "1.0"})[-1]["ok"]

    def close(self):
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.sock.close()

    def send(self, op, args):
        rid = self.next_id
        self.next_id += 1
        self.sock.sendall(json.dumps({"id": rid, "op": op, "args": args}).encode() + b"\n")
        return rid

    def message(self):
        """(message, descriptors that came with it)."""
        while b"\n" not in self.buf:
            fds = array.array("i")
            data, anc, flags, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(253 * fds.itemsize))
            assert not flags & socket.MSG_CTRUNC
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            self.fds += list(fds)
            if not data:
                raise ConnectionError("closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        msg = json.loads(line)
        n = len(msg["descriptors"]) if "descriptors" in msg else 0
        got, self.fds = self.fds[:n], self.fds[n:]
        return msg, got

    def request(self, op, args):
        """Every message of one request, its reply last, with their descriptors."""
        rid = self.send(op, args)
        out = []
        while True:
            m, fds = self.message()
            out.append((m, fds))
            if m.get("id") == rid and "event" not in m:
                return [x[0] for x in out] if op != "attach" else out


class Attach(h.E2ETestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.small = h.checkpoint("small")    # gpt-oss, 22 tensors, fused experts [2, ...]
        cls.medium = h.checkpoint("medium")
        cls.qwen = h.checkpoint("qwen")      # a tensor per expert

    def raw_attach(self, d):
        c = RawAttach(d.sock)
        self.addCleanup(c.close)
        return c

    def loaded(self, *args, path=None, name="m", load=(), **kw):
        d = self.daemon(*args, **kw)
        h.load_ok(self, d, path or self.small, "--name", name, *load)
        return d

    # ---- the protocol --------------------------------------------------------------

    def test_the_stream_its_descriptors_and_what_they_map(self):
        d = self.loaded()
        c = self.raw_attach(d)
        msgs = c.request("attach", {"name": "m"})
        first, reply = msgs[0][0], msgs[-1][0]
        self.assertTrue(reply["ok"], reply)
        res = reply["result"]
        self.assertEqual((first["event"], first["handle_type"], first["writable"]), ("attach", "memfd", False))
        self.assertEqual(first["devices"], [{"device": 0, "uuid": "host-0"}])
        self.assertEqual((res["lease"], res["handle_type"], res["messages"]), (first["lease"], "memfd", len(msgs) - 1))
        descs, handles, tensors, fds = [], [], [], []
        for m, got in msgs[1:-1]:
            self.assertEqual(m["lease"], res["lease"])
            descs += m.get("descriptors", [])
            handles += m.get("handles", [])
            tensors += m.get("tensors", [])
            self.assertEqual(len(got), len(m.get("descriptors", [])), "each message brings its own descriptors")
            fds += got
        self.assertEqual((len(descs), len(handles), len(tensors)), (res["descriptors"], res["handles"], res["tensors"]))
        self.assertEqual(len(tensors), 22)
        self.assertEqual(res["parts"], sum(len(t["parts"]) for t in tensors))
        # read-only descriptors: not even a shared writable mapping of them
        for fd in fds:
            self.assertEqual(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE, os.O_RDONLY)
            with self.assertRaises(PermissionError):
                mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # every part, mapped from its handle's pieces, is the file's bytes
        files = h.tensors_of(self.small)
        by_id = {hd["handle"]: hd for hd in handles}
        for t in tensors:
            self.assertEqual((t["dtype"], t["shape"], t["bytes"]), files[t["name"]])
            (p,) = t["parts"]
            self.assertEqual((p["device"], p["tensor_offset"], p["bytes"]), (0, 0, t["bytes"]))
            self.assertEqual(p["offset"] % 512, 0, "parts start at 512-byte boundaries")
            hd = by_id[p["handle"]]
            (pc,) = [pc for pc in hd["pieces"] if pc["at"] <= p["offset"] < pc["at"] + pc["bytes"]]
            start = pc["offset"] + p["offset"] - pc["at"]
            page = start // mmap.PAGESIZE * mmap.PAGESIZE
            with mmap.mmap(fds[pc["descriptor"]], start - page + p["bytes"], mmap.MAP_SHARED, mmap.PROT_READ,
                           offset=page) as mm:
                got = mm[start - page:start - page + p["bytes"]]
            self.assertEqual(got, read_tensor(self.small, t["name"]), t["name"])
        leases = d.ctl_json("leases").json["leases"]
        self.assertEqual([(l["lease"], l["model"], l["pid"], l["process"]) for l in leases],
                         [(res["lease"], "m", os.getpid(), proc_name(os.getpid()))])
        self.assertEqual(c.request("detach", {"lease": res["lease"]})[-1]["result"], {"lease": res["lease"], "name": "m"})
        self.assertEqual(d.ctl_json("leases").json["leases"], [])

    def test_bad_arguments_get_errors_and_the_connection_stays(self):
        d = self.loaded("--read-threads", "1", devices=2)
        c = self.raw(d)
        for args, code in (({}, "EINVAL"), ({"name": 5}, "EINVAL"), ({"name": "nope"}, "ENOENT"),
                           ({"name": "m", "writable": "yes"}, "EINVAL"), ({"name": "m", "writable": True}, "EPERM"),
                           ({"name": "m", "device": 7}, "ENODEV"), ({"name": "m", "device": "GPU-none"}, "ENODEV"),
                           ({"name": "m", "device": 1}, "ENODEV"), ({"name": "m", "device": -1}, "EINVAL"),
                           ({"name": "m", "device": [0]}, "EINVAL")):
            r = c.request("attach", args)
            h.assert_error_reply(self, r, code, r["id"])
        for args, code in (({}, "EINVAL"), ({"lease": "x"}, "EINVAL"), ({"lease": 1.5}, "EINVAL"),
                           ({"lease": 999}, "ENOENT"), ({"lease": -3}, "EINVAL")):
            h.assert_error_reply(self, c.request("detach", args), code, None, check_id=False)
        # a lease is its connection's own: another's cannot detach it
        other = self.raw_attach(d)
        lease = other.request("attach", {"name": "m"})[-1][0]["result"]["lease"]
        h.assert_error_reply(self, c.request("detach", {"lease": lease}), "ENOENT", None, check_id=False)
        self.assertEqual(len(d.ctl_json("leases").json["leases"]), 1)
        # a model still loading: EAGAIN, and attach once it is ready
        c.send_request("load", {"path": h.checkpoint("big"), "name": "big"}, id="load", events=True)
        while c.recv()["event"] != "progress":
            pass
        h.assert_error_reply(self, c.request("attach", {"name": "big"}, id="a"), "EAGAIN", "a")
        self.assertTrue(c.reply_to("load", timeout=h.T(120))["ok"])
        self.assertTrue(c.request("list")["ok"], "the connection is still usable")
        self.assertEqual(run_ctl_ok(self, d, "attach", "big", "--verify").rc, 0)

    def test_a_daemon_that_allows_writable_mappings(self):
        d = self.loaded()
        r = d.ctl_json("attach", "m", "--writable")
        self.assertJsonError(r, "EPERM")
        self.assertIn("attach_writable", r.json["error"]["message"])
        d2 = self.loaded("--attach-writable", "on", sock=os.path.join(self.tmp, "w.sock"))
        c = self.raw_attach(d2)
        msgs = c.request("attach", {"name": "m", "writable": True})
        fds = [fd for _, got in msgs for fd in got]
        self.assertTrue(msgs[-1][0]["result"]["writable"])
        self.assertEqual(fcntl.fcntl(fds[0], fcntl.F_GETFL) & os.O_ACCMODE, os.O_RDWR)
        # a write through it is the daemon's memory: verify sees it
        tensors = [t for m, _ in msgs for t in m.get("tensors", [])]
        p = tensors[0]["parts"][0]
        hd = [hd for m, _ in msgs for hd in m.get("handles", []) if hd["handle"] == p["handle"]][0]
        pc = hd["pieces"][0]
        with mmap.mmap(fds[pc["descriptor"]], pc["bytes"], mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                       offset=pc["offset"]) as mm:
            at = p["offset"] - pc["at"]
            mm[at] = (mm[at] + 1) % 256
        r = d2.ctl_json("verify", "m")
        self.assertEqual(r.rc, 1, r)
        self.assertEqual(r.json["mismatched_tensors"], 1)

    # ---- workers ---------------------------------------------------------------------

    def test_several_workers_at_once_see_every_byte_while_the_daemon_serves_others(self):
        d = self.loaded(path=self.medium, capacity="2GiB")
        procs = [subprocess.Popen([sys.executable, WORKER, d.sock, "verify", "m", self.medium, "--framework",
                                   "memoryview"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=h.child_env(worker_env())) for _ in range(4)]
        served = 0
        while any(p.poll() is None for p in procs):
            self.assertEqual(d.ctl("list").rc, 0)
            served += 1
        for p in procs:
            out, err = p.communicate()
            self.assertEqual(p.returncode, 0, err)
            res = json.loads(out.splitlines()[-1])
            self.assertEqual((res["tensors"], res["missing"], res["framework"]), (41, [], "memoryview"))
        self.assertGreater(served, 0)
        self.assertEqual(d.ctl_json("leases").json["leases"], [])

    def test_a_worker_killed_mid_attach_leaves_no_lease_and_no_descriptor(self):
        # The table in many messages (a slab per tensor, on classic segments):
        # the worker dies with some descriptors in hand and the rest queued.
        d = self.loaded("--slab-size", "1", "--load-alloc-conf", "max_split_size_mb:20", path=self.qwen)
        base = h.settled_fds(d)
        script = ("import socket, sys, os, signal\n"
                  "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
                  "s.sendall(b'{\"id\":1,\"op\":\"hello\",\"args\":{\"version\":\"1.0\"}}\\n"
                  "{\"id\":2,\"op\":\"attach\",\"args\":{\"name\":\"m\"}}\\n')\n"
                  "got = 0\n"
                  "while got == 0:\n"
                  "    data, fds, _, _ = socket.recv_fds(s, 4096, 253)\n"
                  "    got += len(fds)\n"
                  "print(got, flush=True)\n"
                  "os.kill(os.getpid(), signal.SIGKILL)\n")
        p = subprocess.run([sys.executable, "-c", script, d.sock], capture_output=True, text=True, timeout=h.T(30))
        self.assertEqual(p.returncode, -signal.SIGKILL, p.stderr)
        self.assertGreater(int(p.stdout), 0, "it died holding descriptors")
        h.wait_until(lambda: d.ctl_json("leases").json["leases"] == [], h.T(10), what="the lease to end")
        h.wait_until(lambda: h.fd_count(d.pid) == base, h.T(10), what="the daemon's descriptors to return")
        self.assertEqual(d.ctl("unload", "m").rc, 0)

    def test_a_worker_killed_while_attached_leaves_no_lease(self):
        d = self.loaded()
        p = start_worker(self, d, "hold", "m")
        lease = wait_ready(self, p)
        models = d.models()
        self.assertEqual([(l["lease"], l["pid"], l["process"]) for l in models[0]["leases"]],
                         [(lease, p.pid, proc_name(p.pid))])
        self.assertGreaterEqual(models[0]["leases"][0]["age"], 0)
        r = d.ctl_json("unload", "m")
        self.assertJsonError(r, "EBUSY")
        self.assertIn("pid %d (%s" % (p.pid, proc_name(p.pid)), r.json["error"]["message"])
        self.assertIn("lease %d" % lease, r.json["error"]["message"])
        os.kill(p.pid, signal.SIGKILL)
        h.wait_until(lambda: d.models()[0]["leases"] == [], h.T(10), what="the lease to end")
        self.assertEqual(d.ctl("unload", "m").rc, 0, "allowed once the holder is gone")

    def test_a_lease_ends_with_its_process_even_if_a_child_keeps_the_socket(self):
        try:
            os.close(os.pidfd_open(os.getpid()))
        except (AttributeError, OSError) as e:
            self.skipTest("no pidfds here (%s): the connection's close is the only sign" % e)
        d = self.loaded()
        script = ("import socket, sys, os, time\n"
                  "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
                  "s.sendall(b'{\"id\":1,\"op\":\"hello\",\"args\":{\"version\":\"1.0\"}}\\n"
                  "{\"id\":2,\"op\":\"attach\",\"args\":{\"name\":\"m\"}}\\n')\n"
                  "buf = b''\n"
                  "while buf.count(b'\\n') < 2 or b'\"ok\":true,\"result\":{\"lease\"' not in buf:\n"
                  "    buf += s.recv(1 << 20)\n"
                  "child = os.fork()\n"
                  "if child == 0:\n"
                  "    os.close(1); os.close(2)\n"
                  "    time.sleep(60)\n"
                  "    os._exit(0)\n"
                  "print(child, flush=True)\n")
        p = subprocess.run([sys.executable, "-c", script, d.sock], capture_output=True, text=True, timeout=h.T(30))
        self.assertEqual(p.returncode, 0, p.stderr)
        child = int(p.stdout)
        self.addCleanup(os.kill, child, signal.SIGKILL)
        os.kill(child, 0)  # alive, with the connection
        # the attaching process is gone; its child still holds the connection
        h.wait_until(lambda: d.ctl_json("leases").json["leases"] == [], h.T(10), what="the lease to end")
        self.assertIn("its process exited", d.log())
        self.assertEqual(d.ctl("unload", "m").rc, 0)

    def test_300_attach_detach_cycles_leave_descriptor_counts_as_they_were(self):
        d = self.loaded()
        base = h.settled_fds(d)
        res = worker_json(self, d, "cycles", "m", 300, timeout=h.T(300))
        self.assertEqual(res["after"], res["before"], "the worker's descriptors")
        self.assertEqual(res["leases"], 0)
        h.wait_until(lambda: h.fd_count(d.pid) == base, h.T(10), what="the daemon's descriptors to return")
        self.assertEqual(d.ctl_json("leases").json["leases"], [], "every one of the 300 leases ended")

    def test_unload_force_revokes_and_waits_for_holders(self):
        d = self.loaded()
        holder = self.ctl_bg(d.sock, "attach", "m", "--hold", "120")
        h.wait_until(lambda: d.ctl_json("leases").json["leases"], h.T(10), what="the holder")
        # Success means the holder detached when asked: the wait would end in EBUSY.
        r = d.ctl("unload", "m", "--force", "--wait", "60")
        self.assertEqual(r.rc, 0, r)
        out = holder.finish()
        self.assertEqual(out.rc, 0, out)
        self.assertIn("revoked by the daemon (unload): detached", out.out)
        self.assertEqual(d.models(), [])
        # one that does not answer: refused after the wait, holders named, model kept
        h.load_ok(self, d, self.small, "--name", "m")
        c = self.raw_attach(d)
        lease = c.request("attach", {"name": "m"})[-1][0]["result"]["lease"]
        r = d.ctl_json("unload", "m", "--force", "--wait", "1")
        self.assertJsonError(r, "EBUSY")
        self.assertIn("lease %d" % lease, r.json["error"]["message"])
        m, _ = c.message()
        self.assertEqual((m["event"], m["lease"], m["name"], m["reason"]), ("revoke", lease, "m", "unload"))
        self.assertEqual(d.models()[0]["state"], "ready")
        self.assertEqual(run_ctl_ok(self, d, "attach", "m", "--verify").rc, 0)

    def test_a_python_worker_that_closes_on_revoke(self):
        d = self.loaded()
        p = start_worker(self, d, "hold", "m", "--close-on-revoke", "1")
        wait_ready(self, p)
        r = d.ctl("unload", "m", "--force", "--wait", "60")
        self.assertEqual(r.rc, 0, r)
        out, err = p.communicate(timeout=h.T(30))
        self.assertEqual(p.returncode, 0, err)
        res = json.loads(out.strip().splitlines()[-1])
        self.assertEqual(res, {"revoked": "unload", "fileno": "the attachment is closed", "parts_kept": True,
                               "leases": 0})

    def test_a_shutdown_tells_holders(self):
        d = self.loaded()
        holder = self.ctl_bg(d.sock, "attach", "m", "--hold", "120")
        h.wait_until(lambda: d.ctl_json("leases").json["leases"], h.T(10), what="the holder")
        self.assertEqual(d.ctl("shutdown").rc, 0)
        out = holder.finish()
        self.assertIn("revoked by the daemon (shutdown)", out.out)
        self.assertClean(d, d.wait())

    # ---- what workers get --------------------------------------------------------------

    def test_read_only_mappings_fault_in_the_worker_alone(self):
        python = python_with("numpy")
        self.assertIsNotNone(python, "no python3 with numpy: scripts/bootstrap installs python3-numpy")
        d = self.loaded()
        p = run_worker(self, d, "write", "m", python=python, expect_rc=-signal.SIGSEGV)
        first = json.loads(p.stdout.splitlines()[0])
        self.assertEqual((first["numpy_refused"], first["writeable"]), (True, False))
        self.assertNotIn("wrote", p.stdout)
        self.assertEqual(d.ctl("verify", "m").rc, 0, "nothing changed in the daemon")
        h.wait_until(lambda: d.ctl_json("leases").json["leases"] == [], h.T(10), what="the lease to end")

    def test_numpy_arrays(self):
        python = python_with("numpy")
        self.assertIsNotNone(python, "no python3 with numpy: scripts/bootstrap installs python3-numpy")
        d = self.loaded()
        res = worker_json(self, d, "verify", "m", self.small, "--framework", "numpy", python=python)
        self.assertEqual((res["tensors"], res["framework"], res["missing"]), (22, "numpy", []))

    def test_torch_tensors_on_the_host_backend(self):
        python = python_with("torch")
        self.assertIsNotNone(python, "no python3 with torch: scripts/bootstrap installs python3-torch")
        path = os.path.join(self.tmp, "linear.safetensors")
        write_linear(path)
        d = self.daemon()
        h.load_ok(self, d, self.small, "--name", "m")
        h.load_ok(self, d, path, "--name", "lin")
        res = worker_json(self, d, "torch", "m", self.small, python=python)
        self.assertEqual(res["tensors"], 22)
        self.assertEqual(res["device"], "cpu")
        self.assertEqual(res["dtypes"]["BF16"], ["torch.bfloat16", True])
        self.assertEqual(res["dtypes"]["U8"], ["torch.uint8", True], "MXFP4 blocks stay bytes")
        e8m0 = res["dtypes"]["F8_E8M0"]
        self.assertIn(e8m0[0], ("torch.float8_e8m0fnu", "torch.uint8"), "the scales, as this torch can hold them")
        self.assertTrue(e8m0[1], "and their shape")
        res = worker_json(self, d, "torch", "lin", path, python=python)
        self.assertEqual(res["linear"], LINEAR_EXPECTED)
        if "module" in res:  # torch 2.1 and later: load_state_dict(assign=True)
            self.assertEqual((res["module"], res["module_zero_copy"]), (LINEAR_EXPECTED, True))

    def test_expert_parallel_a_worker_per_device(self):
        d = self.loaded(devices=2, load=("--devices", "0,1", "--placement", "expert-parallel"))
        for dev in (0, 1):
            res = worker_json(self, d, "verify", "m", self.small, "--framework", "memoryview", "--device", dev)
            self.assertEqual([x["device"] for x in res["devices"]], [dev])
            self.assertEqual(res["tensors"], 22, "every tensor has this device's rows")
            # fused [2, ...] expert tensors: one row on each device
            self.assertTrue(res["rows"])
            self.assertTrue(all(r == [dev, 1] for r in res["rows"].values()), res["rows"])
        p = run_worker(self, d, "verify", "m", self.small, "--framework", "memoryview", expect_rc=1)
        self.assertIn("EINVAL", p.stderr)
        self.assertIn("attach one of them", p.stderr)
        r = run_ctl_ok(self, d, "attach", "m", "--verify")
        self.assertIn("verified: every part matches", r.out)
        r = run_ctl_ok(self, d, "attach", "m", "--device", "host-1", "--verify")
        self.assertIn("verified", r.out)

    # ---- scale ----------------------------------------------------------------------------

    def test_a_table_larger_than_a_message(self):
        # Qwen3-235B-A22B's count of tensors (94 layers, 128 experts, 3 each),
        # 16 bytes apiece: the table alone is several messages.
        path = os.path.join(self.tmp, "many.safetensors")
        names = ["model.layers.%d.mlp.experts.%d.%s.weight" % (l, e, w) for l in range(94) for e in range(128)
                 for w in ("gate_proj", "up_proj", "down_proj")]
        write_tensors(path, names, 16)
        d = self.daemon()
        h.load_ok(self, d, path, "--name", "many")
        r = run_ctl_ok(self, d, "attach", "many", "--verify", json_mode=True)
        res = r.json
        self.assertEqual((res["tensors"], res["match"], res["handles"]), (len(names), True, 1))
        self.assertGreater(res["messages"], 8, "the tensors came in pages")

    def test_descriptors_batched_past_the_kernels_limit(self):
        # 260 tensors of 10 MiB, each its own slab and its own segment (classic
        # segments): 260 descriptors, more than one message may carry.
        path = os.path.join(self.tmp, "wide.safetensors")
        write_tensors(path, ["w%03d" % i for i in range(260)], 10 << 20, sparse=True)
        d = self.daemon("--slab-size", "1", "--load-alloc-conf", "max_split_size_mb:20")
        h.load_ok(self, d, path, "--name", "wide")
        c = self.raw_attach(d)
        msgs = c.request("attach", {"name": "wide"})
        batches = [len(got) for m, got in msgs if m.get("descriptors")]
        self.assertEqual(sum(batches), 260)
        self.assertEqual(batches, [253, 7])
        for _, got in msgs:
            for fd in got:
                os.close(fd)
        r = run_ctl_ok(self, d, "attach", "wide", "--verify", json_mode=True)
        self.assertEqual((r.json["descriptors"], r.json["handles"], r.json["match"]), (260, 260, True))


class HostilePeers(h.E2ETestCase):
    """Peers that attach and then misbehave; each case crashed, leaked or
    leaked through before its fix (the sanitizer build catches the memory
    errors)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.small = h.checkpoint("small")

    def loaded(self, *args, **kw):
        d = self.daemon(*args, **kw)
        h.load_ok(self, d, self.small, "--name", "m")
        return d

    def test_a_detach_whose_reply_cannot_be_sent(self):
        # The reply's failed send closed the connection, which ended the
        # lease that detach then ended again.
        d = self.loaded()
        for how in ("close", "shut"):
            c = RawAttach(d.sock)
            lease = c.request("attach", {"name": "m"})[-1][0]["result"]["lease"]
            c.send("detach", {"lease": lease})
            if how == "shut":
                c.sock.shutdown(socket.SHUT_RD)
            c.close()
        h.wait_until(lambda: d.ctl_json("leases").json["leases"] == [], h.T(10), what="the leases to end")
        self.assertEqual(d.ctl("unload", "m").rc, 0)

    def test_a_revoke_reaches_every_holder(self):
        # 5 connections of 64 leases each: more than the 256 a fixed array held.
        d = self.loaded()
        conns = []
        for _ in range(5):
            c = RawAttach(d.sock)
            self.addCleanup(c.close)
            for _ in range(64):
                msgs = c.request("attach", {"name": "m"})
                self.assertTrue(msgs[-1][0]["ok"])
                for _, fds in msgs:
                    for fd in fds:
                        os.close(fd)
            conns.append(c)
        r = d.ctl_json("unload", "m", "--force", "--wait", "1")
        self.assertJsonError(r, "EBUSY")
        revoked = 0
        for c in conns:
            for _ in range(64):
                m, _ = c.message()
                revoked += m.get("event") == "revoke"
        self.assertEqual(revoked, 320)

    @unittest.skipUnless(os.geteuid() == 0, "needs root, to hand a descriptor to another user")
    def test_another_user_cannot_reopen_a_read_only_descriptor(self):
        # A memfd is mode 0777 unless told otherwise: any holder could open
        # /proc/self/fd/N read-write and change the daemon's copy.
        d = self.loaded()
        c = self.raw_attach_fds(d)
        fd = c[0]
        child = os.fork()
        if child == 0:
            try:
                os.setgid(65534)
                os.setuid(65534)
                for mode in (os.O_RDWR, os.O_RDONLY):
                    try:
                        os.close(os.open("/proc/self/fd/%d" % fd, mode))
                        os._exit(1)
                    except PermissionError:
                        pass
                os._exit(0)
            except BaseException:
                os._exit(2)
        self.assertEqual(os.waitpid(child, 0)[1], 0, "the other user reopened the descriptor")
        self.assertEqual(d.ctl("verify", "m").rc, 0)

    def raw_attach_fds(self, d):
        c = RawAttach(d.sock)
        self.addCleanup(c.close)
        msgs = c.request("attach", {"name": "m"})
        fds = [fd for _, got in msgs for fd in got]
        c.fds += fds  # closed with the client
        return fds

    def test_a_worker_gets_descriptors_of_its_allocations_alone(self):
        # One memfd for a whole expandable range let a reader commit memory
        # in its holes; now each physical allocation is its own memfd.
        d = self.loaded()
        c = RawAttach(d.sock)
        self.addCleanup(c.close)
        msgs = c.request("attach", {"name": "m"})
        fds = [fd for _, got in msgs for fd in got]
        c.fds += fds
        descs = [x for m, _ in msgs for x in m.get("descriptors", [])]
        pieces = [p for m, _ in msgs for hd in m.get("handles", []) for p in hd["pieces"]]
        for p in pieces:
            size = os.fstat(fds[p["descriptor"]]).st_size
            self.assertEqual((p["offset"], p["bytes"]), (0, size), "a piece is its whole descriptor")
        for x in descs:
            self.assertEqual(os.fstat(fds[x["descriptor"]]).st_size, x["bytes"])
        reserved = d.device(0)["reserved_bytes"]["current"]
        self.assertLessEqual(sum(os.fstat(fd).st_size for fd in fds), reserved, "nothing beyond what is reserved")

    def test_a_client_that_does_not_read_cannot_make_the_daemon_hold_descriptors(self):
        # attach/detach pairs, never read: each queued attach held duplicates
        # of the model's descriptors, without bound.
        d = self.loaded("--slab-size", "4MiB", "--load-alloc-conf", "max_split_size_mb:20")
        per_attach = d.ctl_json("attach", "m").json["descriptors"]
        self.assertGreater(per_attach, 4)
        base = h.settled_fds(d)
        first = max([0] + [l["lease"] for l in d.ctl_json("leases").json["leases"]]) + 2
        c = RawAttach(d.sock)
        self.addCleanup(c.close)
        c.sock.setblocking(False)
        out = b"".join(json.dumps({"id": 1, "op": "attach", "args": {"name": "m"}}).encode() + b"\n" +
                       json.dumps({"id": 2, "op": "detach", "args": {"lease": first + i}}).encode() + b"\n"
                       for i in range(600))
        try:
            c.sock.send(out)
        except BlockingIOError:
            pass
        time_limit = h.T(5)
        h.wait_until(lambda: h.fd_count(d.pid) > base + 100, time_limit, what="the daemon to start answering")
        held = max(h.fd_count(d.pid) for _ in range(20))
        self.assertLess(held - base, 256 + 2 * per_attach + 20, "descriptors queued for one client are bounded")
        self.assertEqual(d.ctl("list").rc, 0, "and the daemon serves others")


# ---- helpers --------------------------------------------------------------------------

LINEAR_W = [[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]]
LINEAR_B = [0.125, -2.0]
LINEAR_EXPECTED = [sum(w * x for w, x in zip(row, range(3))) + b for row, b in zip(LINEAR_W, LINEAR_B)]


def write_linear(path):
    w = struct.pack("<6f", *[v for row in LINEAR_W for v in row])
    b = struct.pack("<2f", *LINEAR_B)
    header = {"linear.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "linear.bias": {"dtype": "F32", "shape": [2], "data_offsets": [24, 32]}}
    with open(path, "wb") as f:
        f.write(h.st_image(header, w + b))


def write_tensors(path, names, nbytes, sparse=False):
    """One U8 tensor of nbytes per name: bytes from its index, or holes."""
    header = {n: {"dtype": "U8", "shape": [nbytes], "data_offsets": [i * nbytes, (i + 1) * nbytes]}
              for i, n in enumerate(names)}
    with open(path, "wb") as f:
        f.write(h.st_image(header))
        if sparse:
            f.truncate(f.tell() + nbytes * len(names))
            for i in range(len(names)):  # a byte of each, so that a mix-up shows
                f.seek(len(h.st_image(header)) + i * nbytes)
                f.write(bytes([i % 251 + 1]))
        else:
            f.write(b"".join(struct.pack("<I", i) * (nbytes // 4) for i in range(len(names))))


def read_tensor(path, name):
    for shard in h.shard_files(path):
        header, base = h.read_header(shard)
        if name in header:
            b, e = header[name]["data_offsets"]
            with open(shard, "rb") as f:
                f.seek(base + b)
                return f.read(e - b)
    raise KeyError(name)


def proc_name(pid):
    with open("/proc/%d/comm" % pid) as f:
        return f.read().strip()


def run_ctl_ok(tc, d, *args, json_mode=False):
    r = h.run_ctl(d.sock, *args, json_mode=json_mode, timeout=h.T(120))
    tc.assertEqual(r.rc, 0, r)
    return r
