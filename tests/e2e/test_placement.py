"""Models across several devices (host devices here; the same code runs on
GPUs): weightctl load --devices LIST with --placement replicate or
expert-parallel, or a --plan file; info shows where each tensor lives,
verify reads every copy back, unload and failed loads give every device's
memory back."""

import json
import os
import re

from . import harness as h


def placements(t):
    """[(device, tensor_offset, bytes), ...] of one tensor of info --json."""
    return [(p["device"], p["tensor_offset"], p["bytes"]) for p in t["placements"]]


def expert_of(name):
    """The expert number of a per-expert tensor, or None."""
    m = re.search(r"\.experts\.(\d+)\.", name)
    return int(m.group(1)) if m else None


class Placement(h.E2ETestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.small = h.checkpoint("small")  # gpt-oss: fused expert tensors [2, ...]
        cls.qwen = h.checkpoint("qwen")    # qwen3-moe: a tensor per expert, 4 experts

    def assertAllGivenBack(self, d, devices):
        for dev in devices:
            st = d.device(dev)
            for key in ("allocated_bytes", "reserved_bytes", "requested_bytes"):
                self.assertEqual(st[key]["current"], 0, "device %d %s" % (dev, key))

    def test_replicate_puts_a_full_copy_on_each_device(self):
        d = self.daemon(devices=2)
        size = h.checkpoint_bytes(self.small)
        r = d.ctl("load", self.small, "--devices", "0,1")
        self.assertEqual(r.rc, 0, r)
        self.assertRegex(r.out, r"on devices 0,1 \(replicate, [\d.]+ MiB on the devices together\)\n$")
        m = d.models()[0]
        self.assertEqual((m["devices"], m["placement"], m["bytes"], m["device_bytes"]),
                         ([0, 1], "replicate", size, 2 * size))
        info = d.ctl_json("info", "small").json
        for dev in (0, 1):
            self.assertEqual(d.device(dev)["requested_bytes"]["current"], h.slab_bytes(info, dev))
            self.assertGreaterEqual(h.slab_bytes(info, dev), size)
        for t in info["tensor_list"]:
            self.assertEqual(placements(t), [(0, 0, t["bytes"]), (1, 0, t["bytes"])], t["name"])
        self.assertRegex(d.ctl("list").out, r"\nsmall +ready +0,1 +22 ")
        r = d.ctl("verify", "small")
        self.assertEqual(r.rc, 0, r)
        self.assertIn("all 22 tensors match", r.out)
        self.assertEqual(d.ctl_json("unload", "small").json["device_bytes"], 2 * size)
        self.assertAllGivenBack(d, (0, 1))

    def test_devices_by_uuid(self):
        d = self.daemon(devices=2)
        uuids = [dev["uuid"] for dev in d.stats()["devices"]]
        self.assertEqual(uuids, ["host-0", "host-1"])
        r = d.ctl("load", self.small, "--devices", "HOST-1,0", "--name", "a")  # any case, mixed with numbers
        self.assertEqual(r.rc, 0, r)
        self.assertIn("on devices 1,0 (replicate", r.out)
        r = d.ctl("load", self.small, "--device", "host-1", "--name", "b")
        self.assertEqual(r.rc, 0, r)
        r = d.ctl("load", self.small, "--device", "hOsT-", "--name", "x")  # a prefix two devices share
        self.assertEqual(r.rc, 1, r)
        self.assertIn("give more of it", r.err)
        self.assertEqual([(m["name"], m["devices"]) for m in d.models()], [("a", [1, 0]), ("b", [1])])
        plan = os.path.join(self.tmp, "plan.json")
        with open(plan, "w") as f:
            json.dump({"devices": ["host-0", "host-1"], "placement": "expert-parallel"}, f)
        r = d.ctl("load", self.qwen, "--plan", plan, "--name", "c")
        self.assertEqual(r.rc, 0, r)
        self.assertIn("on devices 0,1 (expert-parallel", r.out)
        for name in ("a", "b", "c"):
            self.assertEqual(d.ctl("verify", name).rc, 0)
            self.assertEqual(d.ctl("unload", name).rc, 0)
        self.assertAllGivenBack(d, (0, 1))

    def test_expert_parallel_splits_per_expert_tensors_in_groups(self):
        d = self.daemon(devices=3)
        size = h.checkpoint_bytes(self.qwen)
        r = d.ctl("load", self.qwen, "--devices", "2,0", "--placement", "expert-parallel")
        self.assertEqual(r.rc, 0, r)
        info = d.ctl_json("info", "qwen").json
        self.assertEqual((info["devices"], info["placement"]), ([2, 0], "expert-parallel"))
        per_device = {0: 0, 2: 0}
        experts = 0
        for t in info["tensor_list"]:
            name, nbytes, pl = t["name"], t["bytes"], placements(t)
            e = expert_of(name)
            if e is None:
                self.assertEqual(pl, [(2, 0, nbytes), (0, 0, nbytes)], name)
            else:
                experts += 1
                # 4 experts on 2 devices: 0 and 1 on the first listed, 2 and 3 on the second
                self.assertEqual(pl, [(2 if e < 2 else 0, 0, nbytes)], name)
            for dev, _, b in pl:
                per_device[dev] += b
        self.assertGreater(experts, 0)
        self.assertEqual(sum(per_device.values()), info["device_bytes"])
        self.assertLess(info["device_bytes"], 2 * size)
        for dev, want in per_device.items():
            self.assertEqual(d.device(dev)["requested_bytes"]["current"], h.slab_bytes(info, dev), "device %d" % dev)
            self.assertGreaterEqual(h.slab_bytes(info, dev), want, "device %d" % dev)
        self.assertEqual(d.device(1)["reserved_bytes"]["current"], 0, "device 1 was not asked for")
        self.assertEqual(d.ctl("verify", "qwen").rc, 0)
        self.assertEqual(d.ctl("unload", "qwen").rc, 0)
        self.assertAllGivenBack(d, (0, 1, 2))

    def test_a_plan_file_splits_fused_expert_tensors_by_rows(self):
        d = self.daemon(devices=2)
        plan = os.path.join(self.tmp, "plan.json")
        with open(plan, "w") as f:
            json.dump({"devices": [0, 1], "placement": "expert-parallel"}, f)
        r = d.ctl_json("load", self.small, "--plan", plan)
        self.assertEqual(r.rc, 0, r)
        self.assertEqual((r.json["devices"], r.json["placement"]), ([0, 1], "expert-parallel"))
        info = d.ctl_json("info", "small").json
        split = 0
        for t in info["tensor_list"]:
            pl = placements(t)
            if ".mlp.experts." in t["name"]:
                # [2, ...]: one expert's rows on each device, contiguous bytes
                half = t["bytes"] // 2
                self.assertEqual(t["shape"][0], 2, t["name"])
                self.assertEqual(pl, [(0, 0, half), (1, half, half)], t["name"])
                split += 1
            else:
                self.assertEqual([p[0] for p in pl], [0, 1], t["name"])
        self.assertGreater(split, 0)
        # The text form shows each device's part and where it starts.
        text = d.ctl("info", "small").out
        self.assertIn("devices:  0,1 (expert-parallel)\n", text)
        rows = [l.split() for l in text.splitlines() if ".mlp.experts.gate_up_proj_blocks" in l]
        self.assertEqual(len(rows), 2, text)
        self.assertEqual([r[-5] for r in rows], ["0", "1"])  # DEVICE
        self.assertEqual(rows[0][-2], "0")                     # FROM
        self.assertEqual(int(rows[1][-2]), int(rows[0][-1]))   # the second part starts where the first ends
        self.assertEqual(d.ctl("verify", "small").rc, 0)
        # Flags win over the plan.
        r = d.ctl_json("load", self.small, "--plan", plan, "--name", "one", "--devices", "1",
                       "--placement", "replicate")
        self.assertEqual((r.json["devices"], r.json["placement"]), ([1], "replicate"))
        for name in ("small", "one"):
            self.assertEqual(d.ctl("unload", name).rc, 0)
        self.assertAllGivenBack(d, (0, 1))

    def test_out_of_memory_on_one_device_rolls_back_every_device(self):
        d = self.daemon(devices=2, capacity="160MiB")
        h.load_ok(self, d, self.qwen, "--device", "1", "--name", "resident")
        before = [h.usage_of(d.device(i)) for i in (0, 1)]
        r = d.ctl("load", self.small, "--devices", "0,1")
        self.assertEqual(r.rc, 1, r)
        self.assertIn("on device 1", r.err)
        self.assertIn("out of memory", r.err)
        self.assertEqual([h.usage_of(d.device(i)) for i in (0, 1)], before)
        self.assertEqual([m["name"] for m in d.models()], ["resident"])
        self.assertEqual(d.ctl("verify", "resident").rc, 0)

    def test_bad_device_lists_and_plans(self):
        d = self.daemon(devices=2)
        for args, code, words in ((["--devices", "0,0"], "EINVAL", "device 0 is listed twice"),
                                  (["--devices", "0,2"], "ENODEV", "no device 2"),
                                  (["--devices", "0,1,1"], "EINVAL", "listed twice"),
                                  (["--devices", "0,host-0"], "EINVAL", "device 0 is listed twice"),
                                  (["--devices", "host-"], "EINVAL", "the start of 2 devices' UUIDs"),
                                  (["--devices", "host-2"], "ENODEV", 'no device with UUID "host-2"'),
                                  (["--device", "GPU-8c1e"], "ENODEV", 'no device with UUID "GPU-8c1e"')):
            with self.subTest(args=args):
                r = d.ctl("load", self.small, *args)
                self.assertEqual(r.rc, 1, r)
                self.assertIn(words, r.err)
                self.assertJsonError(d.ctl_json("load", self.small, *args), code)
        for args, words in ((["--devices", "0,"], "not a device (number or UUID)"),
                            (["--devices", ",0"], "not a device (number or UUID)"),
                            (["--devices", "-1"], "not a device (number or UUID)"),
                            (["--devices", "1x"], "not a device (number or UUID)"),
                            (["--devices", "h" * 200], "not a device (number or UUID)"),
                            (["--device", "0", "--devices", "1"], "once"),
                            (["--placement", "sharded"], "not replicate or expert-parallel")):
            with self.subTest(args=args):
                r = d.ctl("load", self.small, *args)
                self.assertEqual(r.rc, 2, r)
                self.assertIn(words, r.err)
        plan = os.path.join(self.tmp, "plan.json")
        for text, words in (("{", "not a JSON object"), ("[0, 1]", "not a JSON object"),
                            ('{"devices": [0], "shards": 2}', '"shards" is not a plan key'),
                            ('{"devices": "0,1"}', '"devices" is not a plan key')):
            with self.subTest(plan=text):
                with open(plan, "w") as f:
                    f.write(text)
                r = d.ctl("load", self.small, "--plan", plan)
                self.assertEqual(r.rc, 1, r)
                self.assertIn(words, r.err)
        r = d.ctl("load", self.small, "--plan", os.path.join(self.tmp, "missing.json"))
        self.assertEqual(r.rc, 1, r)
        self.assertIn("No such file", r.err)
        # The protocol itself, with what weightctl would never send.
        c = self.raw(d)
        for args, words in (({"devices": "0"}, "non-empty array"), ({"devices": []}, "non-empty array"),
                            ({"devices": [0.5]}, "device numbers"), ({"devices": [1e300]}, "device numbers"),
                            ({"devices": [-1]}, "device numbers"), ({"devices": [True]}, "device numbers"),
                            ({"devices": [{}]}, "device numbers or UUIDs"), ({"device": None, "devices": [[0]]}, "UUIDs"),
                            ({"devices": [0, 1, 0]}, "listed twice"), ({"device": 0, "devices": [1]}, "not both"),
                            ({"placement": 3}, "placement"), ({"placement": "x"}, "not replicate")):
            with self.subTest(args=args):
                rep = c.request("load", dict(args, path=self.small))
                err = h.assert_error_reply(self, rep, "EINVAL", id=rep["id"])
                self.assertIn(words, err["message"])
        self.assertEqual(d.models(), [])
        self.assertAllGivenBack(d, (0, 1))
