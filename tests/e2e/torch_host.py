"""Scenarios of libweightd-torch.so on the host backend, one per process (the
library sets itself up once, from the environment): run as
`torch_host.py SCENARIO`; exits 0 when every check held, else prints what
failed. test_torch_allocator.py runs them. PyTorch calls the same two
functions (weightd_torch_alloc, weightd_torch_free) with device pointers;
here they are host pointers, so the bytes can be checked directly."""

import ctypes
import errno
import json
import os
import random
import sys
import threading

from weightd import torch_allocator as wta

MiB = 1 << 20
lib = wta.library()


def alloc(size, stream=0):
    p = lib.weightd_torch_alloc(size, 0, stream)
    assert p, "alloc(%d) failed: %s" % (size, lib.weightd_torch_error().decode())
    return p


def free(p, stream=0):
    lib.weightd_torch_free(p, 0, 0, stream)


def reserved():
    return wta.stats()["reserved_bytes.all.current"]


def pattern(n, seed):
    r = random.Random(seed)
    block = bytes(r.getrandbits(8) for _ in range(4096))
    return (block * (n // 4096 + 1))[:n]


def expect_error(code, f, *args):
    try:
        f(*args)
    except OSError as e:
        assert e.errno == code, "%s: errno %s, not %s (%s)" % (f.__name__, e.errno, code, e)
        assert str(e.strerror), "no message"
        return str(e.strerror)
    raise AssertionError("%s%r did not fail" % (f.__name__, args))


def sleep_and_wake():
    """The seed's scenario inside one process: the tag's bytes all go back,
    other memory takes their place, and wake restores them at the same
    addresses."""
    base = reserved()
    with wta.load_policy(), wta.tag("weights"):
        big, small = alloc(150 * MiB), alloc(100000)
    data_big, data_small = pattern(150 * MiB, 1), pattern(100000, 2)
    ctypes.memmove(big, data_big, len(data_big))
    ctypes.memmove(small, data_small, len(data_small))
    tagged = reserved() - base
    assert tagged >= 150 * MiB, tagged

    wta.sleep("weights")
    assert reserved() == base, (reserved(), base)
    expect_error(errno.EALREADY, wta.sleep, "weights")
    with wta.tag("weights"):
        assert not lib.weightd_torch_alloc(4096, 0, None), "allocated under a sleeping tag"
    other = alloc(200 * MiB)  # fits only because the tag's bytes came back
    expect_error(errno.ENOMEM, wta.wake, "weights")
    free(other)
    wta.empty_cache()

    wta.wake("weights")
    assert ctypes.string_at(big, len(data_big)) == data_big, "the big block's bytes changed"
    assert ctypes.string_at(small, len(data_small)) == data_small, "the small block's bytes changed"
    assert reserved() - base == tagged, (reserved(), base, tagged)
    expect_error(errno.EALREADY, wta.wake, "weights")

    # Discarded: the memory comes back, not the bytes.
    wta.sleep("weights", offload=False)
    wta.wake("weights")
    assert ctypes.string_at(big, 4096) != data_big[:4096]
    free(big)
    free(small)
    wta.empty_cache()
    assert reserved() == 0, reserved()


def touch_asleep():
    """Reading a sleeping tag's memory: SIGSEGV (the test expects this death)."""
    with wta.tag("kv"):
        p = alloc(8 * MiB)
    wta.sleep("kv")
    print("touching", flush=True)
    ctypes.string_at(p, 1)


def policies():
    """Push and pop restore every key; a bad push changes nothing."""
    before = wta.policy()
    assert before == "max_split_size_mb:100,garbage_collection_threshold:0.5", before
    with wta.load_policy():
        inside = wta.policy()
        assert "expandable_segments:True" in inside and "max_split_size_mb:20" in inside, inside
        with wta.load_policy("roundup_power2_divisions:4"):
            assert "roundup_power2_divisions:4" in wta.policy()
        assert wta.policy() == inside
        msg = expect_error(errno.EINVAL, lambda: wta.load_policy("max_split_size_mb:-1").__enter__())
        assert "max_split_size_mb" in msg, msg
        assert wta.policy() == inside
    assert wta.policy() == before, wta.policy()
    expect_error(errno.ENOENT, lambda: _check_pop())


def _check_pop():
    wta._check(lib.weightd_torch_policy_pop())


def streams():
    """A block freed on stream 1 goes to stream 1 only."""
    a = alloc(30 * MiB, stream=1)
    free(a, stream=1)
    b = alloc(30 * MiB, stream=2)
    assert b != a
    c = alloc(30 * MiB, stream=1)
    assert c == a
    free(b)
    free(c)


def stats_names():
    """torch.cuda.memory_stats()'s names, with the right figures."""
    p = alloc(30 * MiB)
    s = wta.stats()
    for key in ("allocated_bytes.all.current", "allocated_bytes.all.peak", "reserved_bytes.all.current",
                "active_bytes.all.current", "inactive_split_bytes.all.current", "requested_bytes.all.current",
                "allocation.all.current", "segment.all.current", "oversize_allocations.current",
                "oversize_segments.peak", "num_alloc_retries", "num_ooms", "num_device_alloc", "num_device_free"):
        assert key in s, key
    assert s["allocated_bytes.all.current"] == 30 * MiB, s
    assert s["requested_bytes.all.current"] == 30 * MiB, s
    assert s["allocation.all.current"] == 1, s
    free(p)
    s = wta.stats()
    assert s["allocated_bytes.all.current"] == 0 and s["allocated_bytes.all.peak"] == 30 * MiB, s
    wta.reset_peak_memory_stats()
    assert wta.stats()["allocated_bytes.all.peak"] == 0
    snap = wta.snapshot()
    assert len(snap) == 1 and snap[0]["blocks"][0]["state"] == "inactive", snap
    wta.empty_cache()
    assert wta.snapshot() == [] and reserved() == 0
    expect_error(errno.ENODEV, wta.stats, 5)


def errors():
    """Clear errors, and nothing breaks."""
    p = alloc(4096)
    expect_error(errno.ENOENT, wta.sleep, "nope")
    expect_error(errno.EINVAL, wta.sleep, None)
    msg = expect_error(errno.EBUSY, lambda: wta._check(lib.weightd_torch_configure(b"max_split_size_mb:20")))
    assert "before the first" in msg, msg
    lib.weightd_torch_free(p + 8, 0, 0, None)  # not one it handed out: said on stderr, ignored
    assert not lib.weightd_torch_alloc(1 << 40, 0, None)
    assert "out of memory" in lib.weightd_torch_error().decode()
    assert not lib.weightd_torch_alloc(4096, 3, None)  # no device 3
    free(p)
    assert wta.stats()["allocated_bytes.all.current"] == 0


def bad_environment():
    """A capacity that is no size: every allocation fails, saying why."""
    assert not lib.weightd_torch_alloc(4096, 0, None)
    msg = expect_error(errno.EINVAL, wta.policy)
    assert "WEIGHTD_TORCH_CAPACITY" in msg, msg


def threads():
    """Eight threads at once: the lock keeps the allocator whole."""
    failures = []

    def work(seed):
        r = random.Random(seed)
        live = []
        try:
            for _ in range(1500):
                if live and (len(live) >= 16 or r.random() < 0.5):
                    free(live.pop(r.randrange(len(live))), stream=seed % 3)
                else:
                    live.append(alloc(r.choice([512, 4096, 100000, 3 * MiB, 12 * MiB]), stream=seed % 3))
            for p in live:
                free(p, stream=seed % 3)
        except AssertionError as e:
            failures.append(str(e))

    ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not failures, failures
    assert wta.stats()["allocated_bytes.all.current"] == 0
    wta.empty_cache()
    assert reserved() == 0, reserved()


def out_of_memory():
    """More than the device holds: by default the process stops here."""
    alloc(64 * MiB)
    lib.weightd_torch_alloc(1 << 40, 0, None)
    print("returned")


if __name__ == "__main__":
    globals()[sys.argv[1]]()
    print(json.dumps({"ok": sys.argv[1]}))
