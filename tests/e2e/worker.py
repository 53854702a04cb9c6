"""A worker process for the attach tests: a real program that attaches to a
real daemon through the Python client (and so libweightd-client), and checks
what it sees against the checkpoint's own files. Standard library only, plus
the framework it is asked to use; it runs under whichever python3 has that
framework (Debian's, for numpy and torch).

    worker.py SOCKET verify NAME CHECKPOINT [--framework F] [--device D]
    worker.py SOCKET hold NAME [--device D]          attach, print READY, wait to be killed
    worker.py SOCKET cycles NAME N                   N attach/close cycles; descriptor counts
    worker.py SOCKET write NAME                      a write through a read-only mapping
    worker.py SOCKET torch NAME CHECKPOINT           torch tensors: dtypes, data_ptr, a computation
    worker.py SOCKET ride NAME                       attach and compute on the tensors through daemon restarts;
                                                     stdin "status" prints a JSON line, "quit" detaches
    worker.py SOCKET sleeper NAME                    attach and stay through sleeps and wakes of the model;
                                                     stdin "status" prints its state, addresses and (awake)
                                                     its tensors' CRCs, "quit" detaches

Each prints one JSON line with what it found (the tests assert on it), or
fails with a traceback and exit status 1.
"""

import ctypes
import json
import os
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "client", "python"))
import weightd  # noqa: E402


def checkpoint_tensors(path):
    """{name: (dtype, shape, file, first byte, bytes)} from the shards' own headers."""
    out = {}
    files = [path] if os.path.isfile(path) else sorted(os.path.join(path, f) for f in os.listdir(path)
                                                       if f.endswith(".safetensors"))
    for shard in files:
        with open(shard, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        for name, t in header.items():
            if name != "__metadata__":
                b, e = t["data_offsets"]
                out[name] = (t["dtype"], t["shape"], shard, 8 + n + b, e - b)
    return out


def file_bytes(entry, offset, length):
    with open(entry[2], "rb") as f:
        f.seek(entry[3] + offset)
        return f.read(length)


def raw_bytes(value, framework):
    """The bytes a tensor, array or memoryview holds, as bytes."""
    if framework == "memoryview":
        return bytes(value)
    if framework == "numpy":
        return value.tobytes()
    n = value.numel() * value.element_size()
    return ctypes.string_at(value.data_ptr(), n) if n else b""


def fd_count():
    return len(os.listdir("/proc/self/fd"))


def cmd_verify(sock, name, ckpt, framework="auto", device=None):
    want = checkpoint_tensors(ckpt)
    with weightd.Client(sock) as c, c.attach(name, device=device, framework=framework) as att:
        checked = 0
        for tname, value in att.items():
            entry = want[tname]
            part = att.parts(tname)
            rows = att.rows(tname)
            offset, length = (part[0]["tensor_offset"], part[0]["bytes"]) if part else (0, 0)
            if rows is None and length != entry[4]:
                raise AssertionError("%s: %d bytes mapped, %d in the file" % (tname, length, entry[4]))
            if raw_bytes(value, att.framework) != file_bytes(entry, offset, length):
                raise AssertionError("%s differs from the checkpoint" % tname)
            checked += 1
        print(json.dumps({"tensors": checked, "framework": att.framework, "lease": att.lease,
                          "handles": att.info["handles"], "descriptors": att.info["descriptors"],
                          "rows": {k: att.rows(k) for k in att if att.rows(k)}, "devices": att.info["devices"],
                          "missing": sorted(set(want) - set(att))}))


def cmd_hold(sock, name, device=None, close_on_revoke=False):
    """Holds an attachment; with close_on_revoke, closes it from on_revoke
    (as a worker should) and reports what is left of it."""
    c = weightd.Client(sock)
    att = c.attach(name, device=device, framework="memoryview",
                   on_revoke=(lambda a, ev: a.close()) if close_on_revoke else None)
    parts = att.parts(next(iter(att)))
    print("READY %d" % att.lease, flush=True)
    while att.revoked is None or not close_on_revoke:
        att.process_events(timeout=None)
    try:
        att.fileno()
        fileno = "answered"
    except ValueError as e:
        fileno = str(e)
    print(json.dumps({"revoked": att.revoked, "fileno": fileno, "parts_kept": att.parts(next(iter(att._parts))) == parts,
                      "leases": len(c.leases())}), flush=True)


def cmd_cycles(sock, name, n):
    c = weightd.Client(sock)
    # the library and the first mapping's lazy set-up, outside the count
    c.attach(name, framework="memoryview").close()
    before = fd_count()
    for _ in range(n):
        att = c.attach(name, framework="memoryview")
        first = next(iter(att))
        bytes(att[first][:16])
        att.close()
    print(json.dumps({"before": before, "after": fd_count(), "leases": len(c.leases())}))


def cmd_write(sock, name):
    import numpy as np
    c = weightd.Client(sock)
    att = c.attach(name, framework="numpy")
    tname = max(att, key=lambda k: att[k].nbytes)
    arr = att[tname]
    try:
        arr.reshape(-1)[0] = 1
        refused = False
    except ValueError:
        refused = True
    ptr = att.parts(tname)[0]["ptr"]
    print(json.dumps({"numpy_refused": refused, "writeable": bool(arr.flags.writeable), "tensor": tname,
                      "first": int(np.frombuffer(arr.tobytes()[:1], np.uint8)[0])}), flush=True)
    # Past numpy, straight at the memory: the mapping itself must refuse.
    ctypes.memset(ptr, 0xAB, 64)
    print(json.dumps({"wrote": True}), flush=True)


def cmd_torch(sock, name, ckpt):
    import torch
    want = checkpoint_tensors(ckpt)
    with weightd.Client(sock) as c, c.attach(name, framework="torch") as att:
        sd = att.state_dict()
        dtypes = {}
        for tname, t in sd.items():
            if not isinstance(t, torch.Tensor):
                raise AssertionError("%s is a %s" % (tname, type(t)))
            part = att.parts(tname)
            if part and t.data_ptr() != part[0]["ptr"]:
                raise AssertionError("%s: data_ptr %#x is not the mapping %#x" % (tname, t.data_ptr(), part[0]["ptr"]))
            if raw_bytes(t, "torch") != file_bytes(want[tname], 0, want[tname][4]):
                raise AssertionError("%s differs from the checkpoint" % tname)
            dtypes[want[tname][0]] = [str(t.dtype), list(t.shape) == want[tname][1] or list(t.shape)]
        result = {"tensors": len(sd), "dtypes": dtypes, "device": str(next(iter(sd.values())).device),
                  "torch": torch.__version__}
        if "linear.weight" in sd:
            x = torch.arange(sd["linear.weight"].shape[1], dtype=torch.float32)
            y = torch.nn.functional.linear(x, sd["linear.weight"], sd["linear.bias"])
            result["linear"] = [float(v) for v in y]
            if hasattr(torch.nn.Module, "load_state_dict") and "assign" in \
                    torch.nn.Module.load_state_dict.__code__.co_varnames:
                m = torch.nn.Linear(sd["linear.weight"].shape[1], sd["linear.weight"].shape[0], device="meta")
                m.load_state_dict({"weight": sd["linear.weight"], "bias": sd["linear.bias"]}, assign=True)
                result["module_zero_copy"] = m.weight.data_ptr() == sd["linear.weight"].data_ptr()
                result["module"] = [float(v) for v in m(x)]
        print(json.dumps(result))


def cmd_ride(sock, name):
    """A worker that keeps computing on its tensors while the daemon dies
    and comes back: a thread sums every tensor's bytes over and over and
    checks they never change; stdin asks how it goes."""
    import threading
    import zlib
    att = weightd.Client(sock).attach(name, framework="memoryview")
    first = {k: zlib.crc32(bytes(v)) for k, v in att.items()}
    state = {"rounds": 0, "bad": 0, "run": True}

    def compute():
        while state["run"]:
            for k, v in list(att.items()):
                if zlib.crc32(bytes(v)) != first[k]:
                    state["bad"] += 1
            state["rounds"] += 1
    worker = threading.Thread(target=compute, daemon=True)
    worker.start()
    print("READY %d" % att.lease, flush=True)
    for line in sys.stdin:
        if line.strip() == "status":
            att.process_events(0)
            print(json.dumps({"lease": att.lease, "reattached": att.reattached, "lost": att.lost,
                              "rounds": state["rounds"], "bad": state["bad"]}), flush=True)
        elif line.strip() == "quit":
            break
    state["run"] = False
    worker.join()
    att.close()
    print(json.dumps({"closed": True}), flush=True)


def cmd_sleeper(sock, name):
    """A worker whose model the daemon puts to sleep and wakes: what it
    maps, where, and what the bytes are, on request. Its keeper thread
    answers the daemon's sleep and wake."""
    import zlib
    att = weightd.Client(sock).attach(name, framework="memoryview")
    lib = att._map.lib

    def handles():
        return [lib.wdc_attachment_handle(att._map.att, i).contents.ptr
                for i in range(lib.wdc_attachment_handle_count(att._map.att))]

    def crcs():
        return {k: zlib.crc32(bytes(v)) for k, v in att.items()}
    print("READY %d" % att.lease, flush=True)
    for line in sys.stdin:
        if line.strip() == "status":
            att.process_events(0)
            asleep = att.asleep
            print(json.dumps({"asleep": asleep, "wake_error": att.wake_error, "handles": handles(),
                              "crcs": None if asleep else crcs()}), flush=True)
        elif line.strip() == "quit":
            break
    att.close()
    print(json.dumps({"closed": True}), flush=True)


def main(argv):
    sock, cmd, args = argv[1], argv[2], argv[3:]
    opts = {}
    while len(args) >= 2 and args[-2].startswith("--"):
        opts[args[-2][2:]] = args[-1]
        args = args[:-2]
    if cmd == "verify":
        cmd_verify(sock, args[0], args[1], framework=opts.get("framework", "auto"), device=opts.get("device"))
    elif cmd == "hold":
        cmd_hold(sock, args[0], device=opts.get("device"), close_on_revoke=opts.get("close-on-revoke") == "1")
    elif cmd == "cycles":
        cmd_cycles(sock, args[0], int(args[1]))
    elif cmd == "write":
        cmd_write(sock, args[0])
    elif cmd == "torch":
        cmd_torch(sock, args[0], args[1])
    elif cmd == "ride":
        cmd_ride(sock, args[0])
    elif cmd == "sleeper":
        cmd_sleeper(sock, args[0])
    else:
        raise SystemExit("unknown command %r" % cmd)


if __name__ == "__main__":
    main(sys.argv)
