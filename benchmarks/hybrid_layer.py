"""One Gated DeltaNet layer at real shapes: the tree verify's time and memory against the layer's own forward.

A Qwen3.5 linear-attention layer with random weights at the shapes given (default: Qwen3.5-27B's
Gated DeltaNet, hidden 5120, 16 key / 48 value heads of 128, conv kernel 4), on a cache holding a
prompt, timed in one run (median of --reps):
  * `decode`: the layer's own one-token forward (what stock decoding runs per token),
  * `own N`: the layer's own forward over N new tokens on the cache (transformers' chunked rule: what a
    chain verify without state rollback costs),
  * `tree N`: hf_ddtree's tree forward over a best-first tree of N nodes (`compat._gdn_tree_forward`),
    plus `commit`: the kept path's state and conv window written into the cache.
and the memory a verify keeps per node (the record) against keeping every node's state.

    python benchmarks/hybrid_layer.py --dtype bf16 --nodes 16 64 --threads 1
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

import torch
from transformers import DynamicCache, Qwen3_5TextConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

from hf_ddtree.cache import commit_linear_states
from hf_ddtree.compat import _gdn_tree_forward
from hf_ddtree.linear_attention import TreeStates
from hf_ddtree.tree import ancestor_matrix, ancestors_by_depth, build_tree


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--key-heads", type=int, default=16)
    ap.add_argument("--value-heads", type=int, default=48)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--kernel", type=int, default=4)
    ap.add_argument("--linear-layers", type=int, default=48, help="linear-attention layers of the model (memory totals)")
    ap.add_argument("--nodes", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = Qwen3_5TextConfig(hidden_size=args.hidden, linear_num_key_heads=args.key_heads,
                            linear_num_value_heads=args.value_heads, linear_key_head_dim=args.head_dim,
                            linear_value_head_dim=args.head_dim, linear_conv_kernel_dim=args.kernel,
                            num_hidden_layers=1, layer_types=["linear_attention"])
    torch.manual_seed(0)
    layer = Qwen3_5GatedDeltaNet(cfg, 0).to(dtype).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    h = lambda n: torch.randn(1, n, args.hidden, dtype=dtype)  # noqa: E731

    def fresh_cache():
        cache = DynamicCache(config=cfg)
        with torch.no_grad():
            layer(h(args.prompt), **cache_kw(cache))
        return cache

    def cache_kw(cache):  # the layer's own keyword: cache= (5.24) or cache_params= (5.17)
        return {"cache": cache} if "cache" in inspect.signature(type(layer).forward).parameters else {"cache_params": cache}

    def own(cache, n):
        return layer(h(n), **cache_kw(cache))

    rows = []
    with torch.no_grad():
        cache = fresh_cache()
        state = [cache.layers[0].conv_states[0].clone(), cache.layers[0].recurrent_states[0].clone()]

        def restore():
            cache.layers[0].conv_states[0].copy_(state[0])
            cache.layers[0].recurrent_states[0].copy_(state[1])

        decode = timed(lambda: (restore(), own(cache, 1)), args.reps)
        rows.append(("decode (1 token)", decode, 1.0))
        for n in args.nodes:
            rows.append((f"own forward, {n} tokens", timed(lambda: (restore(), own(cache, n)), args.reps), None))
            g = torch.Generator().manual_seed(n)
            logits = torch.randn(15, 1000, generator=g)
            logits[:, 0] += 8.0  # a drafter that is fairly sure of its first choice: deep trees
            logp = torch.log_softmax(logits, -1)
            lp, ids = torch.topk(logp, 8, dim=-1)
            tree = build_tree(0, lp, ids, n - 1)  # n rows: root + n - 1 nodes
            vis = ancestor_matrix(tree.parents, tree.max_depth)[None]
            depths = tree.depths[None]
            ctx = TreeStates(vis, ancestors_by_depth(vis, depths, tree.max_depth), depths, {})
            hn = h(tree.size)
            t_tree = timed(lambda: _gdn_tree_forward(layer, ctx, hn, cache=cache), args.reps)
            leaf = int(torch.argmax(tree.depths))
            path = tree.path_to(leaf)
            paths = torch.tensor([path + [0] * (tree.max_depth + 1 - len(path))])
            t_commit = timed(lambda: (restore(), commit_linear_states(cache, ctx, paths, torch.tensor([len(path) - 1]))),
                             args.reps)
            rows.append((f"tree forward, {n} nodes (depth {tree.max_depth})", t_tree, None))
            rows.append((f"commit after {n} nodes", t_commit, None))
    print(f"One Qwen3.5 Gated DeltaNet layer, hidden {args.hidden}, {args.key_heads} key / {args.value_heads} value heads "
          f"of {args.head_dim}, kernel {args.kernel}, {args.dtype}, {args.threads} thread(s), prompt {args.prompt}\n")
    print("| step | time / decode step |\n|---|---:|")
    for name, t, _ in rows:
        print(f"| {name} | {t / decode:.2f} |")
    conv_dim = 2 * args.key_heads * args.head_dim + args.value_heads * args.head_dim
    elt = 2 if dtype == torch.bfloat16 else 4
    record = conv_dim * elt + args.value_heads * (2 * args.head_dim + 1) * 4  # x (model dtype), k, u, G (fp32)
    states = args.value_heads * args.head_dim * args.head_dim * 4  # one recurrent state (fp32, as transformers keeps it)
    print(f"\nMemory a verify keeps per node and linear layer: {record / 1024:.0f} KiB (record: pre-conv input, k, u, G) "
          f"vs {states / 1024:.0f} KiB for the node's own state ({states / record:.0f}x).")
    for n in args.nodes:
        print(f"  {n} nodes x {args.linear_layers} linear layers: {n * args.linear_layers * record / 2**20:.0f} MiB "
              f"(every node's state: {n * args.linear_layers * states / 2**30:.1f} GiB)")


if __name__ == "__main__":
    main()
