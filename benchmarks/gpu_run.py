"""Helpers for scripts/gpu_run.sh (the drafter recipe at GPU scale, docs/models.md "GPU run (prepared)").

    python benchmarks/gpu_run.py eval --features-dir F --drafter new=DIR --drafter shipped=DIR --out eval.json
    python benchmarks/gpu_run.py keep-vocab --from SHIPPED_DIR --to NEW_DIR
    python benchmarks/gpu_run.py summary --eval eval.json --bench BENCH_DIR

`eval`: held-out chain acceptance (tau) of several drafters on the SAME held-out records, with the
trainer's own `evaluate` (hf_ddtree.training.train). The held-out records are chosen like the trainer
chooses them (`split_train_val`: a hash of the record id below `--val-fraction`), so with the trainer's
default 0.05 they are records neither the new drafter nor the shipped one (trained with the same
split rule on ids of the same form) has trained on.
`keep-vocab`: copy the drafting-vocabulary shortlist (draft_vocab.safetensors + `draft_vocab_size` in
config.json) of the shipped drafter into a freshly trained drafter folder (train-drafter writes a
fresh config without it; docs/models.md, "Drafting vocabulary shortlist").
`summary`: one line: old vs new held-out tau, and the bench's overall acceptance per method.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch


def _device(name: str) -> torch.device:
    from hf_ddtree.device import pick_device as _pick_device

    return _pick_device(name)


def eval_main(args) -> int:
    from hf_ddtree.drafter import DFlashDraftModel
    from hf_ddtree.models import load_target
    from hf_ddtree.training.features import FeatureStore, model_identity
    from hf_ddtree.training.train import evaluate, fast_bf16, head_weight, split_train_val

    drafters = []
    for spec in args.drafter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not Path(path).is_dir():
            raise ValueError(f"--drafter {spec!r}: expected NAME=DIR with an existing drafter folder.")
        drafters.append((name, Path(path)))
    device = _device(args.device)
    bf16 = fast_bf16(device) if args.bf16 is None else args.bf16
    target, _ = load_target(args.target, dtype=torch.bfloat16 if bf16 else torch.float32)
    target.eval().to(device)
    layer_ids = None
    results = {}
    for name, path in drafters:
        d = DFlashDraftModel.from_pretrained(str(path), dtype=torch.float32).to(device).eval()
        ids = [int(i) for i in d.target_layer_ids]
        if layer_ids is None:
            layer_ids = ids
            store = FeatureStore(args.features_dir, layer_ids=layer_ids, identity=model_identity(target))
            _, val_idx = split_train_val(store.ids, args.val_fraction)
            lm_weight = head_weight(target.get_output_embeddings(), bf16).to(device)
        elif ids != layer_ids:
            raise ValueError(f"--drafter {name}: reads target layers {ids}, the first drafter {layer_ids}; "
                             "compare drafters that read the same layers (one feature cache).")
        r = evaluate(d, target, store, val_idx, block_size=int(d.block_size), mask_token_id=int(d.mask_token_id),
                     anchors_per_seq=args.val_anchors, bf16=bf16, lm_weight=lm_weight)
        results[name] = {"dir": str(path), **r}
        print(f"{name}: tau {r['tau']:.3f} loss {r['loss']:.3f} over {r['blocks']} blocks", flush=True)
        del d
    out = {"val_records": len(val_idx), "val_fraction": args.val_fraction, "val_anchors": args.val_anchors,
           "bf16": bool(bf16), "device": str(device), "features_dir": str(args.features_dir), "drafters": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


def keep_vocab_main(args) -> int:
    from hf_ddtree.draft_vocab import DRAFT_VOCAB_FILE

    src, dst = Path(args.src), Path(args.dst)
    size = json.loads((src / "config.json").read_text()).get("draft_vocab_size")
    if not size or not (src / DRAFT_VOCAB_FILE).is_file():
        raise ValueError(f"--from {src}: no draft_vocab_size in config.json or no {DRAFT_VOCAB_FILE} there.")
    cfg_path = dst / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["draft_vocab_size"] = int(size)
    shutil.copyfile(src / DRAFT_VOCAB_FILE, dst / DRAFT_VOCAB_FILE)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    print(f"{dst}: draft_vocab_size {size} and {DRAFT_VOCAB_FILE} from {src}", flush=True)
    return 0


def pack_main(args) -> int:
    """The drafter in bf16, sharded under 16 MiB a file (what a device call brings back: <= 8 files, 16 MiB each)."""
    from hf_ddtree.drafter import DFlashDraftModel

    d = DFlashDraftModel.from_pretrained(args.drafter, dtype=torch.float32).to(torch.bfloat16)
    d.save_pretrained(args.to, max_shard_size=args.max_shard_size)
    print(f"{args.to}: " + ", ".join(sorted(p.name for p in Path(args.to).iterdir())), flush=True)
    return 0


def summary_line(eval_json: dict, bench_json: dict) -> str:
    """`held-out tau shipped X -> new Y | bench acceptance (all, greedy): ar 1.00, ddtree:16 ..., identical Z`."""
    d = eval_json["drafters"]
    taus = " -> ".join(f"{k} {v['tau']:.3f}" for k, v in d.items())
    rows = [s for s in bench_json.get("summary", []) if s.get("dataset") == "all" and s.get("temperature") == 0]
    acc = ", ".join(f"{s['method']} {s['mean_acceptance_length']:.2f}" for s in rows
                    if s.get("mean_acceptance_length") is not None)
    ident = [s["identity_vs_ar"] for s in rows if s.get("identity_vs_ar") is not None]
    same = "all identical to AR" if ident and min(ident) == 1.0 else f"identity vs AR min {min(ident or [float('nan')])}"
    return (f"held-out chain tau ({eval_json['val_records']} records): {taus} | bench acceptance (all datasets, "
            f"greedy): {acc} | {same}")


def summary_main(args) -> int:
    eval_json = json.loads(Path(args.eval).read_text())
    bench_json = json.loads((Path(args.bench) / "results.json").read_text())
    line = summary_line(eval_json, bench_json)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line, flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gpu_run.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval", help="held-out chain tau of several drafters on the same held-out records")
    e.add_argument("--target", default="smollm2-135m")
    e.add_argument("--features-dir", required=True)
    e.add_argument("--drafter", action="append", required=True, metavar="NAME=DIR")
    e.add_argument("--val-fraction", type=float, default=0.05, help="as train-drafter's --val-fraction")
    e.add_argument("--val-anchors", type=int, default=32, help="blocks per held-out record")
    e.add_argument("--device", default="auto")
    e.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: where bf16 is fast, as the trainer decides)")
    e.add_argument("--out", required=True)
    k = sub.add_parser("keep-vocab", help="copy the shipped drafting-vocabulary shortlist into a drafter folder")
    k.add_argument("--from", dest="src", required=True)
    k.add_argument("--to", dest="dst", required=True)
    s = sub.add_parser("summary", help="one line: old vs new held-out tau, bench acceptance")
    s.add_argument("--eval", required=True)
    s.add_argument("--bench", required=True, help="bench output dir (results.json)")
    s.add_argument("--out", default=None)
    k = sub.add_parser("pack", help="the drafter in bf16 shards small enough to come back from a device call")
    k.add_argument("--drafter", required=True)
    k.add_argument("--to", required=True)
    k.add_argument("--max-shard-size", default="12MB")
    args = p.parse_args(argv)
    return {"eval": eval_main, "keep-vocab": keep_vocab_main, "summary": summary_main, "pack": pack_main}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
