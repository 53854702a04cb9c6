"""A worker for the GPU tests: a Hugging Face model built on the meta device,
given weightd's tensors with load_state_dict(assign=True), run on the GPU.

    hf_worker.py save KIND DIR              a tiny model of KIND (llama, gpt-oss), saved sharded
    hf_worker.py serve SOCKET NAME DIR      forward on served weights; the same from_pretrained(DIR); compare
    hf_worker.py write SOCKET NAME [--writable]   add 1 to a served tensor on the GPU

Each prints one JSON line; failures are tracebacks and exit status 1.
"""

import inspect
import json
import os
import sys

import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "client", "python"))
import weightd  # noqa: E402

SEED = 1234


def config(kind):
    common = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=256, tie_word_embeddings=False)
    if kind == "llama":
        return transformers.LlamaConfig(intermediate_size=128, **common)
    if kind == "gpt-oss":
        return transformers.GptOssConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                                         sliding_window=8, **common)
    raise SystemExit("unknown kind %r" % kind)


def from_config(cfg):
    try:
        return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="eager")
    except TypeError:
        return transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16,
                                                             attn_implementation="eager")


def cmd_save(kind, out):
    torch.manual_seed(SEED)
    model = from_config(config(kind))
    with torch.no_grad():
        for p in model.parameters():  # finite, reproducible values in every tensor
            p.normal_(0, 0.05)
    model.save_pretrained(out, max_shard_size="100KB")
    shards = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    print(json.dumps({"kind": kind, "shards": len(shards), "parameters": len(list(model.parameters())),
                      "transformers": transformers.__version__, "torch": torch.__version__}))


def input_ids(vocab):
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(0, vocab, (2, 24), generator=g).cuda()


def rebuild_meta_buffers(model, device):
    """Non-persistent buffers (rotary inverse frequencies) are in no state
    dict: the modules that hold them are made again, on the device."""
    for parent in list(model.modules()):
        for cname, child in list(parent.named_children()):
            if any(b.is_meta for b in child.buffers(recurse=False)) and not list(child.parameters(recurse=False)):
                kwargs = {"config": model.config, "device": device}
                if "layer_type" in inspect.signature(type(child).__init__).parameters:
                    kwargs["layer_type"] = getattr(child, "layer_type", None)
                setattr(parent, cname, type(child)(**kwargs))
    still = [n for n, b in model.named_buffers() if b.is_meta] + [n for n, p in model.named_parameters() if p.is_meta]
    if still:
        raise AssertionError("left on the meta device: %s" % still)


def logits_bits(model, ids):
    with torch.no_grad():
        out = model(ids).logits
    torch.cuda.synchronize()
    return out


def cmd_serve(sock, name, path):
    cfg = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        served = from_config(cfg)
    with weightd.Client(sock) as c, c.attach(name, device=0, framework="torch") as att:
        sd = att.state_dict()
        result = served.load_state_dict(sd, assign=True, strict=True)
        ptrs = {n: p.data_ptr() for n, p in served.named_parameters()}
        zero_copy = all(ptrs[n] == sd[n].data_ptr() for n in ptrs)
        rebuild_meta_buffers(served, "cuda:0")
        served.eval()
        ids = input_ids(cfg.vocab_size)
        got = logits_bits(served, ids)
        # The reference: the checkpoint read from disk by transformers itself.
        try:
            ref_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                                          attn_implementation="eager")
        except TypeError:
            ref_model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16,
                                                                          attn_implementation="eager")
        want = logits_bits(ref_model.to("cuda:0").eval(), ids)
        same = got.dtype == want.dtype and got.shape == want.shape and torch.equal(
            got.view(torch.int16), want.view(torch.int16))
        print(json.dumps({"tensors": len(sd), "missing": list(result.missing_keys),
                          "unexpected": list(result.unexpected_keys), "zero_copy": zero_copy,
                          "devices": sorted({str(t.device) for t in sd.values()}),
                          "dtypes": sorted({str(t.dtype) for t in sd.values()}), "logits_shape": list(got.shape),
                          "finite": bool(torch.isfinite(got.float()).all()), "bit_for_bit": bool(same),
                          "max_abs_diff": float((got.float() - want.float()).abs().max()),
                          "handles": att.info["handles"], "descriptors": att.info["descriptors"],
                          "handle_type": att.info["handle_type"]}))


def cmd_write(sock, name, writable):
    with weightd.Client(sock) as c:
        att = c.attach(name, device=0, framework="torch", writable=writable)
        t = max(att.values(), key=lambda x: x.numel())
        print(json.dumps({"tensor_device": str(t.device), "writable": writable}), flush=True)
        t.add_(1)
        torch.cuda.synchronize()
        print(json.dumps({"wrote": True}), flush=True)
        att.close()


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "save":
        cmd_save(*args)
    elif cmd == "serve":
        cmd_serve(*args)
    elif cmd == "write":
        cmd_write(args[0], args[1], "--writable" in args)
    else:
        raise SystemExit("unknown command %r" % cmd)
