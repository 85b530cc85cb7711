"""What carrying the cache between chat turns buys, on the embedded pair: a 3-turn conversation (the
chat example's turns, greedy), each turn run three ways in one process:

  carried   the cache hf_ddtree returned last turn (target K/V + the drafter's context): only the new
            tokens are prefilled, the drafter goes on as if it had read everything
  stock     a cache from stock generate() (no drafter context): only the new tokens are prefilled, the
            drafter starts from them (it never sees the earlier turns)
  reread    no cache: the whole conversation is prefilled every turn (what hf_ddtree did before)

Output is identical in all three (checked); the table gives, per turn, prefilled tokens, tokens per
target forward (tau) and wall time relative to `reread`.

    python benchmarks/multiturn.py --methods ddtree-lookup:16,ddtree:16 --max-new-tokens 96
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import GenerationMixin

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import hf_ddtree  # noqa: E402
from hf_ddtree.compat import CACHE_FIELD  # noqa: E402
from hf_ddtree.device import resolve_dtype  # noqa: E402
from hf_ddtree.models import load_default_pair  # noqa: E402

from chat import TURNS, next_turn  # noqa: E402


def method_kwargs(spec: str) -> dict:
    name, _, budget = spec.partition(":")
    return dict(method=name, **({"tree_budget": int(budget)} if budget else {}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="ddtree-lookup:16,ddtree:16")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, dtype_name = resolve_dtype(args.dtype)
    target, tok, drafter = load_default_pair(dtype=dtype)
    hf_ddtree.enable(target)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False, return_dict_in_generate=True)

    # the conversation itself: stock greedy answers, the cache carried
    convo, msgs, ids, cache = [], [], None, None
    for user in TURNS:
        msgs.append({"role": "user", "content": user})
        ids = (tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
               if ids is None else next_turn(tok, ids, msgs))
        out = GenerationMixin.generate(target, ids, **gen, **({CACHE_FIELD: cache} if cache is not None else {}))
        convo.append(ids)
        cache = getattr(out, CACHE_FIELD)
        msgs.append({"role": "assistant", "content": tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)})
        ids = out.sequences

    print(f"| method | turn | way | prefilled | tau | time vs reread |\n|---|---:|---|---:|---:|---:|")
    for spec in args.methods.split(","):
        kw = dict(assistant_model=drafter, **method_kwargs(spec))
        caches = {"carried": None, "stock": None}
        for turn, ids in enumerate(convo):
            stock_cache = None
            if turn:  # stock's cache of the conversation before this turn: every token but the last answer token
                prev = convo[turn - 1]
                stock_cache = getattr(GenerationMixin.generate(target, prev, **gen), CACHE_FIELD)
            rows = {}
            for way in ("reread", "stock", "carried"):
                c = None if way == "reread" else (caches["carried"] if way == "carried" else stock_cache)
                if c is not None and int(c.get_seq_length()) >= ids.shape[1]:
                    c = None
                held = 0 if c is None else int(c.get_seq_length())
                t0 = time.perf_counter()
                out = target.generate(ids, **gen, **kw, **({CACHE_FIELD: c} if c is not None else {}))
                dt = time.perf_counter() - t0
                if way == "carried":
                    caches["carried"] = getattr(out, CACHE_FIELD)
                tau = sum(out.acceptance_lengths) / max(1, len(out.acceptance_lengths))
                rows[way] = (ids.shape[1] - held, tau, dt, out.sequences)
            assert all(torch.equal(r[3], rows["reread"][3]) for r in rows.values()), "outputs differ"
            for way, (pre, tau, dt, _) in rows.items():
                print(f"| {spec} | {turn + 1} | {way} | {pre} | {tau:.2f} | {dt / rows['reread'][2]:.2f}x |")
    print(f"\n{dtype_name}, {torch.get_num_threads()} threads, {args.max_new_tokens} new tokens per turn; "
          "turn 1 has nothing to carry (all three ways are the same call)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
