#!/usr/bin/env python3
"""weightd's allocator inside PyTorch against PyTorch's own, on real
PyTorch work (issue 13; GPU machine; `make bench-torch-alloc`).

The work: a transformers GPT-OSS model (fused experts) is loaded onto the
GPU (built on the meta device, then to_empty: every parameter allocated as
a checkpoint load allocates them), then rewritten in place as the seed
describes: each layer's expert tensors padded and re-laid-out into new
tensors, the old ones freed. Under each allocator setting, side by side in
one run, each trial a process of its own:

  default       PyTorch's caching allocator as it comes
  max_split     PyTorch's, with max_split_size_mb:20 while loading (vLLM's patch)
  expandable    PyTorch's, with expandable_segments:True
  weightd       libweightd-torch.so, weightd's load policy while loading

For each: load-and-rewrite time (median of --runs, uncapped), peak
reserved, and the smallest device cap at which load and rewrite complete
(binary search to --step; PyTorch: set_per_process_memory_fraction;
weightd: WEIGHTD_TORCH_CAPACITY). Then what each gives back once the
weights go: weightd sleeps their tag; PyTorch frees them and empties its
cache; both measured with cudaMemGetInfo against the bytes they reserved.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODES = ("default", "max_split", "expandable", "weightd")
MiB = 1 << 20
GiB = 1 << 30


# ---- one trial, in its own process ----------------------------------------------

def trial(mode, cap, layers):
    if mode == "expandable":
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if mode == "weightd" and cap:
        os.environ["WEIGHTD_TORCH_CAPACITY"] = str(cap)
    import contextlib
    import torch
    import transformers
    wta = None
    if mode == "weightd":
        from weightd import torch_allocator as wta
        wta.install()
    torch.cuda.init()
    total = torch.cuda.mem_get_info()[1]
    if cap and mode != "weightd":
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))

    @contextlib.contextmanager
    def loading():
        if mode == "weightd":
            with wta.load_policy(), wta.tag("weights"):
                yield
        elif mode == "max_split":
            torch.cuda.memory._set_allocator_settings("max_split_size_mb:20")
            try:
                yield
            finally:
                # PyTorch's parser puts max_split_size back to its default
                # before applying a text: "" restores it, as vLLM's patch does
                torch.cuda.memory._set_allocator_settings("")
        else:
            yield

    def reserved_peak():
        return wta.stats()["reserved_bytes.all.peak"] if wta else torch.cuda.max_memory_reserved()

    def reserved_now():
        return wta.stats()["reserved_bytes.all.current"] if wta else torch.cuda.memory_reserved()

    config = transformers.GptOssConfig(num_hidden_layers=layers, hidden_size=2880, intermediate_size=2880,
                                       num_local_experts=32, num_attention_heads=64, num_key_value_heads=8,
                                       head_dim=64, vocab_size=201088)
    free0 = torch.cuda.mem_get_info()[0]
    out = {"mode": mode, "cap": cap}
    try:
        t0 = time.perf_counter()
        with loading():
            with torch.device("meta"):
                model = transformers.GptOssForCausalLM(config).to(torch.bfloat16)
            model.to_empty(device="cuda")
            for layer in model.model.layers:
                ex = layer.mlp.experts
                for name in ("gate_up_proj", "down_proj"):
                    old = getattr(ex, name)
                    # padded to a multiple of 256 in the last dimension and
                    # laid out transposed: a new tensor, then the old freed
                    pad = (-old.shape[-1]) % 256 or 128
                    new = torch.nn.functional.pad(old.data, (0, pad)).transpose(1, 2).contiguous()
                    setattr(ex, name, torch.nn.Parameter(new, requires_grad=False))
                    del old, new
            torch.cuda.synchronize()
        out["seconds"] = time.perf_counter() - t0
        out["ok"] = True
    except torch.OutOfMemoryError as e:
        out.update(ok=False, error=str(e).splitlines()[0][:300])
    except RuntimeError as e:  # a CUDA error
        out.update(ok=False, error=str(e).splitlines()[0][:300])
    out["peak_reserved"] = reserved_peak()
    if out["ok"]:
        held = reserved_now()
        free_loaded = torch.cuda.mem_get_info()[0]
        if wta:
            wta.sleep("weights")
        else:
            del model
            torch.cuda.empty_cache()
        out.update(reserved=held, free_before_load=free0, free_loaded=free_loaded,
                   given_back=torch.cuda.mem_get_info()[0] - free_loaded)
    return out


# ---- the driver ---------------------------------------------------------------------

def run_trial(args, mode, cap):
    env = dict(os.environ, PYTHONPATH=os.path.join(args.repo, "client", "python"),
               WEIGHTD_TORCH_LIB=os.path.join(args.build, "libweightd-torch.so"))
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    r = subprocess.run([sys.executable, __file__, "--trial", mode, "--cap", str(cap), "--layers", str(args.layers)],
                       env=env, capture_output=True, text=True, timeout=600)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if not lines:  # died (weightd's allocator aborts on a request it cannot meet): not a completion
        return {"mode": mode, "cap": cap, "ok": False, "error": (r.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(lines[-1])


def smallest_cap(args, mode, high):
    """The smallest cap (to args.step) at which the trial completes; high completes."""
    low = 0
    while high - low > args.step:
        mid = (low + high) // 2 // args.step * args.step
        if mid <= low:
            break
        if run_trial(args, mode, mid)["ok"]:
            high = mid
        else:
            low = mid
    return high


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trial", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--cap", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=12, help="GPT-OSS-20B layers (1.6 GB each; default 12)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--step", type=int, default=256 * MiB, help="binary search resolution in bytes")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--build", default="build")
    ap.add_argument("--out", default="build/bench")
    args = ap.parse_args()
    if args.trial:
        print(json.dumps(trial(args.trial, args.cap, args.layers)))
        return
    args.repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args.build = os.path.abspath(args.build)
    results = {}
    for mode in args.modes.split(","):
        runs = [run_trial(args, mode, 0) for _ in range(args.runs)]
        bad = [r for r in runs if not r["ok"]]
        if bad:
            results[mode] = {"error": bad[0].get("error")}
            print("%-10s failed uncapped: %s" % (mode, bad[0].get("error")), flush=True)
            continue
        peak = max(r["peak_reserved"] for r in runs)
        cap = smallest_cap(args, mode, (peak + args.step - 1) // args.step * args.step + args.step)
        last = runs[-1]
        results[mode] = {"seconds": statistics.median(r["seconds"] for r in runs), "peak_reserved": peak,
                         "smallest_cap": cap, "reserved": last["reserved"], "given_back": last["given_back"],
                         "runs": runs}
        print("%-10s %6.2f s  peak reserved %6.2f GiB  smallest cap %6.2f GiB  gives back %6.2f of %6.2f GiB"
              % (mode, results[mode]["seconds"], peak / GiB, cap / GiB, last["given_back"] / GiB,
                 last["reserved"] / GiB), flush=True)
    if "weightd" in results and "seconds" in results.get("default", {}) and "seconds" in results["weightd"]:
        w, d = results["weightd"], results["default"]
        best = min(r["smallest_cap"] for m, r in results.items() if m != "weightd" and "smallest_cap" in r)
        print("weightd: smallest cap %.3f of PyTorch's best, load time %.3f of PyTorch's default, gives back %.4f"
              % (w["smallest_cap"] / best, w["seconds"] / d["seconds"], w["given_back"] / w["reserved"]))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "torch_alloc.json"), "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "layers": args.layers, "step": args.step, "results": results},
                  f, indent=1)


if __name__ == "__main__":
    main()
