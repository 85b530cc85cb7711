"""`hf-ddtree` command line: demo, make-responses, train-drafter, bench, draft-vocab."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .device import DTYPE_CHOICES, pick_device, resolve_dtype

# the demo's prompts: one of each kind, written for it (not in the bench or training sets)
DEMO_PROMPTS = (
    ("code", "Write a Python function `is_palindrome(s: str) -> bool` that ignores case and non-alphanumeric "
             "characters, with a docstring and two doctest examples."),
    ("math", "A train leaves at 9:40 and arrives at 13:05 after two stops of 12 minutes each. How many minutes "
             "was it moving? Explain step by step."),
    ("chat", "I am planning a weekend trip to a city I have never visited. How should I plan the two days so that "
             "I see the most without rushing?"),
)


def demo_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hf-ddtree demo", description=(
        "Answer a few prompts of different kinds (code, math, chat) with the embedded SmolLM2-135M target, first "
        "autoregressively, then with DDTree (plus lookup continuations, by default) and the embedded drafter, in "
        "the same dtype; report per prompt and overall whether the texts are identical, acceptance and speedup."))
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt of your own (repeatable); default: one code, one math and one chat prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--tree-budget", default="auto",
                   help="'auto' (default: CaDDTree, which also decides each round whether the drafter runs at all; "
                        "calibrated once per machine, ~15 s, then cached) or a fixed node budget (16 is the best fixed one "
                        "on this CPU, docs/benchmarks.md)")
    p.add_argument("--method", default="ddtree-lookup", choices=["ddtree", "ddtree-lookup"],
                   help="ddtree-lookup (default: faster than ddtree on every bench task, docs/benchmarks.md): the "
                        "drafter's tree plus n-gram lookup continuations of the prompt and the answer, under the same "
                        "budget; ddtree: the drafter's tree alone")
    p.add_argument("--dtype", default="auto", choices=list(DTYPE_CHOICES),
                   help="auto (default): bf16 where this CPU (or GPU) computes bf16 natively, else fp32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--show", action="store_true", help="print every answer")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import hf_ddtree
    from hf_ddtree.bench.runner import compare_outputs, mismatch_margin
    from hf_ddtree.data import to_chat_ids
    from hf_ddtree.models import load_default_pair

    dtype, why = resolve_dtype(args.dtype, "cpu")
    budget = args.tree_budget if args.tree_budget == "auto" else int(args.tree_budget)
    prompts = [("yours", text) for text in args.prompt] if args.prompt else list(DEMO_PROMPTS)
    print(f"loading the embedded SmolLM2-135M target and its DFlash drafter (no network); dtype {why} ...", flush=True)
    target, tokenizer, drafter = load_default_pair(dtype=dtype)
    hf_ddtree.enable(target)
    common = dict(do_sample=False, max_new_tokens=args.max_new_tokens)
    spec = dict(assistant_model=drafter, tree_budget=budget, method=args.method)

    first = to_chat_ids(tokenizer, prompts[0][1], raw_fallback=True)
    target.generate(first, **{**common, "max_new_tokens": 8})  # warm-up both paths (allocation, kernel selection)
    target.generate(first, **spec, **{**common, "max_new_tokens": 8})

    results, all_same = [], True
    print(f"\n| prompt | AR tok/s | {args.method}:{budget} tok/s | speedup | tokens per target forward | identical to AR |")
    print("|---|---:|---:|---:|---:|---|")
    for kind, text in prompts:
        ids = to_chat_ids(tokenizer, text, raw_fallback=True)
        t0 = time.perf_counter()
        ar = target.generate(ids, **common)
        t_ar = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = target.generate(ids, **spec, return_dict_in_generate=True, **common)
        t_dd = time.perf_counter() - t0
        ref, got = ar[0, ids.shape[1]:].tolist(), out.sequences[0, ids.shape[1]:].tolist()
        identical, at = compare_outputs(ref, got)
        if identical:
            same = "yes"
        else:
            all_same = False
            margin, _ = mismatch_margin(target, ids[0].tolist(), ref, got, at)
            same = f"no: from token {at}" + (f", target's top-2 margin there {margin:.3g}" if margin is not None else "")
        tau = out.stats.mean_acceptance_length
        results.append((len(ref), t_ar, len(got), t_dd, tau))
        print(f"| {kind} | {len(ref) / t_ar:.1f} | {len(got) / t_dd:.1f} | {t_ar / t_dd:.2f}x | {tau:.2f} | {same} |",
              flush=True)
        if args.show:
            print(f"\n--- {kind} ({args.method}) ---\n" + tokenizer.decode(got, skip_special_tokens=True) + "\n---")
    n_ar, t_ar, n_dd, t_dd = (sum(r[i] for r in results) for i in range(4))
    tau = sum(r[4] for r in results) / len(results)
    print(f"| **all** | {n_ar / t_ar:.1f} | {n_dd / t_dd:.1f} | **{t_ar / t_dd:.2f}x** | {tau:.2f} | "
          f"{'yes' if all_same else 'see above'} |")
    print(f"\nsame run, {why}, {torch.get_num_threads()} CPU threads, {args.max_new_tokens} new tokens per prompt; "
          "speedup = AR time / our time over all prompts")
    if not all_same and dtype == torch.bfloat16:
        print("in bf16 a tree forward rounds differently from a one-token forward, so where the target's top two "
              "logits nearly tie the texts can part (as with transformers' own assisted decoding); fp32 is exact: "
              "--dtype fp32")
    return 0 if all_same or dtype == torch.bfloat16 else 1


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
    target, tokenizer = load_target(args.target, dtype=resolve_dtype(args.dtype)[0])
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
