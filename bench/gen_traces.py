#!/usr/bin/env python3
"""Write MoE load traces (shared/traces/README.md format v1) to bench/traces/.

Each workload is written twice: NAME-default.trace, and NAME-tight.trace
which sets max_split_size_mb:20 before loading and restores the default
after post-processing, as vLLM does. Shapes come from the public configs;
the sequences model what an inference engine does at load time.

  gptoss-tp1    GPT-OSS-120B at tensor-parallel 1: every parameter allocated
                up front, MXFP4 expert weights rewritten layer by layer into a
                swizzled layout (padded copy, permuted copy, temporaries, new
                tensor, old one freed), then runtime allocations.
  mixtral-fuse  Mixtral-8x7B (16 of its 32 layers) loaded as per-expert w1/w2/w3
                tensors, fused layer by layer into stacked w13 and w2 tensors.
  qwen3-staging Qwen3-30B-A3B (24 of 48 layers) read shard by shard through a
                GPU staging buffer, per-expert tensors fused after each layer
                is complete.

Usage: bench/gen_traces.py [OUTDIR]   (default: bench/traces next to this file)
       bench/gen_traces.py --random N FILE   a trace of N random operations (replay speed)
"""
import os
import sys


class Trace:
    def __init__(self, title):
        self.lines = ["# " + title]
        self.next_id = 1

    def alloc(self, size):
        i = self.next_id
        self.next_id += 1
        self.lines.append("alloc %d %d" % (i, size))
        return i

    def free(self, i):
        self.lines.append("free %d" % i)

    def policy(self, conf):
        self.lines.append("policy " + conf)

    def mark(self, label):
        self.lines.append("mark " + label)


def runtime(t, kv_bytes, steps, seed):
    """After loading: a KV cache, then activation-sized allocations that come
    and go, of sizes that drift (batch sizes change)."""
    t.alloc(kv_bytes)
    live = []
    x = seed
    for _ in range(steps):
        x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        size = (1 << 20) + (x >> 40) % (48 << 20)
        live.append(t.alloc(size))
        if len(live) > 6:
            t.free(live.pop(0))
    for i in live:
        t.free(i)


def gptoss_tp1(tight):
    h, e, inter, layers, vocab = 2880, 128, 2880, 36, 201088
    padded = 2944  # the swizzled layout pads the intermediate size
    t = Trace("gpt-oss-120b tp1 layers%d tight=%s (weightd bench/gen_traces.py)" % (layers, tight))
    if tight:
        t.policy("max_split_size_mb:20")
    t.alloc(vocab * h * 2)  # embed
    params = []
    for _ in range(layers):
        p = {}
        for _, size in (("ln1", h * 2), ("ln2", h * 2), ("q", 4096 * h * 2), ("qb", 4096 * 2),
                           ("k", 512 * h * 2), ("kb", 512 * 2), ("v", 512 * h * 2), ("vb", 512 * 2),
                           ("o", h * 4096 * 2), ("ob", h * 2), ("sinks", 64 * 2),
                           ("router", e * h * 2), ("routerb", e * 2)):
            t.alloc(size)
        p["gu"] = t.alloc(e * 2 * inter * 90 * 16)
        p["gus"] = t.alloc(e * 2 * inter * 90)
        t.alloc(e * 2 * inter * 2)
        p["dn"] = t.alloc(e * h * 90 * 16)
        p["dns"] = t.alloc(e * h * 90)
        t.alloc(e * h * 2)
        params.append(p)
    t.alloc(h * 2)
    t.alloc(vocab * h * 2)  # lm_head
    t.mark("params-initialized")
    for p in params:
        for key, rows in (("gu", 2 * padded), ("dn", padded // 2 * 2)):
            new_size = e * rows * 90 * 16
            pad = t.alloc(new_size)
            perm = t.alloc(new_size)
            t.free(pad)
            temps = [t.alloc(new_size // 4), t.alloc(new_size // 4)]
            new = t.alloc(new_size)
            for x in temps:
                t.free(x)
            t.free(perm)
            t.free(p[key])
            p[key] = new
        for key in ("gus", "dns"):
            s = t.alloc(e * 2 * padded * 90 if key == "gus" else e * padded * 90)
            t.free(p[key])
            p[key] = s
    t.mark("post-processed")
    if tight:
        t.policy("default")
    runtime(t, 8 << 30, 400, 1)
    t.mark("runtime")
    return t


def mixtral_fuse(tight):
    h, inter, experts, layers, vocab = 4096, 14336, 8, 16, 32000
    t = Trace("mixtral-8x7b (%d layers) per-expert load then fuse, tight=%s (weightd bench/gen_traces.py)"
              % (layers, tight))
    if tight:
        t.policy("max_split_size_mb:20")
    t.alloc(vocab * h * 2)
    per_expert = []
    for _ in range(layers):
        for size in (h * 2, h * 2, h * h * 2, 1024 * h * 2, 1024 * h * 2, h * h * 2, experts * h * 2):
            t.alloc(size)
        per_expert.append([(t.alloc(inter * h * 2), t.alloc(h * inter * 2), t.alloc(inter * h * 2))
                           for _ in range(experts)])
    t.alloc(h * 2)
    t.alloc(vocab * h * 2)
    t.mark("loaded")
    for layer in per_expert:
        w13 = t.alloc(experts * 2 * inter * h * 2)
        for w1, _, w3 in layer:
            t.free(w1)
            t.free(w3)
        w2 = t.alloc(experts * h * inter * 2)
        for _, w2e, _ in layer:
            t.free(w2e)
        del w13, w2
    t.mark("fused")
    if tight:
        t.policy("default")
    runtime(t, 4 << 30, 300, 2)
    t.mark("runtime")
    return t


def qwen3_staging(tight):
    h, moe, experts, layers, vocab = 2048, 768, 128, 24, 151936
    shard_bytes = 4 << 30
    t = Trace("qwen3-30b-a3b (%d layers) sharded load through a staging buffer, tight=%s "
              "(weightd bench/gen_traces.py)" % (layers, tight))
    if tight:
        t.policy("max_split_size_mb:20")
    # The checkpoint in file order: each layer's attention, then its experts.
    tensors = [("embed", vocab * h * 2)]
    for layer in range(layers):
        for size in (4096 * h * 2, 512 * h * 2, 512 * h * 2, h * 4096 * 2, 128 * 2, 128 * 2, h * 2, h * 2,
                     experts * h * 2):
            tensors.append(("L%d" % layer, size))
        for _ in range(experts):
            for size in (moe * h * 2, moe * h * 2, h * moe * 2):
                tensors.append(("E%d" % layer, size))
    tensors += [("norm", h * 2), ("lm_head", vocab * h * 2)]
    experts_of = {}
    i = 0
    while i < len(tensors):
        staged, j = 0, i
        while j < len(tensors) and (staged == 0 or staged + tensors[j][1] <= shard_bytes):
            staged += tensors[j][1]
            j += 1
        staging = t.alloc(staged)
        for name, size in tensors[i:j]:
            ident = t.alloc(size)
            if name.startswith("E"):
                experts_of.setdefault(name, []).append((ident, size))
        t.free(staging)
        # Fuse every layer whose experts are all in.
        for name in [n for n, v in experts_of.items() if len(v) == experts * 3]:
            parts = experts_of.pop(name)
            w13 = t.alloc(experts * 2 * moe * h * 2)
            w2 = t.alloc(experts * h * moe * 2)
            for ident, _ in parts:
                t.free(ident)
            del w13, w2
        i = j
    t.mark("loaded")
    if tight:
        t.policy("default")
    runtime(t, 4 << 30, 300, 3)
    t.mark("runtime")
    return t


WORKLOADS = {"gptoss-tp1": gptoss_tp1, "mixtral-fuse": mixtral_fuse, "qwen3-staging": qwen3_staging}


def random_trace(n, path):
    """n operations: allocations of log-uniform sizes from 512 B to 64 MiB
    and frees of random live blocks, about 2000 alive at a time."""
    import random
    rng = random.Random(42)
    live, next_id, lines = [], 1, ["# %d random operations (weightd bench/gen_traces.py --random)" % n]
    for _ in range(n):
        if live and (len(live) > 2000 or rng.random() < 0.5):
            i = rng.randrange(len(live))
            live[i], live[-1] = live[-1], live[i]
            lines.append("free %d" % live.pop())
        else:
            lines.append("alloc %d %d" % (next_id, int(2 ** rng.uniform(9, 26))))
            live.append(next_id)
            next_id += 1
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--random":
        random_trace(int(sys.argv[2]), sys.argv[3])
        return
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "traces")
    os.makedirs(out, exist_ok=True)
    for name, make in WORKLOADS.items():
        for tight in (False, True):
            t = make(tight)
            path = os.path.join(out, "%s-%s.trace" % (name, "tight" if tight else "default"))
            with open(path, "w") as f:
                f.write("\n".join(t.lines) + "\n")
            print("%s: %d lines" % (path, len(t.lines)))


if __name__ == "__main__":
    main()
