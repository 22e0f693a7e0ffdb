#!/usr/bin/env python3
"""Builds tiny random Qwen3 checkpoints and records what Hugging Face transformers computes on them.

Each fixture directory under tests/reference/fixtures/ holds:
  config.json, model.safetensors (or shards + model.safetensors.index.json)  -- the checkpoint
  logits.safetensors  -- one f32 tensor `logits` [T, vocab]: transformers' full forward over the prompt
  golden.json         -- prompt ids, 24 greedy continuation ids (EOS ignored), versions, smallest top-1 margin

transformers always runs in float32 here (bf16/f16 checkpoints are upcast exactly on load), because the
tolerance the Rust tests hold every executor to is max |dlogit| <= 1e-3 in f32.

Usage (needs the pinned versions in requirements.txt; CI never runs this):
    python3 -m venv .venv && .venv/bin/pip install -r tests/reference/requirements.txt
    .venv/bin/python tests/reference/make_fixtures.py
"""

import json
import math
import os
import shutil
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fixtures")
GREEDY_TOKENS = 24
# A greedy step whose top-1/top-2 gap is below this would make the id comparison a coin toss.
MIN_MARGIN = 2e-3

COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    rms_norm_eps=1e-6,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    hidden_act="silu",
    attention_bias=False,
    use_sliding_window=False,
)


def fixtures():
    """name -> (config class, config kwargs, save dtype, config.json form, prompt length, shard size)."""
    return {
        # GQA 4:2, head_dim 32 != hidden/heads = 16, untied, f32, official (transformers 4.x) config form.
        "dense_gqa": (Qwen3Config, dict(COMMON, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
                      torch.float32, "v4", 9, None),
        # Tied embeddings, bf16 weights, GQA 4:1, transformers 5.x config form.
        "tied_bf16": (Qwen3Config, dict(COMMON, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
                      torch.bfloat16, "v5", 8, None),
        # MoE: 8 experts, top-2, renormalised, layer 1 dense through mlp_only_layers.
        "moe": (Qwen3MoeConfig, dict(COMMON, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                     decoder_sparse_step=1, mlp_only_layers=[1], tie_word_embeddings=False,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
                torch.float32, "v5", 10, None),
        # MoE without renormalisation, every second layer sparse, official config form (num_experts, torch_dtype).
        "moe_sparse_step": (Qwen3MoeConfig, dict(COMMON, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=2,
                                                 num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                                                 num_experts=6, num_experts_per_tok=3, norm_topk_prob=False,
                                                 decoder_sparse_step=2, mlp_only_layers=[], tie_word_embeddings=False,
                                                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
                            torch.float32, "v4", 7, None),
        # YaRN, factor 4 over an original window of 16 positions; the prompt alone runs past it.
        "yarn": (Qwen3Config, dict(COMMON, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=64, tie_word_embeddings=False,
                                   rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                    "original_max_position_embeddings": 16}),
                 torch.float32, "v5", 24, None),
        # Sharded f16 checkpoint with model.safetensors.index.json.
        "sharded_f16": (Qwen3Config, dict(COMMON, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
                        torch.float16, "v4", 6, "40KB"),
    }


def randomise(model, gen):
    """Every parameter random: norms near 1 (so swapped norm weights show), the rest N(0, 0.05)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def to_v4_form(cfg):
    """Rewrites a transformers 5.x config.json dict into the form the official Qwen3 checkpoints use."""
    rp = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = rp.get("rope_theta", 1000000.0)
    scaling = {k: v for k, v in rp.items() if k not in ("rope_theta",)}
    cfg["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    if "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
    cfg["transformers_version"] = "4.51.0"
    return cfg


def expand_fused_experts(model_dir):
    """transformers 5 may save MoE experts fused ([E, 2I, H] gate_up_proj); the released checkpoints store
    one tensor per expert, so rewrite into that layout if needed."""
    path = os.path.join(model_dir, "model.safetensors")
    if not os.path.exists(path):
        return
    tensors = load_file(path)
    if not any(k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj") for k in tensors):
        return
    out = {}
    for k, v in tensors.items():
        if k.endswith("experts.gate_up_proj"):
            base = k[: -len("gate_up_proj")]
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = v[e, :inter].contiguous()
                out[f"{base}{e}.up_proj.weight"] = v[e, inter:].contiguous()
        elif k.endswith("experts.down_proj"):
            base = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = v[e].contiguous()
        else:
            out[k] = v
    save_file(out, path, metadata={"format": "pt"})


@torch.no_grad()
def greedy(model, prompt, n):
    """Greedy continuation with the KV cache, EOS ignored; returns (ids, smallest top-1 margin)."""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    past = out.past_key_values
    logits = out.logits[0, -1]
    ids, margin = [], math.inf
    for _ in range(n):
        top = torch.topk(logits, 2)
        margin = min(margin, float(top.values[0] - top.values[1]))
        nxt = int(top.indices[0])
        ids.append(nxt)
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1]
    return ids, margin


def build(name, spec):
    cls, kwargs, dtype, form, prompt_len, shard = spec
    target = os.path.join(OUT, name)
    for seed in range(100):
        shutil.rmtree(target, ignore_errors=True)
        gen = torch.Generator().manual_seed(1000 + seed)
        config = cls(**kwargs)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        randomise(model, gen)
        model = model.to(dtype)
        save_args = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(target, **save_args)
        expand_fused_experts(target)
        for extra in ("generation_config.json",):
            if os.path.exists(os.path.join(target, extra)):
                os.remove(os.path.join(target, extra))
        cfg_path = os.path.join(target, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        if form == "v4":
            cfg = to_v4_form(cfg)
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")

        # The reference run reads the checkpoint back exactly as a user's would, in float32.
        ref = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
        prompt = torch.randint(0, kwargs["vocab_size"], (prompt_len,), generator=gen).tolist()
        logits = ref(input_ids=torch.tensor([prompt]), use_cache=False).logits[0].float().contiguous()
        ids, margin = greedy(ref, prompt, GREEDY_TOKENS)
        if margin < MIN_MARGIN:
            print(f"{name}: seed {seed} has a greedy margin of {margin:.2e}, trying the next", file=sys.stderr)
            continue
        save_file({"logits": logits}, os.path.join(target, "logits.safetensors"))
        golden = {
            "prompt_ids": prompt,
            "greedy_ids": ids,
            "min_greedy_margin": margin,
            "seed": 1000 + seed,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        with open(os.path.join(target, "golden.json"), "w") as f:
            json.dump(golden, f, indent=2)
            f.write("\n")
        print(f"{name}: seed {1000 + seed}, T={len(prompt)}, margin {margin:.3e}, files {sorted(os.listdir(target))}")
        return
    raise SystemExit(f"{name}: no seed gave a greedy margin above {MIN_MARGIN}")


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    only = set(sys.argv[1:])
    for name, spec in fixtures().items():
        if not only or name in only:
            build(name, spec)


if __name__ == "__main__":
    main()
