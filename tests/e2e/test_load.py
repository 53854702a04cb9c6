"""weightctl load: the forms of PATH, default names, progress on a pipe and
on a terminal, loads that do not fit, duplicate names, bad devices, missing
and corrupt checkpoints, and that a failed load gives back everything."""

import errno
import os
import pty
import re
import select
import shutil
import subprocess
import time

from . import harness as h


class LoadForms(h.E2ETestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.small = h.checkpoint("small")
        cls.mixtral = h.checkpoint("mixtral")
        cls.qwen = h.checkpoint("qwen")

    def model(self, d, name):
        for m in d.models():
            if m["name"] == name:
                return m
        self.fail("no model %r in %r" % (name, d.models()))

    def test_directory_index_and_single_file(self):
        d = self.daemon(capacity="2GiB")
        # a folder: the model is named after it
        r = h.load_ok(self, d, self.small)
        self.assertRegex(r.out, r"^loaded small: 22 tensors in 6 shards, [\d.]+ MiB in [\d.]+ s \(.*\) on device 0\n$")
        m = self.model(d, "small")
        self.assertEqual((m["state"], m["devices"], m["tensors"], m["shards"]), ("ready", [0], 22, 6))
        self.assertEqual(m["bytes"], h.checkpoint_bytes(self.small))
        self.assertEqual(m["path"], self.small)
        # the index: named after its folder
        index = os.path.join(self.qwen, "model.safetensors.index.json")
        h.load_ok(self, d, index)
        m = self.model(d, "qwen")
        self.assertEqual((m["tensors"], m["shards"]), (24, 9))
        self.assertEqual(m["path"], index)
        # one .safetensors file: named after the file, without ".safetensors"
        shard = h.shard_files(self.mixtral)[0]
        h.load_ok(self, d, shard)
        stem = os.path.basename(shard)[:-len(".safetensors")]
        m = self.model(d, stem)
        self.assertEqual((m["tensors"], m["shards"]), (13, 1))
        # one shard of a sharded checkpoint is a checkpoint of its own
        one = h.shard_files(self.small)[2]
        h.load_ok(self, d, one, "--name", "just-one-shard")
        m = self.model(d, "just-one-shard")
        header, _ = h.read_header(one)
        self.assertEqual(m["tensors"], len([k for k in header if k != "__metadata__"]))
        self.assertEqual(m["shards"], 1)
        self.assertEqual([m["name"] for m in d.models()], ["small", "qwen", stem, "just-one-shard"],
                         "list shows models in the order they came")

    def test_default_names_and_relative_paths(self):
        d = self.daemon(capacity="2GiB")
        base = os.path.join(self.tmp, "models")
        os.makedirs(base)
        # a file with dots in its stem
        shutil.copy(h.shard_files(self.qwen)[0], os.path.join(base, "tiny.v2.safetensors"))
        r = h.run_ctl(d.sock, "load", "tiny.v2.safetensors", cwd=base)
        self.assertEqual(r.rc, 0, r)
        self.assertEqual(self.model(d, "tiny.v2")["path"], os.path.join(base, "tiny.v2.safetensors"),
                         "a relative path is sent as an absolute one")
        # a folder given with a trailing slash, relative, and as "."
        os.symlink(self.small, os.path.join(base, "linked-model"))
        r = h.run_ctl(d.sock, "load", "linked-model/", cwd=base)
        self.assertEqual(r.rc, 0, r)
        self.model(d, "linked-model")
        r = h.run_ctl(d.sock, "load", ".", "--name", "dot", cwd=self.small)
        self.assertEqual(r.rc, 0, r)
        self.assertEqual(self.model(d, "dot")["path"], self.small)
        # --name wins over the default
        r = h.run_ctl(d.sock, "load", self.small, "--name", "Renamed_1.0")
        self.assertEqual(r.rc, 0, r)
        self.model(d, "Renamed_1.0")

    def test_load_through_symlinks_keeps_the_names(self):
        # A Hugging Face cache: snapshots/REV/<name> are symlinks to blobs/<hash>.
        # (found by this test: weightctl resolved the symlink, so the index was
        # read as a safetensors file and failed, and a file got the blob's hash
        # as its name)
        cache = os.path.join(self.tmp, "hub", "models--acme--tiny")
        blobs, snap = os.path.join(cache, "blobs"), os.path.join(cache, "snapshots", "0123abcd")
        os.makedirs(blobs)
        os.makedirs(snap)
        for i, f in enumerate(sorted(os.listdir(self.qwen))):
            blob = os.path.join(blobs, "%040x" % (i + 1))
            os.link(os.path.join(self.qwen, f), blob)
            os.symlink(os.path.relpath(blob, snap), os.path.join(snap, f))
        d = self.daemon(capacity="2GiB")
        index = os.path.join(snap, "model.safetensors.index.json")
        r = h.run_ctl(d.sock, "load", index)
        self.assertEqual(r.rc, 0, r)
        m = self.model(d, "0123abcd")
        self.assertEqual((m["tensors"], m["shards"]), (24, 9))
        first = h.shard_files(snap)[0]
        r = h.run_ctl(d.sock, "load", first)
        self.assertEqual(r.rc, 0, r)
        self.model(d, os.path.basename(first)[:-len(".safetensors")])
        r = h.run_ctl(d.sock, "load", snap, "--name", "snapshot")
        self.assertEqual(r.rc, 0, r)
        self.assertEqual(self.model(d, "snapshot")["tensors"], 24)
        self.assertEqual(d.ctl("verify", "0123abcd").rc, 0)

    def test_json_load(self):
        d = self.daemon(devices=2)
        r = d.ctl_json("load", self.small, "--device", "1", "--name", "js")
        self.assertEqual(r.rc, 0, r)
        o = r.json
        self.assertEqual(o["name"], "js")
        self.assertEqual((o["devices"], o["placement"]), ([1], "replicate"))
        self.assertEqual(o["device_bytes"], o["bytes"])
        self.assertEqual(set(o["phases"]), {"open", "allocate", "read"})
        self.assertTrue(all(v >= 0 for v in o["phases"].values()), o)
        # Allocating runs inside the read phase: open and read make the whole.
        ph = o["phases"]
        self.assertAlmostEqual(ph["open"] + ph["read"], o["seconds"], delta=0.001)
        self.assertLessEqual(ph["allocate"], ph["read"] + 0.001)
        self.assertEqual(o["tensors"], 22)
        self.assertEqual(o["shards"], 6)
        self.assertEqual(o["bytes"], h.checkpoint_bytes(self.small))
        self.assertEqual(o["path"], self.small)
        self.assertIsInstance(o["seconds"], (int, float))
        self.assertEqual(r.err, "", "--json prints no progress")


class Progress(h.E2ETestCase):

    def test_plain_progress_lines_when_stderr_is_not_a_terminal(self):
        d = self.daemon()
        # ~900 MB: long enough for several of the daemon's 200 ms progress ticks
        path = h.checkpoint("big")
        r = d.ctl("load", path, "--name", "m")
        self.assertEqual(r.rc, 0, r)
        lines = r.err.splitlines()
        self.assertTrue(lines, "a 900 MB load shows at least one progress line (events every 200 ms)")
        for line in lines:
            self.assertRegex(line, r"^m: (opening|queued|reading) \d+% \([\d.]+ [KMG]?i?B of [\d.]+ [KMG]?i?B, .*/s\)$")
            self.assertNotIn("\r", line)
            self.assertNotIn("\x1b", line, "no terminal escapes on a pipe")
        self.assertTrue(any(" reading " in l for l in lines), lines)
        percents = [int(m.group(1)) for m in (re.search(r" (\d+)% ", l) for l in lines) if m]
        self.assertEqual(percents, sorted(percents), "progress only goes forward")
        self.assertTrue(all(0 <= p <= 100 for p in percents))

    def test_progress_bar_on_a_terminal(self):
        d = self.daemon()
        path = h.checkpoint("big")
        master, slave = pty.openpty()
        try:
            p = subprocess.Popen(h.ctl_cmd(d.sock, ["load", path]), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=slave, env=h.child_env(), start_new_session=True)
        finally:
            os.close(slave)
        out = b""
        deadline = time.monotonic() + h.T(120)
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 0.5)
                if not ready:
                    if p.poll() is not None:
                        break
                    continue
                try:
                    chunk = os.read(master, 65536)
                except OSError as e:
                    if e.errno == errno.EIO:
                        break
                    raise
                if not chunk:
                    break
                out += chunk
            stdout, _ = p.communicate(timeout=h.T(60))
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            os.close(master)
        text = out.decode(errors="replace")
        h.assert_no_sanitizer(text, "weightctl")
        self.assertEqual(p.returncode, 0, text)
        self.assertIn(b"loaded big", stdout)
        self.assertIn("\r", text)
        self.assertIn("%", text)
        self.assertIn("ETA", text)
        self.assertRegex(text, r"big \[[#.]{30}\] +\d+% ")
        # the bar is cleared at the end: the last thing written is "\r" + erase line
        self.assertTrue(text.endswith("\r\x1b[K"), repr(text[-80:]))


class LoadFailures(h.E2ETestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.small = h.checkpoint("small")
        cls.medium = h.checkpoint("medium")

    def test_load_that_does_not_fit(self):
        d = self.daemon(capacity="200MiB")
        before = h.usage_of(d.device(0))
        self.assertEqual(before["reserved_bytes"], 0)
        r = d.ctl("load", self.medium)
        self.assertEqual(r.rc, 1, r)
        self.assertIn("out of memory", r.err)
        self.assertIn("reserved but unallocated", r.err)
        self.assertIn("device 0", r.err)
        self.assertEqual(r.out, "")
        after = d.device(0)
        self.assertEqual(h.usage_of(after), before, "a failed load gives back everything")
        self.assertEqual(after["reserved_bytes"]["current"], 0)
        self.assertEqual(after["allocated_bytes"]["current"], 0)
        self.assertGreater(after["num_ooms"], 0)
        self.assertEqual(d.models(), [])
        pol = d.stats()["policy"]
        self.assertEqual((pol["current"], pol["depth"], pol["load_policy_active"]), ("default", 0, False))
        # --json: the error object
        j = d.ctl_json("load", self.medium)
        err = self.assertJsonError(j, "ENOMEM")
        self.assertIn("reserved but unallocated", err["message"])
        self.assertEqual(h.usage_of(d.device(0)), before)
        # and the daemon still serves: a model that fits loads
        h.load_ok(self, d, self.small)
        self.assertIn("warning: load of medium failed", d.log())

    def test_failed_load_next_to_a_loaded_model(self):
        d = self.daemon(capacity="300MiB")
        h.load_ok(self, d, self.small)
        before = h.usage_of(d.device(0))
        self.assertGreater(before["reserved_bytes"], 0)
        r = d.ctl("load", self.medium)
        self.assertEqual(r.rc, 1, r)
        self.assertIn("out of memory", r.err)
        self.assertEqual(h.usage_of(d.device(0)), before, "the failed load left something behind")
        self.assertEqual([m["name"] for m in d.models()], ["small"])
        self.assertEqual(d.ctl("verify", "small").rc, 0, "the loaded model is intact")
        self.assertEqual(d.ctl("unload", "small").rc, 0)
        dev = d.device(0)
        self.assertEqual((dev["reserved_bytes"]["current"], dev["allocated_bytes"]["current"]), (0, 0))

    def test_out_of_memory_while_reading(self):
        # 899 MiB: the first 256 MiB are allocated before the reads start, the
        # rest beside them, and the memory runs out there.
        big = h.checkpoint("big")
        d = self.daemon(capacity="600MiB")
        before = h.usage_of(d.device(0))
        r = d.ctl("load", big)
        self.assertEqual(r.rc, 1, r)
        self.assertIn("out of memory", r.err)
        self.assertIn("on device 0", r.err)
        self.assertNotIn("cancelled", r.err)
        self.assertEqual(h.usage_of(d.device(0)), before, "the failed load left something behind")
        self.assertEqual(d.models(), [])
        self.assertEqual(d.stats()["policy"]["depth"], 0)
        h.load_ok(self, d, self.medium)
        self.assertEqual(d.ctl("verify", "medium").rc, 0)

    def test_same_name_twice(self):
        d = self.daemon()
        h.load_ok(self, d, self.small)
        before = h.usage_of(d.device(0))
        r = d.ctl("load", self.small)
        self.assertEqual(r.rc, 1, r)
        self.assertIn('"small" is already loaded', r.err)
        self.assertJsonError(d.ctl_json("load", self.small), "EEXIST")
        self.assertEqual(h.usage_of(d.device(0)), before)
        # another name for the same checkpoint is fine
        h.load_ok(self, d, self.small, "--name", "small-2")
        self.assertEqual(len(d.models()), 2)

    def test_bad_device(self):
        d = self.daemon(devices=2)
        r = d.ctl("load", self.small, "--device", "2")
        self.assertEqual(r.rc, 1, r)
        self.assertIn("no device 2", r.err)
        self.assertIn("0 to 1", r.err)
        self.assertJsonError(d.ctl_json("load", self.small, "--device", "7"), "ENODEV")
        r = d.ctl("load", self.small, "--device", "one")  # not a number: a UUID none of them has
        self.assertEqual(r.rc, 1, r)
        self.assertIn('no device with UUID "one"', r.err)
        for bad in ("-1", "1.5", ""):
            with self.subTest(device=bad):
                r = d.ctl("load", self.small, "--device", bad)
                self.assertEqual(r.rc, 2, r)
                self.assertIn("--device", r.err)
        self.assertEqual(d.models(), [])
        self.assertEqual(d.device(1)["reserved_bytes"]["current"], 0)

    def test_bad_names(self):
        d = self.daemon()
        for bad in ("has/slash", ".hidden", "-dash", "sp ace", "x" * 129, "é"):
            with self.subTest(name=bad):
                r = d.ctl_json("load", self.small, "--name", bad)
                err = self.assertJsonError(r, "EINVAL")
                self.assertIn("name", err["message"])
        self.assertEqual(d.models(), [])
        h.load_ok(self, d, self.small, "--name", "x" * 128)

    def test_missing_path(self):
        d = self.daemon()
        missing = os.path.join(self.tmp, "no-such-model")
        r = d.ctl("load", missing)
        self.assertEqual(r.rc, 1, r)
        self.assertIn(missing, r.err)
        self.assertIn("No such file", r.err)
        self.assertJsonError(d.ctl_json("load", missing), "ENOENT")
        # a folder without a checkpoint
        empty = os.path.join(self.tmp, "empty")
        os.mkdir(empty)
        r = d.ctl("load", empty)
        self.assertEqual(r.rc, 1, r)
        self.assertIn(empty, r.err)
        self.assertIn("no *.safetensors", r.err)
        self.assertEqual(d.models(), [])
        self.assertEqual(d.ctl("list").rc, 0)

    def corrupt_copy(self, name, damage):
        path = h.copy_checkpoint(self.small, os.path.join(self.tmp, name))
        victim = damage(path)
        return path, victim

    def check_corrupt_load(self, d, path, victim, words):
        before = h.usage_of(d.device(0))
        r = d.ctl("load", path)
        self.assertEqual(r.rc, 1, r)
        self.assertIn(victim, r.err, "the message names the file")
        self.assertIn(words, r.err)
        self.assertEqual(h.usage_of(d.device(0)), before, "nothing is leaked")
        self.assertNotIn(os.path.basename(path), [m["name"] for m in d.models()])
        # offline inspect agrees, and does not crash
        i = h.run_ctl(None, "inspect", path)
        self.assertEqual(i.rc, 1, i)
        self.assertIn(victim, i.err)
        j = h.run_ctl(None, "inspect", path, json_mode=True)
        self.assertIn(victim, self.assertJsonError(j)["message"])

    def test_corrupt_checkpoints(self):
        d = self.daemon()
        h.load_ok(self, d, h.checkpoint("qwen"))

        def truncate(path):
            shard = h.shard_files(path)[1]
            os.truncate(shard, os.path.getsize(shard) // 2)
            return shard

        def garble_header(path):
            shard = h.shard_files(path)[2]
            with open(shard, "r+b") as f:
                f.seek(9)
                f.write(b"garbage!garbage")
            return shard

        def huge_header_length(path):
            shard = h.shard_files(path)[0]
            with open(shard, "r+b") as f:
                f.write((1 << 62).to_bytes(8, "little"))
            return shard

        def missing_shard(path):
            shard = h.shard_files(path)[3]
            os.unlink(shard)
            return os.path.basename(shard)

        def garble_index(path):
            index = os.path.join(path, "model.safetensors.index.json")
            with open(index, "r+b") as f:
                f.seek(20)
                f.write(b"}}}}")
            return index

        def empty_file(path):
            shard = h.shard_files(path)[4]
            os.truncate(shard, 0)
            return shard

        cases = [("truncated", truncate, "truncated"), ("garbled", garble_header, "header"),
                 ("hugeheader", huge_header_length, "header"), ("missing", missing_shard, "No such file"),
                 ("badindex", garble_index, "JSON"), ("empty", empty_file, "too short")]
        for name, damage, words in cases:
            with self.subTest(corruption=name):
                path, victim = self.corrupt_copy(name, damage)
                self.check_corrupt_load(d, path, victim, words)
        # the daemon is fine: the good model is still there and intact
        self.assertEqual([m["name"] for m in d.models()], ["qwen"])
        self.assertEqual(d.ctl("verify", "qwen").rc, 0)

    # A FIFO named *.safetensors (or given as PATH) must be refused at once:
    # an open() that waits for a writer would hang inspect, and in the daemon
    # every later load and the stop itself.
    def test_a_fifo_is_refused_not_waited_on(self):
        folder = os.path.join(self.tmp, "fifo-model")
        os.mkdir(folder)
        fifo = os.path.join(folder, "model.safetensors")
        os.mkfifo(fifo)
        for path in (fifo, folder):
            try:
                p = subprocess.run(h.ctl_cmd(None, ["inspect", path]), capture_output=True, timeout=3,
                                   env=h.child_env(), start_new_session=True)
            except subprocess.TimeoutExpired:
                self.fail("weightctl inspect %s blocks on the FIFO" % path)
            self.assertEqual(p.returncode, 1)
            self.assertIn(fifo, p.stderr.decode())
        d = self.daemon()
        r = h.run_ctl(d.sock, "load", folder, timeout=h.T(10))
        self.assertEqual(r.rc, 1, r)
        self.assertIn(fifo, r.err)
        self.assertClean(d, d.stop())

    def test_corrupt_single_files(self):
        d = self.daemon()
        cases = {
            "random.safetensors": os.urandom(4096),
            "short.safetensors": b"\x10\x00",
            "zero.safetensors": b"",
            "notjson.safetensors": (16).to_bytes(8, "little") + b"this is not json",
            "badoffsets.safetensors": h.st_image(b'{"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}',
                                                 b"\0" * 8),
            "baddtype.safetensors": h.st_image(b'{"t":{"dtype":"F31","shape":[4],"data_offsets":[0,16]}}',
                                               b"\0" * 16),
        }
        for fname, data in cases.items():
            with self.subTest(file=fname):
                path = os.path.join(self.tmp, fname)
                with open(path, "wb") as f:
                    f.write(data)
                self.check_corrupt_load(d, path, path, "")
        self.assertEqual(d.models(), [])
        self.assertEqual(d.device(0)["reserved_bytes"]["current"], 0)
