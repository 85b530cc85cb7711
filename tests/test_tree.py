"""Tree construction against brute force, tree invariants, and the tree mask / verify / compact path.

The model half checks the claim everything else rests on: ONE target forward over root + tree
nodes (ancestor-only additive mask, positions past + depth) gives, at every node, exactly the
logits and hidden states of a fresh full forward over prompt + that node's ancestor path; and
after `compact` the cache continues exactly like a cache that only ever saw the accepted path.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_ddtree.cache import compact, make_cache, tree_attention_mask
from hf_ddtree.compat import cache_kwargs
from hf_ddtree.tree import Tree, build_chain, build_tree, topk_per_position
from hf_ddtree.verify import run_tree

from conftest import ARCHS, CACHES, IMPLS, build_target

# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def unique_ids(depth: int, width: int) -> torch.Tensor:
    """(D, K) token ids, all distinct, so a node's (depth, rank) can be read back from its token."""
    return (torch.arange(depth * width).view(depth, width) + 1000).long()


def brute_force(lp: torch.Tensor, budget: int, max_depth: int | None = None) -> list[tuple[int, ...]]:
    """Every rank path up to max_depth, sorted by (-score, rank tuple); the first `budget` of them.

    Scores are summed left to right in Python floats, the same order the heap uses, so equal
    paths tie exactly and the rank tuple decides.
    """
    rows = lp.tolist()
    depth = len(rows) if max_depth is None else min(max_depth, len(rows))
    width = len(rows[0]) if rows else 0
    paths = []
    for d in range(1, depth + 1):
        for ranks in itertools.product(range(width), repeat=d):
            s = 0.0
            for i, r in enumerate(ranks):
                s += rows[i][r]
            paths.append((-s, ranks))
    paths.sort()
    return [r for _, r in paths[:budget]]


def rank_paths(tree: Tree, ids: torch.Tensor) -> list[tuple[int, ...]]:
    """The rank tuple of every drafted node, in node order."""
    width = ids.shape[1]
    toks = tree.tokens.tolist()
    out = []
    for node in range(1, len(toks)):
        path = tree.path_to(node)[1:]
        out.append(tuple((toks[j] - 1000) - d * width for d, j in enumerate(path)))
    return out


def check_invariants(tree: Tree) -> None:
    n = len(tree.scores)
    assert tree.tokens.shape == tree.parents.shape == tree.depths.shape == (n,)
    assert tree.parents[0] == -1 and tree.depths[0] == 0 and tree.scores[0] == 0.0
    assert len(tree.children) == n
    parents, depths = tree.parents.tolist(), tree.depths.tolist()
    for i in range(1, n):
        assert 0 <= parents[i] < i, "parents must precede children"
        assert depths[i] == depths[parents[i]] + 1
        assert tree.scores[i] <= tree.scores[parents[i]] + 1e-12, "a child cannot outscore its parent"
    # children dicts are exactly the inverse of parents
    for p in range(n):
        expect = {int(tree.tokens[c]): c for c in range(1, n) if parents[c] == p}
        assert tree.children[p] == expect
    # visibility == "j is i or an ancestor of i"
    vis = tree.visibility()
    assert vis.dtype == torch.bool and vis.shape == (n, n)
    for i in range(n):
        anc = set(tree.path_to(i))
        assert vis[i].nonzero().flatten().tolist() == sorted(anc)
        assert tree.path_to(i)[0] == 0 and tree.path_to(i)[-1] == i


def random_logprobs(seed: int, depth: int, vocab: int, width: int, quantized: bool = False):
    g = torch.Generator().manual_seed(seed)
    if quantized:  # multiples of 1/4: sums are exact, so many paths tie exactly
        lp = -(torch.randint(0, 6, (depth, width), generator=g).float() / 4)
        return torch.sort(lp, dim=-1, descending=True).values, unique_ids(depth, width)
    logits = torch.randn(depth, vocab, generator=g) * 2
    lp, ids = topk_per_position(torch.log_softmax(logits, -1), width)
    remap = unique_ids(depth, ids.shape[1])  # same log-probs, ids we can decode
    return lp, remap


# ------------------------------------------------------------------------------------------------
# build_tree vs brute force
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("quantized", [False, True], ids=["random", "ties"])
def test_build_tree_matches_brute_force(seed, quantized):
    depth, width = 1 + seed % 4, 1 + (seed * 7) % 4
    lp, ids = random_logprobs(seed, depth, 32, width, quantized)
    total = sum(width**d for d in range(1, depth + 1))
    for budget in sorted({0, 1, 2, 3, 5, 8, 17, total - 1, total, total + 5}):
        if budget < 0:
            continue
        tree = build_tree(7, lp, ids, budget)
        check_invariants(tree)
        expect = brute_force(lp, budget)
        got = rank_paths(tree, ids)
        assert got == expect, f"budget={budget}"  # same node set AND the same (pop) order
        assert tree.num_nodes == min(budget, total)
        assert int(tree.tokens[0]) == 7
        for node, ranks in enumerate(got, start=1):
            assert tree.scores[node] == pytest.approx(sum(lp[d, r].item() for d, r in enumerate(ranks)), abs=1e-6)


def test_exact_ties_are_broken_by_rank_tuple():
    lp = torch.full((3, 3), -1.0)  # every node at depth d scores -d: order is BFS, lexicographic
    ids = unique_ids(3, 3)
    tree = build_tree(0, lp, ids, 39)
    got = rank_paths(tree, ids)
    expect = [r for d in (1, 2, 3) for r in itertools.product(range(3), repeat=d)]
    assert got == expect
    # equal siblings, deeper ties with shallower nodes: still the brute-force (-score, ranks) order
    lp2 = torch.tensor([[-0.5, -0.5, -1.0], [0.0, -0.5, -0.5], [-0.5, -0.5, -0.5]])
    for budget in range(0, 40):
        t = build_tree(0, lp2, ids, budget)
        assert rank_paths(t, ids) == brute_force(lp2, budget)
        again = build_tree(0, lp2.clone(), ids.clone(), budget)
        assert torch.equal(t.tokens, again.tokens) and torch.equal(t.parents, again.parents)


def test_budget_zero_and_one():
    lp, ids = random_logprobs(0, 4, 16, 3)
    t0 = build_tree(5, lp, ids, 0)
    assert t0.num_nodes == 0 and t0.tokens.tolist() == [5] and t0.parents.tolist() == [-1]
    assert t0.depths.tolist() == [0] and t0.children == [{}]
    assert t0.visibility().tolist() == [[True]]
    t1 = build_tree(5, lp, ids, 1)
    assert t1.num_nodes == 1 and t1.tokens.tolist() == [5, int(ids[0, 0])]
    assert t1.parents.tolist() == [-1, 0] and t1.depths.tolist() == [0, 1]
    assert t1.scores[1] == pytest.approx(lp[0, 0].item())
    check_invariants(t1)
    with pytest.raises(ValueError, match="budget"):
        build_tree(5, lp, ids, -1)


def test_budget_larger_than_all_paths_returns_every_node():
    lp, ids = random_logprobs(3, 3, 16, 3)
    tree = build_tree(0, lp, ids, 10_000)
    assert tree.num_nodes == 3 + 9 + 27
    assert sorted(rank_paths(tree, ids)) == sorted(brute_force(lp, 10_000))
    check_invariants(tree)


@pytest.mark.parametrize("max_depth", [0, 1, 2, 3, 10])
def test_max_depth(max_depth):
    lp, ids = random_logprobs(4, 4, 16, 3)
    for budget in (1, 4, 9, 30, 200):
        tree = build_tree(0, lp, ids, budget, max_depth=max_depth)
        check_invariants(tree)
        assert rank_paths(tree, ids) == brute_force(lp, budget, max_depth=max_depth)
        assert int(tree.depths.max()) <= max_depth


def test_empty_draft_gives_root_only():
    tree = build_tree(3, torch.empty(0, 4), torch.empty(0, 4, dtype=torch.long), 10)
    assert tree.num_nodes == 0 and tree.tokens.tolist() == [3]


@pytest.mark.parametrize("seed", range(4))
def test_truncate_equals_smaller_budget(seed):
    lp, ids = random_logprobs(seed + 20, 4, 16, 4)
    full = build_tree(1, lp, ids, 40)
    for k in range(0, full.num_nodes + 1):
        cut = full.truncate(k)
        ref = build_tree(1, lp, ids, k)
        check_invariants(cut)
        assert cut.num_nodes == k
        assert torch.equal(cut.tokens, ref.tokens) and torch.equal(cut.parents, ref.parents)
        assert torch.equal(cut.depths, ref.depths) and cut.scores == ref.scores
        assert cut.children == ref.children
        assert torch.equal(cut.visibility(), full.visibility()[: k + 1, : k + 1])


def test_build_chain():
    ids = torch.tensor([4, 9, 9, 2])
    lps = torch.tensor([-0.5, -0.25, -1.0, -0.125])
    chain = build_chain(7, ids, lps)
    check_invariants(chain)
    assert chain.tokens.tolist() == [7, 4, 9, 9, 2]
    assert chain.parents.tolist() == [-1, 0, 1, 2, 3]
    assert chain.depths.tolist() == [0, 1, 2, 3, 4]
    assert chain.scores == pytest.approx([0.0, -0.5, -0.75, -1.75, -1.875])
    assert chain.children == [{4: 1}, {9: 2}, {9: 3}, {2: 4}, {}]
    assert chain.visibility().tolist() == torch.ones(5, 5).tril().bool().tolist()
    assert chain.path_to(4) == [0, 1, 2, 3, 4]
    no_lp = build_chain(7, ids)
    assert no_lp.scores == [0.0] * 5 and no_lp.tokens.tolist() == [7, 4, 9, 9, 2]
    empty = build_chain(7, ids.new_empty(0))
    assert empty.num_nodes == 0 and empty.tokens.tolist() == [7]


def test_topk_per_position():
    lp = torch.log_softmax(torch.randn(3, 10, generator=torch.Generator().manual_seed(0)), -1)
    v, i = topk_per_position(lp, 4)
    assert v.shape == i.shape == (3, 4)
    assert torch.all(v[:, :-1] >= v[:, 1:])
    assert torch.equal(torch.gather(lp, 1, i), v)
    v, i = topk_per_position(lp, 100)  # clipped to the vocabulary
    assert v.shape == (3, 10)
    v, i = topk_per_position(lp, 0)  # at least one
    assert v.shape == (3, 1)


def test_tree_attention_mask_layout():
    tree = build_tree(0, torch.tensor([[-0.1, -0.2], [-0.3, -0.4]]), unique_ids(2, 2), 5)
    vis = tree.visibility()
    n = vis.shape[0]
    mask = tree_attention_mask(vis, past_len=3, kv_len=3 + n + 4, dtype=torch.float32, device=torch.device("cpu"))
    assert mask.shape == (1, 1, n, 3 + n + 4) and mask.dtype == torch.float32
    neg = torch.finfo(torch.float32).min
    assert torch.all(mask[0, 0, :, :3] == 0)  # the cache is visible to every node
    assert torch.equal(mask[0, 0, :, 3:3 + n] == 0, vis)  # ancestors and itself only
    assert torch.all(mask[0, 0, :, 3 + n:] == neg)  # stale static slots are hidden
    half = tree_attention_mask(vis, 3, 3 + n, torch.bfloat16, torch.device("cpu"))
    assert half.dtype == torch.bfloat16 and half.min() == torch.finfo(torch.bfloat16).min


# ------------------------------------------------------------------------------------------------
# one tree forward == per-path full forwards; compaction == a cache that only saw the path
# ------------------------------------------------------------------------------------------------

HIDDEN_IDX = [1, 2]


def full_forward(target, seq: list[int]):
    out = target(input_ids=torch.tensor([seq]), output_hidden_states=True, use_cache=False)
    feats = torch.cat([out.hidden_states[i][0] for i in HIDDEN_IDX], dim=-1)
    return out.logits[0].float(), feats


def bushy_tree(seed: int, root: int, vocab: int, budget: int = 14) -> Tree:
    g = torch.Generator().manual_seed(seed)
    lp, ids = topk_per_position(torch.log_softmax(torch.randn(4, vocab, generator=g), -1), 3)
    tree = build_tree(root, lp, ids, budget)
    assert int(tree.depths.max()) >= 2 and len(tree.children[0]) >= 2, "test tree should branch and go deep"
    return tree


def check_tree_forward(target, cache, prefix: list[int], tree: Tree, atol: float = 1e-5) -> torch.Tensor:
    """Verify `tree` on top of `prefix` (whose last token is the root, not yet in the cache)."""
    past = len(prefix) - 1
    assert int(cache.get_seq_length()) == past
    with torch.no_grad():
        logits, feats = run_tree(target, tree, cache, past, HIDDEN_IDX)
        for node in range(tree.num_nodes + 1):
            path = tree.tokens[tree.path_to(node)[1:]].tolist()
            ref_logits, ref_feats = full_forward(target, prefix + path)
            torch.testing.assert_close(logits[node].float(), ref_logits[-1], atol=atol, rtol=0)
            torch.testing.assert_close(feats[node], ref_feats[-1], atol=atol, rtol=0)
    return logits


@pytest.mark.parametrize("cache_kind", CACHES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_tree_forward_and_compaction_match_full_forward(arch, impl, cache_kind):
    target = build_target(arch, impl, seed=5)
    vocab = target.config.vocab_size
    prompt = torch.randint(0, vocab, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    cache = make_cache(target, cache_kind, max_cache_len=64)
    with torch.no_grad():
        target(input_ids=torch.tensor([prompt[:-1]]), **cache_kwargs(target, cache), use_cache=True)

    # round 1: the root is the prompt's last token
    tree = bushy_tree(0, prompt[-1], vocab)
    check_tree_forward(target, cache, prompt, tree)
    deepest = int(tree.depths.argmax())
    keep_nodes = tree.path_to(deepest)
    compact(cache, len(prompt) - 1, torch.tensor(keep_nodes))
    accepted = prompt + tree.tokens[keep_nodes[1:]].tolist()
    assert int(cache.get_seq_length()) == len(accepted)

    # plain continuation (default positions, causal mask) after compaction
    extra = [3, 17, 42]
    with torch.no_grad():
        cont = target(input_ids=torch.tensor([extra]), **cache_kwargs(target, cache), use_cache=True).logits[0]
    ref, _ = full_forward(target, accepted + extra)
    torch.testing.assert_close(cont.float(), ref[-3:], atol=1e-5, rtol=0)

    # round 2 over the compacted cache (stale static slots past the live length must stay hidden)
    seq = accepted + extra + [11]
    tree2 = bushy_tree(1, 11, vocab, budget=9)
    check_tree_forward(target, cache, seq, tree2)
    leaf = max(range(tree2.num_nodes + 1), key=lambda i: (int(tree2.depths[i]), -i))
    keep2 = tree2.path_to(leaf)
    compact(cache, len(seq) - 1, torch.tensor(keep2))
    seq2 = seq + tree2.tokens[keep2[1:]].tolist()
    # root-only acceptance (keep = [0]) is also a valid compaction
    tree3 = bushy_tree(2, 5, vocab, budget=6)
    check_tree_forward(target, cache, seq2 + [5], tree3)
    compact(cache, len(seq2), torch.tensor([0]))
    with torch.no_grad():
        cont = target(input_ids=torch.tensor([[8]]), **cache_kwargs(target, cache), use_cache=True).logits[0, -1]
    ref, _ = full_forward(target, seq2 + [5, 8])
    torch.testing.assert_close(cont.float(), ref[-1], atol=1e-5, rtol=0)
