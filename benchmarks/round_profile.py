"""Where a DDTree round's time goes, on the embedded pair (SmolLM2-135M target + shipped drafter).

    PYTHONPATH=src python benchmarks/round_profile.py --threads 2 --reps 21 --parts draft,verify,linear
    PYTHONPATH=src python benchmarks/round_profile.py --threads 1 --clock cpu ...   # on a busy shared machine

Every comparison runs INTERLEAVED in one process (A, B, C, A, B, C, ...; the order rotates each rep)
and reports medians plus the p25-p75 spread, so a busy shared machine slows all variants alike.
Ratios are what to read; absolute ms move with the machine's load.

parts:
  draft   one drafter block (DrafterState.draft) with the full head vs shortlists of S ids, and the
          head alone (F.linear at M = block_size - 1 rows)
  verify  a ~300-token prompt in the cache; n = 1, 8, 16 tree nodes: AR step, plain causal forwards
          (dynamic / static cache), verify.run_tree, and run_tree's ingredients switched off one at a
          time (float tree mask -> causal, hidden states -> none, all-row logits -> logits_to_keep=1),
          plus the mask build and the head at M = n+1 vs M = 1 on their own
  linear  one target layer's Linear shapes at M = 1..32: F.linear vs MKL prepacked
          (torch.ops.mkl._mkl_reorder_linear_weight + _mkl_linear) vs oneDNN (torch.utils.mkldnn)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


CLOCK = {"fn": time.perf_counter}


def interleaved(fns: dict, reps: int, warmup: int = 2) -> dict[str, dict]:
    """Time each callable `reps` times, interleaved and order-rotated. Returns name -> {med, p25, p75} in ms."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    clock = CLOCK["fn"]
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t0 = clock()
            fns[n]()
            times[n].append((clock() - t0) * 1e3)
    out = {}
    for n, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 4 else [min(ts), statistics.median(ts), max(ts)]
        out[n] = {"med": statistics.median(ts), "p25": q[0], "p75": q[2]}
    return out


def show(title: str, res: dict, unit: str | None = None):
    print(f"\n## {title}")
    base = res[unit]["med"] if unit else None
    for n, r in res.items():
        spread = (r["p75"] - r["p25"]) / r["med"] * 100
        rel = f"  {r['med'] / base:5.2f} x {unit}" if base else ""
        print(f"  {n:<44s} {r['med']:8.2f} ms  (p25-p75 spread {spread:4.0f}%){rel}")


def prompt_ids(tokenizer, length: int = 300) -> torch.Tensor:
    """(1, ~length) chat ids built from gsm8k test questions (an evaluation set: timing only)."""
    from hf_ddtree.data import load_prompts, to_chat_ids

    text = ""
    for p in load_prompts("gsm8k", limit=20):
        text += p.text + "\n"
        ids = to_chat_ids(tokenizer, text)
        if ids.shape[1] >= length:
            return ids[:, :length]
    return ids


@torch.no_grad()
def part_draft(target, tokenizer, drafter, reps: int, sizes: list[int]):
    from hf_ddtree.compat import cache_kwargs, gather_features, hidden_states_request
    from hf_ddtree.draft_vocab import set_draft_vocab
    from hf_ddtree.drafter import drafter_spec
    from hf_ddtree.propose import DrafterState

    spec = drafter_spec(drafter)
    ids = prompt_ids(tokenizer)
    P = ids.shape[1]
    out = target(input_ids=ids, output_hidden_states=hidden_states_request(spec.hidden_state_indices), logits_to_keep=1)
    ctx = gather_features(out, spec.hidden_state_indices)[0]  # (P, F)
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()
    block = torch.full((1, spec.block_size), spec.mask_token_id)
    block[0, 0] = int(ids[0, -1])
    V = head.weight.shape[0]
    states = {}
    for s in [V] + sizes:
        # timing only: which ids are in the shortlist does not change the cost
        set_draft_vocab(drafter, None if s == V else torch.randperm(V, generator=torch.Generator().manual_seed(0))[:s])
        st = DrafterState(drafter, spec, embed, head)
        st.draft(block, ctx[: P - 3], P - 3)  # the drafter cache holds P - 3 context positions
        states[f"draft block, {'full V=%d' % V if s == V else 'shortlist S=%d' % s}"] = st
    set_draft_vocab(drafter, None)

    def step(st):
        def f():
            st.cache.crop(-3)  # back to P - 3 cached positions: 3 new context rows, as after a 2-token accept
            st.seen = P - 3
            st.draft(block, ctx[P - 3:], P)
        return f

    hidden = torch.randn(spec.block_size - 1, head.weight.shape[1])
    fns = {n: step(st) for n, st in states.items()}
    for s in [V] + sizes:
        w = head.weight[:s].contiguous()
        fns[f"head alone, M={spec.block_size - 1}, rows={s}"] = (lambda w=w: F.linear(hidden, w))
    res = interleaved(fns, reps)
    show("draft: one drafter block (block size %d, 3 new context rows over %d cached)" % (spec.block_size, P - 3),
         res, next(iter(states)))
    return res


def _reset(cache, past: int):
    from transformers.cache_utils import StaticCache

    if isinstance(cache, StaticCache):
        for layer in cache.layers:
            layer.cumulative_length.fill_(past)
    else:
        extra = cache.get_seq_length() - past
        if extra > 0:
            cache.crop(-extra)


@torch.no_grad()
def part_verify(target, tokenizer, drafter, reps: int, ns: list[int]):
    from hf_ddtree.cache import make_cache, mask_width, tree_attention_mask
    from hf_ddtree.compat import cache_kwargs, gather_features, hidden_states_request
    from hf_ddtree.drafter import drafter_spec
    from hf_ddtree.propose import DrafterState
    from hf_ddtree.tree import build_tree, topk_per_position
    from hf_ddtree.verify import run_tree

    spec = drafter_spec(drafter)
    hidx = spec.hidden_state_indices
    ids = prompt_ids(tokenizer)
    P = ids.shape[1]
    max_len = P + 256 + 1 + 64  # what generate() allocates for max_new_tokens=256, budget 64
    caches = {"dynamic": make_cache(target, "dynamic", max_len), "static": make_cache(target, "static", max_len)}
    feats = None
    for c in caches.values():
        out = target(input_ids=ids, position_ids=torch.arange(P)[None], **cache_kwargs(target, c), use_cache=True,
                     output_hidden_states=hidden_states_request(hidx), logits_to_keep=1)
        feats = gather_features(out, hidx)[0]
    st = DrafterState(drafter, spec, target.get_input_embeddings(), target.get_output_embeddings())
    block = torch.full((1, spec.block_size), spec.mask_token_id)
    block[0, 0] = int(out.logits[0, -1].argmax())
    lp = st.draft(block, feats, P)[0]  # (bs-1, V)
    head = target.get_output_embeddings()
    H = head.weight.shape[1]

    def fwd(cache, n_tok, mask=None, hidden=None, keep=0, tokens=None, pos=None):
        tokens = tokens if tokens is not None else block[:, : n_tok].repeat(1, 1 + n_tok // block.shape[1])[:, :n_tok]
        pos = pos if pos is not None else torch.arange(P, P + n_tok)[None]

        def f():
            _reset(cache, P)
            target(input_ids=tokens, position_ids=pos, attention_mask=mask, **cache_kwargs(target, cache),
                   use_cache=True, output_hidden_states=hidden_states_request(hidden), logits_to_keep=keep)
        return f

    results = {}
    for n in ns:
        top_lp, top_ids = topk_per_position(lp, n)
        tree = build_tree(int(block[0, 0]), top_lp, top_ids, n)
        m = tree.tokens.numel()  # n + 1
        tok, tpos = tree.tokens[None], (tree.depths + P)[None]
        vis = tree.visibility()
        causal = torch.tril(torch.ones(m, m, dtype=torch.bool))
        s_cache, d_cache = caches["static"], caches["dynamic"]
        kv_s = mask_width(s_cache, P, n)
        tmask_s = tree_attention_mask(vis, P, kv_s, target.dtype, target.device)
        cmask_s = tree_attention_mask(causal, P, kv_s, target.dtype, target.device)
        tmask_d = tree_attention_mask(vis, P, P + m, target.dtype, target.device)

        def tree_fn(cache):
            def f():
                _reset(cache, P)
                run_tree(target, tree, cache, P, hidx)
            return f

        x1, xm = torch.randn(1, H), torch.randn(m, H)
        fns = {
            "AR step (dynamic, 1 token, logits_to_keep=1)": fwd(d_cache, 1, keep=1),
            f"causal {m} tok, dynamic, no mask, all logits": fwd(d_cache, m),
            f"causal {m} tok, static, no mask, all logits": fwd(s_cache, m),
            f"run_tree n={n}, static": tree_fn(s_cache),
            f"run_tree n={n}, dynamic": tree_fn(d_cache),
            "  static tree mask, no hidden, all logits": fwd(s_cache, m, tmask_s, None, 0, tok, tpos),
            "  static tree mask, hidden, logits_to_keep=1": fwd(s_cache, m, tmask_s, hidx, 1, tok, tpos),
            "  static tree mask, no hidden, logits_to_keep=1": fwd(s_cache, m, tmask_s, None, 1, tok, tpos),
            "  static float CAUSAL mask, hidden, all logits": fwd(s_cache, m, cmask_s, hidx, 0),
            "  static no mask (library causal), hidden, all": fwd(s_cache, m, None, hidx, 0),
            "  dynamic tree mask, no hidden, logits_to_keep=1": fwd(d_cache, m, tmask_d, None, 1, tok, tpos),
            "  dynamic no mask, no hidden, logits_to_keep=1": fwd(d_cache, m, None, None, 1),
            "  mask build (visibility + tree_attention_mask)": lambda: tree_attention_mask(
                tree.visibility(), P, kv_s, target.dtype, target.device),
            f"  head alone M={m}": lambda: head(xm),
            "  head alone M=1": lambda: head(x1),
        }
        res = interleaved(fns, reps)
        show(f"verify: n = {n} nodes (+ root) over a {P}-token cache (static buffer {kv_s})", res,
             "AR step (dynamic, 1 token, logits_to_keep=1)")
        results[n] = res
        _reset(s_cache, P)
        _reset(d_cache, P)
    return results


@torch.no_grad()
def part_linear(target, reps: int, ms: list[int]):
    import torch.utils.mkldnn as mkldnn_utils

    layer = target.model.layers[0]
    shapes = {
        "q_proj": layer.self_attn.q_proj, "k_proj": layer.self_attn.k_proj, "o_proj": layer.self_attn.o_proj,
        "gate_proj": layer.mlp.gate_proj, "down_proj": layer.mlp.down_proj,
    }
    results = {}
    for name, lin in shapes.items():
        W, b = lin.weight.detach(), lin.bias
        mk = mkldnn_utils.to_mkldnn(lin)  # a copy with the weight in oneDNN's blocked layout
        row = {}
        for m in ms:
            x = torch.randn(m, W.shape[1])
            packed = torch.ops.mkl._mkl_reorder_linear_weight(W, m)
            fns = {
                "F.linear": lambda x=x: F.linear(x, W, b),
                "mkl prepacked": lambda x=x, p=packed: torch.ops.mkl._mkl_linear(x, p, W, b, m),
                "mkldnn (to_mkldnn)": lambda x=x: mk(x),
            }
            r = interleaved(fns, reps * 5)
            row[m] = {k: v["med"] * 1e3 for k, v in r.items()}  # us
        results[name] = row
        print(f"\n## linear {name} {tuple(W.shape[::-1])}: median us per call")
        print("   M " + "".join(f"{k:>20s}" for k in row[ms[0]]))
        for m in ms:
            print(f"{m:4d} " + "".join(f"{row[m][k]:20.1f}" for k in row[m]))
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--parts", default="draft,verify,linear")
    p.add_argument("--sizes", default="4096,8192,16384", help="shortlist sizes for part draft")
    p.add_argument("--ns", default="1,8,16", help="tree sizes for part verify")
    p.add_argument("--ms", default="1,2,4,8,16,32", help="rows M for part linear")
    p.add_argument("--json", default=None, help="write all medians here")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"], help=(
        "wall: perf_counter; cpu: this thread's CPU time (thread_time), which ignores time spent descheduled "
        "on a busy shared machine; only meaningful with --threads 1 (torch then computes on the calling thread)"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if args.threads != 1:
            p.error("--clock cpu needs --threads 1")
        CLOCK["fn"] = time.thread_time
    from hf_ddtree.models import load_default_pair

    target, tokenizer, drafter = load_default_pair()
    from hf_ddtree.draft_vocab import set_draft_vocab

    set_draft_vocab(drafter, None)  # part draft sets its own shortlists
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, reps {args.reps} (interleaved), "
          f"clock {args.clock}")
    parts = args.parts.split(",")
    res = {}
    if "draft" in parts:
        res["draft"] = part_draft(target, tokenizer, drafter, args.reps, [int(s) for s in args.sizes.split(",")])
    if "verify" in parts:
        res["verify"] = part_verify(target, tokenizer, drafter, args.reps, [int(n) for n in args.ns.split(",")])
    if "linear" in parts:
        res["linear"] = part_linear(target, args.reps, [int(m) for m in args.ms.split(",")])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
