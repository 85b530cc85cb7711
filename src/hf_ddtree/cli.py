"""`hf-ddtree` command line: demo, make-responses, train-drafter, bench, draft-vocab."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .device import pick_device

DEMO_PROMPT = (
    "Write a Python function `is_palindrome(s: str) -> bool` that ignores case and non-alphanumeric "
    "characters, with a docstring and two doctest examples."
)


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}[name]


def demo_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hf-ddtree demo", description=(
        "Generate one answer with the embedded SmolLM2-135M target, first autoregressively, then with "
        "DDTree (plus lookup continuations, by default) and the embedded drafter; check both texts are identical "
        "and report acceptance and speedup."))
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--tree-budget", default="16",
                   help="node budget (int) or 'auto' for CaDDTree (16: the best fixed budget on this CPU, docs/benchmarks.md)")
    p.add_argument("--method", default="ddtree-lookup", choices=["ddtree", "ddtree-lookup"],
                   help="ddtree-lookup (default: faster than ddtree on every bench task, docs/benchmarks.md): the "
                        "drafter's tree plus n-gram lookup continuations of the prompt and the answer, under the same "
                        "budget; ddtree: the drafter's tree alone")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import hf_ddtree
    from hf_ddtree.models import load_default_pair
    from hf_ddtree.data import to_chat_ids

    budget = args.tree_budget if args.tree_budget == "auto" else int(args.tree_budget)
    print("loading the embedded SmolLM2-135M target and its DFlash drafter (no network) ...", flush=True)
    target, tokenizer, drafter = load_default_pair(dtype=_dtype(args.dtype))
    hf_ddtree.enable(target)
    ids = to_chat_ids(tokenizer, args.prompt, raw_fallback=True)
    common = dict(do_sample=False, max_new_tokens=args.max_new_tokens)

    # warm-up both paths (first calls pay allocation and kernel selection)
    target.generate(ids, **{**common, "max_new_tokens": 8})
    spec = dict(assistant_model=drafter, tree_budget=budget, method=args.method)
    target.generate(ids, **spec, **{**common, "max_new_tokens": 8})

    t0 = time.perf_counter()
    ar = target.generate(ids, **common)
    t_ar = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = target.generate(ids, **spec, return_dict_in_generate=True, **common)
    t_dd = time.perf_counter() - t0

    n_ar = ar.shape[1] - ids.shape[1]
    n_dd = out.sequences.shape[1] - ids.shape[1]
    same = torch.equal(ar, out.sequences)
    text = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"\n--- answer ({args.method}) ---\n" + text + "\n-----------------------")
    print(f"identical to autoregressive output: {same}")
    print(f"autoregressive : {n_ar} tokens in {t_ar:.2f} s ({n_ar / t_ar:.1f} tok/s)")
    print(f"{args.method} (budget {budget}): {n_dd} tokens in {t_dd:.2f} s ({n_dd / t_dd:.1f} tok/s), "
          f"mean acceptance length {out.stats.mean_acceptance_length:.2f} tokens per target forward "
          f"over {len(out.acceptance_lengths)} rounds")
    print(f"speedup vs autoregressive (same run, {args.dtype}, {torch.get_num_threads()} CPU threads): "
          f"{t_ar / t_dd:.2f}x")
    return 0 if same else 1


def make_responses_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hf-ddtree make-responses", description=(
        "Stage 1 of drafter training: answer training prompts with the target itself (greedy and sampled)."))
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--source", default="sharegpt", help="training prompt source (see hf_ddtree.data)")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="greedy,sample")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--out", required=True)
    p.add_argument("--skip-answered", nargs="*", default=[], metavar="JSONL",
                   help="responses files of earlier runs: prompts answered there are not answered again")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from hf_ddtree.data import load_training_prompts
    from hf_ddtree.models import load_target
    from hf_ddtree.training.responses import answered_ids, generate_responses

    missing = [f for f in args.skip_answered if not Path(f).is_file()]
    if missing:
        p.error(f"--skip-answered: no such file: {', '.join(missing)}")

    device = pick_device(args.device)
    target, tokenizer = load_target(args.target, dtype=_dtype(args.dtype))
    target.to(device)
    prompts = load_training_prompts(limit=args.limit, seed=args.seed, source=args.source)
    pairs = [(p.id, p.text) for p in prompts]
    generate_responses(target, tokenizer, pairs, args.out, modes=args.modes.split(","),
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                       source=args.source, skip_ids=answered_ids(args.skip_answered))
    return 0


COMMANDS = {
    "demo": demo_main,
    "make-responses": make_responses_main,
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train-drafter":
        from hf_ddtree.training.cli import train_drafter_main

        return train_drafter_main(argv[1:]) or 0
    if argv and argv[0] == "draft-vocab":
        from hf_ddtree.draft_vocab import draft_vocab_main

        return draft_vocab_main(argv[1:]) or 0
    if argv and argv[0] == "bench":
        from hf_ddtree.bench.cli import bench_main

        return bench_main(argv[1:]) or 0
    if not argv or argv[0] not in COMMANDS:
        names = ", ".join(list(COMMANDS) + ["train-drafter", "bench", "draft-vocab"])
        print(f"usage: hf-ddtree {{{names}}} [options]   (hf-ddtree <command> --help for details)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
