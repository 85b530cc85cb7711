"""A round's cost on an accelerator, at real shapes, with random weights (issue 19, item 8).

The device machine has no weights and no network, so: a random Qwen3-8B-shaped target in bf16 and a random
z-lab-shaped DFlash drafter (the shape of z-lab/Qwen3-8B-DFlash-b16: 5 layers over target layers
1/9/17/25/33, block 16), wrapped in an ORACLE that runs the real drafter forward (its cost) and then
replaces its output so that the target's own greedy continuation is drafted for the first `a - 1` depths
and a wrong token after: every round then commits exactly `a` tokens (acceptance a = 1, 3, 6). The target's
greedy continuation comes from a stock AR run first, which is also the baseline.

Reported per (mode, acceptance, budget): round time in AR steps (our seconds per round / stock AR's seconds
per token, same run) and speed against stock AR; modes "eager" and "graph" (generate()'s compile convention:
cache_implementation="static" + a CompileConfig, CUDA graphs on CUDA), with stock AR timed under the same
setting. Also greedy identity with AR for every run (random weights: a check of the loop, not of a drafter).

    python benchmarks/gpu_check.py --out gpu_check                         # on the GPU machine (< 5 min)
    python benchmarks/gpu_check.py --shape tiny --device cpu --modes eager --out /tmp/gc   # the CPU rehearsal
    python benchmarks/gpu_check.py --shape hybrid --budgets 16,64 --out gpu_check_hybrid   # a Qwen3.5-27B-shaped hybrid

Writes gpu_check.json and gpu_check.md (a markdown table) into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

SHAPES = {
    # Qwen3-8B (config.json of Qwen/Qwen3-8B) and the z-lab drafter for it
    "real": dict(target=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960),
                 drafter_layers=5, block_size=16, target_layer_ids=[1, 9, 17, 25, 33], prompt=512),
    "tiny": dict(target=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048),
                 drafter_layers=1, block_size=8, target_layer_ids=[1, 2], prompt=32),
    # a hybrid (issue 22): Qwen3.5-27B's shape as we take it (64 layers, every 4th full attention, Gated DeltaNet
    # with 16 key / 48 value heads of 128, conv kernel 4), a 5-layer block-16 drafter over 5 spread layers
    "hybrid": dict(family="qwen3_5", target=dict(vocab_size=248320, hidden_size=5120, intermediate_size=17408,
                                                 num_hidden_layers=64, num_attention_heads=24, num_key_value_heads=4,
                                                 head_dim=256, linear_num_key_heads=16, linear_num_value_heads=48,
                                                 linear_key_head_dim=128, linear_value_head_dim=128,
                                                 linear_conv_kernel_dim=4, max_position_embeddings=40960),
                   drafter_layers=5, block_size=16, target_layer_ids=[1, 16, 31, 46, 61], prompt=512),
    "hybrid-tiny": dict(family="qwen3_5", target=dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                                      head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                                                      linear_key_head_dim=16, linear_value_head_dim=16,
                                                      linear_conv_kernel_dim=4, max_position_embeddings=2048),
                        drafter_layers=1, block_size=8, target_layer_ids=[1, 2], prompt=32),
}


class OracleDrafter(nn.Module):
    """A DFlash drafter whose forward costs the real drafter's, but whose output drafts `reference` (the
    target's greedy text, by absolute position) for the first `correct` depths of each block and a wrong
    token after. The hidden state for token t is lm_head's row t, scaled: for a random head its own logit
    dominates (20 against ~20 / sqrt(H)), so the drafted token is t, with probability near 1."""

    def __init__(self, drafter, lm_head_weight: torch.Tensor, reference: list[int], correct: int):
        super().__init__()
        self.inner = drafter
        self.fc = drafter.fc  # what validate_pair recognises a DFlash drafter by
        self.config = drafter.config
        self.rows = lm_head_weight.detach().float()  # (V, H)
        self.reference = torch.tensor(reference, device=self.rows.device)
        self.correct = int(correct)

    def forward(self, position_ids=None, noise_embedding=None, target_hidden=None, **kwargs):
        hidden = self.inner(position_ids=position_ids, noise_embedding=noise_embedding, target_hidden=target_hidden,
                            **kwargs)  # (B, Q, H): the real cost
        bs = int(self.config.block_size)
        q = noise_embedding.shape[1]
        pos = position_ids[:, -q:]  # (B, Q) positions of the block tokens
        depth = torch.arange(q, device=pos.device) % bs  # (Q,) 0 = the block's root
        want = self.reference[pos.clamp(max=self.reference.numel() - 1)]  # (B, Q) the target's token there
        wrong = (want + 1) % self.rows.shape[0]
        # block position j predicts depth j (position root + j): correct while j <= correct
        tok = torch.where(depth[None] <= self.correct, want, wrong)
        h = self.rows[tok]  # (B, Q, H): lm_head(h * 20 / |h|^2) gives token `tok` the logit 20, others ~20 / sqrt(H)
        return (h * (20.0 / h.pow(2).sum(-1, keepdim=True))).to(hidden.dtype) + 0 * hidden


def build(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig, Qwen3Config, Qwen3ForCausalLM

    from hf_ddtree import DFlashDraftModel, make_drafter_config

    spec = SHAPES[shape]
    torch.manual_seed(seed)
    config_cls, model_cls = ((Qwen3_5TextConfig, Qwen3_5ForCausalLM) if spec.get("family") == "qwen3_5"
                             else (Qwen3Config, Qwen3ForCausalLM))
    cfg = config_cls(**spec["target"], tie_word_embeddings=False)
    if spec.get("family") != "qwen3_5":
        cfg = config_cls(**spec["target"], tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    with torch.device(device):
        target = model_cls._from_config(cfg, attn_implementation="sdpa", dtype=dtype).eval()
        dcfg = make_drafter_config(cfg, num_hidden_layers=spec["drafter_layers"], block_size=spec["block_size"],
                                   mask_token_id=cfg.vocab_size - 1, target_layer_ids=spec["target_layer_ids"])
        drafter = DFlashDraftModel(dcfg).to(dtype).eval()
    return target, drafter, spec


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="real", choices=sorted(SHAPES))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--budgets", default="16,64,256")
    ap.add_argument("--accept", default="1,3,6", help="tokens committed per round, set by the oracle")
    ap.add_argument("--modes", default="eager,graph")
    ap.add_argument("--new", type=int, default=64, help="new tokens per run")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import hf_ddtree
    from transformers import CompileConfig, GenerationMixin

    from hf_ddtree.device import pick_device

    device = pick_device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    target, drafter, spec = build(args.shape, device, dtype)
    hf_ddtree.enable(target)
    torch.manual_seed(1)
    ids = torch.randint(0, target.config.vocab_size - 2, (1, spec["prompt"]), device=device)
    budgets = [int(b) for b in args.budgets.split(",")]
    accepts = [int(a) for a in args.accept.split(",")]
    gen = dict(do_sample=False, max_new_tokens=args.new)
    rows, log = [], (lambda m: print(m, file=sys.stderr, flush=True))

    for mode in args.modes.split(","):
        extra = {}
        if mode == "graph":  # generate()'s convention: a static cache + a CompileConfig (CUDA graphs on CUDA)
            cc = CompileConfig(fullgraph=False, dynamic=False)
            if device.type != "cuda":
                cc._compile_all_devices = True
            extra = dict(cache_implementation="static", compile_config=cc)
        # stock AR under the same setting: the baseline, and the reference continuation
        GenerationMixin.generate(target, ids, **{**gen, "max_new_tokens": 4}, **extra)  # warm-up / compile
        t_ar, ref = timed(lambda: GenerationMixin.generate(target, ids, **gen, **extra), device)
        new = ref.shape[1] - ids.shape[1]
        ar_step = t_ar / new
        reference = ref[0].tolist() + [0] * (spec["block_size"] + 2)
        log(f"[{mode}] AR: {new} tokens, {1e3 * ar_step:.2f} ms per token")
        for a in accepts:
            oracle = OracleDrafter(drafter, target.get_output_embeddings().weight, reference, correct=a - 1)
            for budget in budgets:
                kw = dict(assistant_model=oracle, tree_budget=budget, return_dict_in_generate=True, **gen, **extra)
                target.generate(ids, **{**kw, "max_new_tokens": 2 * spec["block_size"]})  # warm-up / compile
                t, out = timed(lambda: target.generate(ids, **kw), device)
                acc = out.acceptance_lengths
                row = dict(mode=mode, accept=a, budget=budget, rounds=len(acc), tau=sum(acc) / len(acc),
                           round_ar_steps=(t / len(acc)) / ar_step, speed_vs_ar=t_ar / t,
                           identical=bool(torch.equal(out.sequences, ref)), ms_per_round=1e3 * t / len(acc))
                rows.append(row)
                log(f"[{mode}] accept {a} budget {budget}: tau {row['tau']:.2f}, round {row['round_ar_steps']:.2f} AR "
                    f"steps, {row['speed_vs_ar']:.2f}x AR, identical {row['identical']}")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = dict(shape=args.shape, device=name, dtype=args.dtype, new_tokens=args.new, prompt=spec["prompt"],
                torch=torch.__version__, transformers=__import__("transformers").__version__)
    (out_dir / "gpu_check.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"{name}, {args.shape} shapes, {args.dtype}, prompt {spec['prompt']} + {args.new} new tokens, random weights "
             "(oracle acceptance)", "",
             "| mode | tokens per round | budget | round cost (AR steps) | speed vs AR | identical |",
             "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['mode']} | {r['tau']:.2f} | {r['budget']} | {r['round_ar_steps']:.2f} | {r['speed_vs_ar']:.2f}x | "
              f"{'yes' if r['identical'] else 'NO'} |" for r in rows]
    (out_dir / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
