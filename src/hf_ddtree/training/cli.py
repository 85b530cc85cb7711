"""`hf-ddtree train-drafter`: target features -> DFlash drafter, resumable.

    hf-ddtree make-responses --target smollm2-135m --out runs/d1/responses.jsonl
    hf-ddtree train-drafter --target smollm2-135m --responses runs/d1/responses.jsonl --out runs/d1 \\
        --layers 1 --block-size 16 --steps 2000 --threads 2

Stages: (1) load the target; (2) extract and cache its hidden states at `--target-layer-ids` for
every response record (`--features-dir`, default OUT/features; already cached records are
skipped); (3) train the drafter (`hf_ddtree.training.train`), checkpointing to
OUT/checkpoint-last; `--resume` continues an interrupted run. Output: OUT/final (the drafter,
loadable with `DFlashDraftModel.from_pretrained`), OUT/train_log.jsonl and OUT/command.txt (the
command as invoked and with every option spelled out, to reproduce the run).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _load_target(name_or_path: str, dtype: torch.dtype):
    """(model, tokenizer) via hf_ddtree.models.load_target (names like "smollm2-135m", or a local dir)."""
    from hf_ddtree.models import load_target

    return load_target(name_or_path, dtype=dtype)


def _default_mask_token_id(target_name: str, tokenizer):
    try:
        from hf_ddtree import models
    except ImportError:
        models = None
    value = getattr(models, "DEFAULT_MASK_TOKEN_ID", None) if models is not None else None
    if isinstance(value, dict):
        value = value.get(target_name)
    if value is None and tokenizer is not None and getattr(tokenizer, "mask_token_id", None) is not None:
        value = tokenizer.mask_token_id
    return None if value is None else int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-ddtree train-drafter", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--target", default="smollm2-135m", help="target model name (see hf_ddtree.models) or local dir")
    g.add_argument("--target-dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="dtype the target runs in for feature extraction (auto: bf16 where bf16 matmuls are "
                        "native, else fp32; features are stored in bf16 either way)")
    g.add_argument("--responses", default=None, help="JSONL from `hf-ddtree make-responses` (optional when the "
                   "features are already cached)")
    g.add_argument("--features-dir", default=None, help="feature cache (default: OUT/features)")
    g.add_argument("--out", required=True, help="output dir: checkpoint-last/, final/, train_log.jsonl, command.txt")
    g.add_argument("--max-records", type=int, default=None, help="use only the first N response records")
    g.add_argument("--max-length", type=int, default=None, help="truncate prompt+response to N tokens")
    g.add_argument("--shard-tokens", type=int, default=1 << 20, help="tokens per feature shard")
    g.add_argument("--val-fraction", type=float, default=0.05, help="records held out (by id hash) for validation")
    g = p.add_argument_group("drafter")
    g.add_argument("--layers", type=int, default=1, help="drafter decoder layers")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--target-layer-ids", default=None,
                   help="comma-separated target layers read by the drafter (default: max(3, --layers) evenly "
                        "spaced, z-lab's rule)")
    g.add_argument("--mask-token-id", type=int, default=None,
                   help="mask token (default: hf_ddtree.models.DEFAULT_MASK_TOKEN_ID for the target)")
    g.add_argument("--intermediate-size", type=int, default=None, help="drafter MLP width (default: the target's)")
    g.add_argument("--init-from-target", action=argparse.BooleanOptionalAction, default=True,
                   help="initialise the drafter layers from the target's top layers (DFlash: fresh init)")
    g.add_argument("--init-from-drafter", default=None, metavar="DIR",
                   help="start from this drafter's weights (same shapes; e.g. warm-start a --prefix-mode drafter "
                        "from a trained plain one); overrides --init-from-target")
    g.add_argument("--prefix-mode", action="store_true",
                   help="variable-prefix drafter (D^2SD): k ~ U[0, bs-2] clean tokens after the anchor")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None, help="optimiser steps (default: from --epochs)")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--batch-tokens", type=int, default=4096, help="block tokens per optimiser step")
    g.add_argument("--anchors-per-seq", type=int, default=32, help="blocks per sequence per visit")
    g.add_argument("--lr", type=float, default=6e-4)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--betas", default="0.9,0.95")
    g.add_argument("--warmup-ratio", type=float, default=0.04)
    g.add_argument("--warmup-steps", type=int, default=None)
    g.add_argument("--gamma", type=float, default=None, help="loss decay over block positions (default: 7 for bs 16)")
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--logits-chunk", type=int, default=1024, help="rows per lm_head chunk in the loss")
    g.add_argument("--head-vocab", type=int, default=0, metavar="N",
                   help="train with a softmax over the N most frequent response tokens + each step's labels "
                        "+ random negatives (validation always uses the full vocabulary); 0: full softmax")
    g.add_argument("--head-negatives", type=int, default=None, metavar="K",
                   help="random other tokens in each step's softmax with --head-vocab (default N/2)")
    g.add_argument("--distill-topk", type=int, default=None, metavar="K",
                   help="store the target's top-K next-token log-probs with the features (distillation targets). "
                        "Default: what an existing --features-dir holds, 0 for a new one")
    g.add_argument("--distill-alpha", type=float, default=0.0, metavar="A",
                   help="weight of the cross-entropy to the target's top-K distribution, (1-A) on the hard label; "
                        "needs a cache with top-K log-probs (0: hard labels only, the default: docs/models.md, "
                        "\"Distillation\")")
    g.add_argument("--standardize-features", action=argparse.BooleanOptionalAction, default=True,
                   help="data-dependent fc init: scale its input columns by 1/RMS of each feature channel")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast with fp32 master weights (default: on where bf16 matmuls are native: CUDA, "
                        "AVX512-BF16/AMX CPUs; off on AVX2-only CPUs, where emulated bf16 is ~10x slower)")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    g.add_argument("--device", default="auto", help="where the target (feature extraction) and the drafter "
                   "(training) run: auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run control")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint-last")
    g.add_argument("--eval-every", type=int, default=100)
    g.add_argument("--val-anchors", type=int, default=32, help="blocks per held-out record")
    g.add_argument("--save-every", type=int, default=200)
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--stop-after", type=int, default=None, help="stop this run after N steps (then --resume)")
    g.add_argument("--max-minutes", type=float, default=None, help="stop this run after N minutes (then --resume)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p


def resolved_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """`hf-ddtree train-drafter` with every option spelled out (None-valued options omitted)."""
    cmd = ["hf-ddtree", "train-drafter"]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, None)
        long = next((o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-")),
                    action.option_strings[0])
        if isinstance(action, argparse.BooleanOptionalAction):
            cmd.append(long if value else "--no-" + long[2:])
        elif isinstance(action, argparse._StoreTrueAction):
            if value:
                cmd.append(long)
        elif value is not None:
            cmd += [long, str(value)]
    return cmd


def train_drafter_main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from hf_ddtree.drafter import default_target_layer_ids

    from .features import FeatureStore, extract_features, model_identity, read_records
    from .train import (TrainConfig, build_drafter, fast_bf16, feature_rms, split_train_val, standardize_fc,
                        train_drafter)

    from hf_ddtree.device import pick_device

    try:
        device = pick_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    args.device = str(device)
    if args.target_dtype == "auto":
        args.target_dtype = "bf16" if fast_bf16(device) else "fp32"
    if args.bf16 is None:
        args.bf16 = fast_bf16(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    features_dir = Path(args.features_dir) if args.features_dir else out / "features"

    print(f"loading target {args.target!r} ({args.target_dtype}) ...", flush=True)
    target, tokenizer = _load_target(args.target, _DTYPES[args.target_dtype])
    target.eval().to(device)
    tcfg = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    n_target = int(tcfg.num_hidden_layers)
    if args.target_layer_ids:
        layer_ids = [int(x) for x in args.target_layer_ids.split(",") if x.strip()]
    else:
        layer_ids = default_target_layer_ids(n_target, max(3, args.layers))
    args.target_layer_ids = ",".join(str(i) for i in layer_ids)
    if args.mask_token_id is None:
        args.mask_token_id = _default_mask_token_id(args.target, tokenizer)
    if args.mask_token_id is None:
        parser.error("no default mask token for this target: pass --mask-token-id")
    args.features_dir = str(features_dir)

    resolved = resolved_command(parser, args)
    invoked = ["hf-ddtree", "train-drafter", *argv]
    cmd_path = out / "command.txt"
    mode = "a" if args.resume and cmd_path.exists() else "w"
    with cmd_path.open(mode) as f:
        if mode == "a":
            f.write("\n# resumed with:\n")
        f.write("# as invoked\n" + shlex.join(invoked) + "\n# every option spelled out\n" + shlex.join(resolved) + "\n")

    if args.responses:
        records = read_records(args.responses)
        if args.max_records is not None:
            records = records[: args.max_records]
        print(f"target features for {len(records)} records -> {features_dir}", flush=True)
        extract_features(target, records, features_dir, layer_ids, shard_tokens=args.shard_tokens,
                         max_length=args.max_length, topk=args.distill_topk, progress=args.progress)
    store = FeatureStore(features_dir, layer_ids=layer_ids, identity=model_identity(target))
    if args.distill_alpha > 0 and not store.topk_k:
        parser.error(f"--distill-alpha {args.distill_alpha} needs target top-k log-probs, but the feature cache "
                     f"{features_dir} has none: pass --distill-topk K with a new --features-dir")
    train_idx, val_idx = split_train_val(store.ids, args.val_fraction)
    print(f"{len(store)} cached records ({store.num_tokens()} tokens): {len(train_idx)} train, {len(val_idx)} held out",
          flush=True)

    drafter = build_drafter(target, num_layers=args.layers, block_size=args.block_size,
                            mask_token_id=args.mask_token_id, target_layer_ids=layer_ids,
                            intermediate_size=args.intermediate_size, init_from_target=args.init_from_target,
                            prefix_mode=args.prefix_mode, seed=args.seed)
    if args.init_from_drafter:
        from safetensors.torch import load_file

        state = load_file(str(Path(args.init_from_drafter) / "model.safetensors"))
        try:
            drafter.load_state_dict(state, strict=True)
        except RuntimeError as err:
            parser.error(f"--init-from-drafter {args.init_from_drafter}: weights do not fit this drafter "
                         f"(same --layers/--block-size/--target-layer-ids needed): {err}")
    elif args.standardize_features:
        standardize_fc(drafter, feature_rms(store, train_idx))
    drafter.to(device)
    b1, b2 = (float(x) for x in args.betas.split(","))
    config = TrainConfig(
        block_size=args.block_size, anchors_per_seq=args.anchors_per_seq, batch_tokens=args.batch_tokens,
        steps=args.steps, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, betas=(b1, b2),
        warmup_ratio=args.warmup_ratio, warmup_steps=args.warmup_steps, gamma=args.gamma, grad_clip=args.grad_clip,
        bf16=args.bf16, threads=args.threads, seed=args.seed, prefix_mode=args.prefix_mode,
        logits_chunk=args.logits_chunk, head_vocab=args.head_vocab, head_negatives=args.head_negatives,
        distill_alpha=args.distill_alpha, eval_every=args.eval_every, val_anchors_per_seq=args.val_anchors,
        save_every=args.save_every, log_every=args.log_every, progress=args.progress,
    )
    result = train_drafter(
        target, drafter, store, out, config, train_idx=train_idx, val_idx=val_idx, resume=args.resume,
        stop_after=args.stop_after, time_limit_s=None if args.max_minutes is None else 60.0 * args.max_minutes,
        extra_meta={"target": args.target, "command": shlex.join(resolved)},
    )
    summary = {"step": result.step, "tok_per_s": round(result.tokens_per_s, 1),
               "final": str(result.final_dir) if result.final_dir else None,
               "val_tau": None if not result.val else round(result.val["tau"], 3)}
    print(json.dumps(summary), flush=True)
    if result.final_dir is None:
        print(f"stopped at step {result.step}: continue with the same command plus --resume", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(train_drafter_main())
