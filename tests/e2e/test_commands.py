"""weightctl's other commands against a real daemon: list, info (with
paging), stats, unload, verify (including a checkpoint changed on disk),
shutdown, and the offline inspect; --json for every one of them."""

import json
import os
import re

from . import harness as h


class ModelCommands(h.E2ETestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.small = h.checkpoint("small")
        cls.qwen = h.checkpoint("qwen")

    def test_list(self):
        d = self.daemon(devices=2)
        r = d.ctl("list")
        self.assertEqual(r.rc, 0, r)
        self.assertEqual(r.out, "no models loaded\n")
        self.assertEqual(d.ctl_json("list").json, {"models": []})
        h.load_ok(self, d, self.small)
        h.load_ok(self, d, self.qwen, "--device", "1", "--name", "q")
        r = d.ctl("list")
        self.assertEqual(r.rc, 0, r)
        lines = r.out.splitlines()
        self.assertEqual(lines[0].split(), ["NAME", "STATE", "DEVICES", "TENSORS", "SIZE", "LOAD(s)", "LEASES", "PATH"])
        self.assertRegex(lines[1], r"^small +ready +0 +22 +[\d.]+ MiB +[\d.]+ +0 +%s$" % re.escape(self.small))
        self.assertRegex(lines[2], r"^q +ready +1 +24 +[\d.]+ MiB +[\d.]+ +0 +%s$" % re.escape(self.qwen))
        models = d.ctl_json("list").json["models"]
        self.assertEqual([(m["name"], m["devices"], m["placement"], m["state"], m["tensors"], m["shards"])
                          for m in models],
                         [("small", [0], "replicate", "ready", 22, 6), ("q", [1], "replicate", "ready", 24, 9)])
        for m in models:
            self.assertGreaterEqual(m["load_seconds"], 0)
            self.assertGreater(m["loaded_at"], 1.6e9)

    def test_info(self):
        d = self.daemon(devices=2)
        h.load_ok(self, d, self.small, "--device", "1")
        expected = h.tensors_of(self.small)
        r = d.ctl("info", "small")
        self.assertEqual(r.rc, 0, r)
        text = r.out
        self.assertIn("model:    small\n", text)
        self.assertIn("path:     %s\n" % self.small, text)
        self.assertIn("state:    ready\n", text)
        self.assertIn("devices:  1 (replicate)\n", text)
        self.assertIn("tensors:  22 in 6 shards\n", text)
        total = sum(v[2] for v in expected.values())
        self.assertIn("bytes:    %d (" % total, text)
        rows = {}
        lines = text.splitlines()
        head = lines.index(next(l for l in lines if l.startswith("TENSOR")))
        self.assertEqual(lines[head].split(), ["TENSOR", "DTYPE", "SHAPE", "DEVICE", "SEGMENT", "OFFSET", "FROM",
                                             "BYTES"])
        for line in lines[head + 1:]:
            m = re.match(r"^(\S+) +(\S+) +(\[[\d, ]*\]) +(\d+) +(\d+) +(\d+) +(\d+) +(\d+)$", line)
            self.assertTrue(m, "not a tensor row: %r" % line)
            self.assertEqual(m.group(7), "0", "a whole tensor starts at its first byte")
            rows[m.group(1)] = (m.group(2), json.loads(m.group(3)), int(m.group(4)), int(m.group(8)))
        self.assertEqual(set(rows), set(expected), "info lists every tensor")
        for name, (dtype, shape, nbytes) in expected.items():
            self.assertEqual(rows[name], (dtype, shape, 1, nbytes), name)
        # --json: the same, with offsets and segments that do not overlap
        o = d.ctl_json("info", "small").json
        self.assertEqual((o["name"], o["devices"], o["tensors"], o["shards"], o["bytes"], o["device_bytes"],
                          o["state"]), ("small", [1], 22, 6, total, total, "ready"))
        self.assertNotIn("next", o)
        self.assertEqual(len(o["tensor_list"]), 22)
        self.assertEqual(sum(o["dtypes"].values()), total)
        spans = {}
        for t in o["tensor_list"]:
            self.assertEqual((t["dtype"], t["shape"], t["bytes"]), expected[t["name"]])
            (p,) = t["placements"]
            self.assertEqual((p["device"], p["tensor_offset"], p["bytes"]), (1, 0, t["bytes"]))
            spans.setdefault(p["segment"], []).append((p["offset"], p["offset"] + p["bytes"]))
        for seg, s in spans.items():
            s.sort()
            for (a0, a1), (b0, b1) in zip(s, s[1:]):
                self.assertLessEqual(a1, b0, "tensors overlap in segment %d" % seg)
        # a model that is not there
        r = d.ctl("info", "nope")
        self.assertEqual(r.rc, 1, r)
        self.assertIn('no model named "nope"', r.err)
        self.assertJsonError(d.ctl_json("info", "nope"), "ENOENT")

    def test_stats(self):
        d = self.daemon(devices=2, capacity="1GiB")
        r = d.ctl("stats")
        self.assertEqual(r.rc, 0, r)
        self.assertIn("backend host, 0 models", r.out)
        self.assertIn("allocator policy in force: default (load policy: %s)" % h.LOAD_POLICY, r.out)
        self.assertIn("device 0 (host device 0, host-0): capacity 1.00 GiB", r.out)
        self.assertIn("device 1 (host device 1, host-1): capacity 1.00 GiB", r.out)
        for key in ("allocated_bytes", "reserved_bytes", "active_bytes", "inactive_split_bytes", "requested_bytes",
                    "segments", "largest free block", "fragmentation", "out-of-memory"):
            self.assertIn(key, r.out)
        s = d.stats()
        self.assertEqual(s["backend"], "host")
        self.assertEqual(s["models"], 0)
        self.assertEqual(s["connections"], 1)
        self.assertEqual(s["jobs"], [])
        self.assertEqual(s["policy"], {"current": "default", "depth": 0, "load_policy_active": False,
                                       "load": h.LOAD_POLICY})
        self.assertEqual([(x["device"], x["uuid"]) for x in s["devices"]], [(0, "host-0"), (1, "host-1")])
        for dev in s["devices"]:
            self.assertEqual(dev["capacity"], 1 << 30)
            for key in ("allocated_bytes", "reserved_bytes", "active_bytes", "requested_bytes", "segment"):
                self.assertEqual(dev[key], {"current": 0, "peak": 0}, key)
        h.load_ok(self, d, self.small, "--device", "1")
        s = d.stats()
        self.assertEqual(s["models"], 1)
        dev0, dev1 = s["devices"]
        self.assertEqual(dev0["reserved_bytes"]["current"], 0)
        self.assertGreaterEqual(dev1["allocated_bytes"]["current"], h.checkpoint_bytes(self.small))
        self.assertGreaterEqual(dev1["reserved_bytes"]["current"], dev1["allocated_bytes"]["current"])
        # The tensors come packed in slabs (whole 2 MiB pages): what was asked for.
        info = d.ctl_json("info", "small").json
        self.assertEqual(dev1["requested_bytes"]["current"], h.slab_bytes(info, 1))
        self.assertGreaterEqual(h.slab_bytes(info, 1), h.checkpoint_bytes(self.small))
        self.assertLess(h.slab_bytes(info, 1), h.checkpoint_bytes(self.small) + (2 << 20) * len(info["slab_list"]) +
                        512 * info["tensors"])
        # Under weightd's load policy the model lives in expandable segments,
        # which PyTorch's "segment" statistic does not count; mapping pages does.
        self.assertEqual(dev1["segment"]["current"], 0)
        self.assertGreater(dev1["num_device_alloc"], 0)
        self.assertEqual(dev1["num_ooms"], 0)

    def test_unload(self):
        d = self.daemon(devices=2)
        h.load_ok(self, d, self.small, "--device", "1")
        h.load_ok(self, d, self.qwen)
        qwen_usage = h.usage_of(d.device(0))
        r = d.ctl("unload", "small")
        self.assertEqual(r.rc, 0, r)
        self.assertRegex(r.out, r"^unloaded small \([\d.]+ MiB freed\)\n$")
        dev1 = d.device(1)
        self.assertEqual(dev1["reserved_bytes"]["current"], 0, "unload gives the device's memory back")
        self.assertEqual(dev1["allocated_bytes"]["current"], 0)
        self.assertEqual(dev1["segment"]["current"], 0)
        self.assertEqual(h.usage_of(d.device(0)), qwen_usage, "other devices are untouched")
        self.assertEqual([m["name"] for m in d.models()], ["qwen"])
        r = d.ctl("unload", "small")
        self.assertEqual(r.rc, 1, r)
        self.assertIn('no model named "small"', r.err)
        self.assertJsonError(d.ctl_json("unload", "small"), "ENOENT")
        o = d.ctl_json("unload", "qwen").json
        size = h.checkpoint_bytes(self.qwen)
        self.assertEqual(o, {"name": "qwen", "bytes": size, "device_bytes": size, "kept_cached": False})
        self.assertEqual(d.device(0)["reserved_bytes"]["current"], 0)
        # loading again after an unload works
        h.load_ok(self, d, self.small)
        self.assertEqual(d.ctl("verify", "small").rc, 0)

    def test_verify_finds_a_changed_byte(self):
        path = h.copy_checkpoint(h.checkpoint("qwen-tiny"), os.path.join(self.tmp, "tamper"))
        d = self.daemon()
        h.load_ok(self, d, path)
        r = d.ctl("verify", "tamper")
        self.assertEqual(r.rc, 0, r)
        self.assertRegex(r.out, r"^verified tamper: all \d+ tensors match the checkpoint")
        o = d.ctl_json("verify", "tamper").json
        self.assertIs(o["match"], True)
        self.assertEqual(o["mismatched_tensors"], 0)
        self.assertEqual(o["bytes"], h.checkpoint_bytes(path))
        # change one byte in the middle of a tensor, in place: same size
        shard = h.shard_files(path)[1]
        header, data_start = h.read_header(shard)
        name, t = max(((k, v) for k, v in header.items() if k != "__metadata__"),
                      key=lambda kv: kv[1]["data_offsets"][1] - kv[1]["data_offsets"][0])
        begin, end = t["data_offsets"]
        where = data_start + (begin + end) // 2
        size = os.path.getsize(shard)
        with open(shard, "r+b") as f:
            f.seek(where)
            old = f.read(1)
            f.seek(where)
            f.write(bytes([old[0] ^ 0x5A]))
            f.flush()
            os.fsync(f.fileno())
        self.assertEqual(os.path.getsize(shard), size)
        r = d.ctl("verify", "tamper")
        self.assertEqual(r.rc, 1, r)
        self.assertIn("tamper DIFFERS from its checkpoint: 1 of", r.out)
        self.assertIn(name, r.out, "verify names the tensor that differs")
        o = d.ctl_json("verify", "tamper")
        self.assertEqual(o.rc, 1, o)
        o = o.json
        self.assertIs(o["match"], False)
        self.assertEqual(o["mismatched_tensors"], 1)
        self.assertIn(name, o["first_mismatch"])
        self.assertIn(str((begin + end) // 2 - begin), o["first_mismatch"], "the byte within the tensor")
        # put it back: identical again
        with open(shard, "r+b") as f:
            f.seek(where)
            f.write(old)
        self.assertEqual(d.ctl("verify", "tamper").rc, 0)
        # a model that is not there
        r = d.ctl("verify", "nope")
        self.assertEqual(r.rc, 1, r)
        self.assertJsonError(d.ctl_json("verify", "nope"), "ENOENT")

    def test_verify_a_shard_that_shrank(self):
        path = h.copy_checkpoint(h.checkpoint("qwen-tiny"), os.path.join(self.tmp, "shrink"))
        d = self.daemon()
        h.load_ok(self, d, path)
        shard = h.shard_files(path)[0]
        os.truncate(shard, os.path.getsize(shard) - 100)
        r = d.ctl("verify", "shrink")
        self.assertIn(r.rc, (1,), r)
        self.assertIn(os.path.basename(shard), r.out + r.err, "the failure names the file")
        self.assertEqual(d.ctl("list").rc, 0)
        self.assertEqual(d.ctl("unload", "shrink").rc, 0)

    def test_json_shutdown(self):
        d = self.daemon()
        h.load_ok(self, d, self.small)
        r = d.ctl_json("shutdown")
        self.assertEqual(r.rc, 0, r)
        self.assertEqual(r.json, {"ok": True, "stopped": True})
        self.assertClean(d, d.wait())

    def test_json_errors_for_every_command(self):
        d = self.daemon()
        for args, code in ((["info", "x"], "ENOENT"), (["unload", "x"], "ENOENT"), (["verify", "x"], "ENOENT"),
                           (["load", "/nonexistent/x"], "ENOENT")):
            with self.subTest(args=args):
                self.assertJsonError(d.ctl_json(*args), code)
        gone = os.path.join(self.tmp, "gone.sock")
        for args in (["list"], ["stats"], ["info", "x"], ["unload", "x"], ["verify", "x"], ["shutdown"],
                     ["load", self.small]):
            with self.subTest(no_daemon=args):
                self.assertJsonError(h.run_ctl(gone, *args, json_mode=True), "ECONNREFUSED")


class ManyTensors(h.E2ETestCase):
    """info pages: a qwen3-moe with 340 experts has more tensors than one page."""

    def test_info_pages_through_every_tensor_on_device_1(self):
        path = h.checkpoint("qwen-many")
        ins = h.run_ctl(None, "inspect", path, json_mode=True)
        self.assertEqual(ins.rc, 0, ins)
        n = ins.json["tensors"]
        self.assertGreater(n, 1000, "the checkpoint must need more than one page of info")
        d = self.daemon(devices=2, capacity="4GiB")
        r = d.ctl_json("load", path, "--device", "1")
        self.assertEqual(r.rc, 0, r)
        self.assertEqual(r.json["tensors"], n)
        o = d.ctl_json("info", "qwen-many").json
        names = [t["name"] for t in o["tensor_list"]]
        self.assertEqual(len(names), n)
        self.assertEqual(len(set(names)), n, "no tensor twice")
        self.assertEqual(set(names), set(h.tensors_of(path)))
        self.assertEqual(o["tensors"], n)
        self.assertEqual(sum(t["bytes"] for t in o["tensor_list"]), ins.json["bytes"])
        self.assertTrue(all([p["device"] for p in t["placements"]] == [1] for t in o["tensor_list"]))
        self.assertNotIn("next", o)
        # text output: every tensor too
        text = d.ctl("info", "qwen-many").out
        self.assertIn("devices:  1 (replicate)\n", text)
        self.assertIn("tensors:  %d in 1 shard\n" % n, text)
        lines = text.splitlines()
        rows = lines[lines.index(next(l for l in lines if l.startswith("TENSOR "))) + 1:]
        self.assertEqual(sorted(r.split()[0] for r in rows), sorted(names))
        # the pages as the protocol gives them, with a small limit
        with h.RawClient(d.sock, hello=True) as c:
            got, offset, pages = [], 0, 0
            while offset is not None:
                rep = c.request("info", {"name": "qwen-many", "offset": offset, "limit": 100})
                self.assertTrue(rep["ok"], rep)
                res = rep["result"]
                self.assertEqual(res["offset"], offset)
                self.assertLessEqual(len(res["tensor_list"]), 100)
                got += [t["name"] for t in res["tensor_list"]]
                offset = res["next"]
                pages += 1
            self.assertEqual(got, names, "pages in order, nothing lost or repeated")
            self.assertEqual(pages, (n + 99) // 100)
            # past the end: an empty page
            rep = c.request("info", {"name": "qwen-many", "offset": n + 5})
            self.assertEqual(rep["result"]["tensor_list"], [])
            self.assertIsNone(rep["result"]["next"])
        self.assertEqual(d.ctl("unload", "qwen-many").rc, 0)
        self.assertEqual(d.device(1)["reserved_bytes"]["current"], 0)


class Inspect(h.E2ETestCase):
    """The offline inspect: no daemon anywhere."""

    def test_mixture_of_experts(self):
        # small: gpt-oss, 1 layer, 2 experts, fused; qwen: 1 layer, 4 experts, per-expert
        for kind, layout, experts in (("small", "fused", 2), ("qwen", "per-expert", 4)):
            with self.subTest(kind=kind):
                path = h.checkpoint(kind)
                r = h.run_ctl(None, "inspect", path, json_mode=True)
                self.assertEqual(r.rc, 0, r)
                moe = r.json["moe"]
                self.assertEqual((moe["layout"], moe["layers"], moe["experts_per_layer"]), (layout, 1, experts))
                layer = moe["per_layer"][0]
                self.assertEqual(layer["bytes_per_expert"] * experts, layer["expert_bytes"])
                self.assertEqual(moe["layer_bytes"] + moe["outside_layers_bytes"], r.json["bytes"])
                text = h.run_ctl(None, "inspect", path)
                self.assertIn("experts:    %d per layer, stored %s" % (experts, layout), text.out)

    def test_valid_checkpoints(self):
        small = h.checkpoint("small")
        for path, tensors, shards in ((small, 22, 6),
                                      (os.path.join(small, "model.safetensors.index.json"), 22, 6),
                                      (h.shard_files(small)[0], None, 1)):
            with self.subTest(path=path):
                r = h.run_ctl(os.path.join(self.tmp, "no-daemon.sock"), "inspect", path)
                self.assertEqual(r.rc, 0, r)
                self.assertIn("valid:      yes", r.out)
                self.assertIn("checkpoint: %s" % path, r.out)
                j = h.run_ctl(None, "inspect", path, json_mode=True)
                self.assertEqual(j.rc, 0, j)
                o = j.json
                self.assertIs(o["ok"], True)
                self.assertEqual(len(o["shards"]), shards)
                expected = h.tensors_of(path if os.path.isdir(path) or path.endswith(".safetensors") else small)
                self.assertEqual(o["tensors"], len(expected))
                if tensors is not None:
                    self.assertEqual(o["tensors"], tensors)
                self.assertEqual(o["bytes"], sum(v[2] for v in expected.values()))
                self.assertEqual(sum(s["tensors"] for s in o["shards"]), o["tensors"])
                self.assertEqual(sum(x["bytes"] for x in o["dtypes"].values()), o["bytes"])
                self.assertIn("tensors:    %d in %d shard" % (o["tensors"], shards), r.out)

    def test_invalid_checkpoints(self):
        bad = os.path.join(self.tmp, "bad.safetensors")
        with open(bad, "wb") as f:
            f.write(b"\xff" * 64)
        empty = os.path.join(self.tmp, "empty-dir")
        os.mkdir(empty)
        for path in (bad, empty, os.path.join(self.tmp, "missing"), "/dev/null"):
            with self.subTest(path=path):
                r = h.run_ctl(None, "inspect", path)
                self.assertEqual(r.rc, 1, r)
                self.assertIn(path, r.err, "the message names the file")
                self.assertEqual(r.out, "")
                self.assertIn(path, self.assertJsonError(h.run_ctl(None, "inspect", path, json_mode=True))["message"])
