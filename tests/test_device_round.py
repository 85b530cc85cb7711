"""The device-resident round: the tree builder, the accept walk, processors by depth, compaction and
the host-read budget.

* `build_trees` (a beam over depths, batched, on the device) gives the heap's trees exactly: the
  same nodes in the same pop order, ties included, the same float64 scores (the heap is the oracle).
* `accept_paths` (every node's choice at once, matches through the ancestor matrix) gives the host
  walk's path greedily, and under sampling the exact law of (accepted path, next token), which is
  computed here by enumeration on a small tree and chi-square tested.
* `process_scores` by depth equals stock processors called per node on that node's own prefix.
* a decode reads the host at most twice per round (counted with `bench.host_reads.HostReads`).
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor,
                                                    NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper)

import hf_ddtree
from hf_ddtree import cache as cache_mod
from hf_ddtree.bench.host_reads import HostReads
from hf_ddtree.compat import cache_kwargs
from hf_ddtree.tree import ancestor_matrix, build_tree, build_trees, topk_per_position
from hf_ddtree.verify import accept_paths, process_scores, walk

from conftest import build_drafter, build_target
from test_sampling import chi_square_pvalue


def _random_case(seed: int):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B, D, V = rng.randint(1, 3), rng.randint(1, 6), rng.randint(2, 40)
    K = rng.randint(1, V)
    logits = torch.randn(B, D, V, generator=g)
    if seed % 2:
        logits = (logits * 2).round()  # exact ties between siblings and across depths
    if seed % 5 == 0:
        logits[..., : V // 2] = float("-inf")  # a shortlist: -inf log-probs inside the top-k
    lp = torch.log_softmax(logits, -1)
    if seed % 3 == 0:
        lp = (lp * 2).round() / 2  # log-probs of 0 (children tie with their parents)
    vals, ids = torch.topk(lp.float(), K, dim=-1)
    roots = torch.randint(0, V, (B,), generator=g)
    budget = rng.choice([0, 1, 2, 3, 5, 8, 16, 31, 64, 100])
    max_depth = rng.choice([None, 1, 2, D])
    return roots, vals, ids, budget, max_depth


@pytest.mark.parametrize("chunk", range(4))
def test_build_trees_equals_the_heap(chunk):
    """400 random cases (batches, ties, -inf, depth limits, budgets past the number of prefixes)."""
    for seed in range(chunk * 100, chunk * 100 + 100):
        roots, vals, ids, budget, max_depth = _random_case(seed)
        got = build_trees(roots, vals, ids, budget, max_depth)
        for b, tree in enumerate(got):
            ref = build_tree(int(roots[b]), vals[b], ids[b], budget, max_depth)
            assert tree.num_nodes == ref.num_nodes, seed
            assert torch.equal(tree.tokens, ref.tokens) and torch.equal(tree.parents, ref.parents), seed
            assert torch.equal(tree.depths, ref.depths), seed
            assert tree.scores == ref.scores, seed  # the same float64 sums, bit for bit
            assert tree.children == ref.children
            assert tree.max_depth >= (int(ref.depths.max()) if ref.num_nodes else 0)


def test_build_trees_all_ties_is_bfs_lexicographic():
    lp = torch.full((1, 3, 3), -1.0)
    ids = torch.arange(9).view(1, 3, 3)
    for budget in range(40):
        [t] = build_trees(torch.tensor([0]), lp, ids, budget)
        assert torch.equal(t.parents, build_tree(0, lp[0], ids[0], budget).parents)


def _random_tree_and_scores(seed: int, V: int = 6, budget: int = 10):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(1, 4, V, generator=g), -1)
    vals, ids = topk_per_position(lp, 3)
    [tree] = build_trees(torch.tensor([1]), vals, ids, budget)
    return tree, torch.randn(tree.size, V, generator=g) * 1.5


def test_accept_paths_greedy_equals_the_host_walk():
    for seed in range(60):
        tree, scores = _random_tree_and_scores(seed)
        tree = tree.pad_to(tree.size + seed % 3)
        scores = torch.cat([scores, scores[:1].expand(tree.pad, -1)]) if tree.pad else scores
        # make the walk go deep sometimes: set each node's argmax to one of its children's tokens
        if seed % 2:
            for node, kids in enumerate(tree.children):
                if kids:
                    scores[node, next(iter(kids))] += 10.0
        path, nxt = walk(tree, scores, False)
        vis = ancestor_matrix(tree.parents, tree.max_depth)
        paths, counts, nxts, packed = accept_paths(tree.tokens[None], tree.parents[None], vis[None], tree.depths[None],
                                                   scores[None], False, tree.max_depth)
        assert int(counts[0]) == len(path) - 1 and int(nxts[0]) == nxt
        assert paths[0, :len(path)].tolist() == path and not paths[0, len(path):].any()
        assert packed[0].tolist()[:1 + int(counts[0])] == [len(path) - 1] + tree.tokens[path[1:]].tolist()
        assert int(packed[0, -1]) == nxt


def test_accept_paths_sampling_has_the_walks_exact_law():
    """P(path ends at node u, next token t) = prod over the path's edges of p_parent(child token) times
    p_u(t) for t not carried by a child of u: enumerated, then 20000 draws (one batched call) tested."""
    tree, scores = _random_tree_and_scores(3, V=5, budget=8)
    for node, kids in enumerate(tree.children):  # make deep paths likely
        for tok in kids:
            scores[node, tok] += 1.0
    probs = torch.softmax(scores.double(), -1)
    N, V = probs.shape
    exact = torch.zeros(N, V, dtype=torch.float64)
    reach = [1.0] * N
    for u in range(N):
        if u:
            p = int(tree.parents[u])
            reach[u] = reach[p] * float(probs[p, int(tree.tokens[u])])
        for t in range(V):
            if t not in tree.children[u]:
                exact[u, t] = reach[u] * float(probs[u, t])
    assert abs(float(exact.sum()) - 1) < 1e-9
    n = 20000
    torch.manual_seed(0)
    vis = ancestor_matrix(tree.parents, tree.max_depth)
    rep = lambda x: x[None].expand(n, *x.shape)  # noqa: E731
    paths, counts, nxt, _ = accept_paths(rep(tree.tokens), rep(tree.parents), rep(vis), rep(tree.depths), rep(scores),
                                         True, tree.max_depth)
    last = paths.gather(1, counts[:, None])[:, 0]
    cells = torch.bincount(last * V + nxt, minlength=N * V).double()
    _, _, p = chi_square_pvalue(cells, exact.flatten())
    assert p > 1e-3, p
    wrong = torch.softmax(scores.double() * 0.7, -1)  # power: another temperature is rejected
    w = torch.zeros(N, V, dtype=torch.float64)
    for u in range(N):
        r = 1.0
        for a, b_ in zip(tree.path_to(u)[:-1], tree.path_to(u)[1:]):
            r *= float(wrong[a, int(tree.tokens[b_])])
        for t in range(V):
            if t not in tree.children[u]:
                w[u, t] = r * float(wrong[u, t])
    assert chi_square_pvalue(cells, w.flatten())[2] < 1e-3


@pytest.mark.parametrize("procs", ["penalty", "ngram", "min_new", "mixed"])
def test_processors_by_depth_equal_per_node_calls(procs):
    V = 12
    lists = {
        "penalty": [RepetitionPenaltyLogitsProcessor(1.7)],
        "ngram": [NoRepeatNGramLogitsProcessor(2)],
        "min_new": [MinNewTokensLengthLogitsProcessor(7, 6, eos_token_id=3)],
        "mixed": [RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7), NoRepeatNGramLogitsProcessor(3),
                  TopKLogitsWarper(5)],
    }
    plist = LogitsProcessorList(lists[procs])
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        lp = torch.log_softmax(torch.randn(1, 5, V, generator=g), -1)
        vals, ids = topk_per_position(lp, 3)
        [tree] = build_trees(torch.tensor([4]), vals, ids, 14)
        tree = tree.pad_to(tree.size + 2)
        prefix = torch.randint(0, V, (1, 5), generator=g)
        prefix[0, -1] = 4
        logits = torch.randn(tree.size, V, generator=g)
        got = process_scores(plist, prefix, tree, logits)
        for i in range(tree.size):
            path = tree.path_to(i)[1:]
            ids_i = torch.cat([prefix, tree.tokens[path][None]], -1) if path else prefix
            want = plist(ids_i, logits[i:i + 1].clone())
            assert torch.equal(got[i:i + 1], want), (procs, seed, i)


def test_move_paths_then_set_lengths_equals_compact_rows():
    target = build_target("qwen3", "sdpa")
    for kind in cache_mod.CACHE_KINDS:
        caches = []
        for _ in range(2):
            c = cache_mod.make_cache(target, kind, 64)
            torch.manual_seed(0)
            target(input_ids=torch.randint(0, 60, (2, 20)), **cache_kwargs(target, c), use_cache=True)
            target(input_ids=torch.randint(0, 60, (2, 6)), **cache_kwargs(target, c), use_cache=True)  # the "trees"
            caches.append(c)
        rows = cache_mod.CacheRows([0, 3], [16, 20])  # row 0 shorter: its slots 16..19 are stale
        paths = [[0, 2, 5], [0, 1]]
        want = cache_mod.compact_rows(caches[0], rows, paths)
        padded = torch.tensor([[0, 2, 5], [0, 1, 0]])
        cache_mod.move_paths(caches[1], rows, padded)
        got = cache_mod.set_lengths(caches[1], rows, [3, 2])
        assert got == want
        for a, b in zip(caches[0].layers, caches[1].layers):
            for r, n in enumerate(want.length):
                assert torch.equal(a.keys[r, :, :n], b.keys[r, :, :n]) and torch.equal(a.values[r, :, :n], b.values[r, :, :n])


def test_the_kv_arena_moves_and_selects_every_layer_like_the_per_layer_ops():
    """`cache.make_kv_arena`: every layer's K/V become views of one tensor; path moves (`compact_rows`, `move_paths`)
    and row selection (`select_rows`) through it equal the per-layer ops on a twin cache, later forwards write into
    it, and replacing a layer's tensors retires it (the per-layer ops take over)."""
    target = build_target("qwen3", "sdpa")
    caches = []
    for arena in (False, True):
        c = cache_mod.make_cache(target, "static", 64)
        torch.manual_seed(0)
        target(input_ids=torch.randint(0, 60, (3, 20)), **cache_kwargs(target, c), use_cache=True)
        if arena:
            assert cache_mod.make_kv_arena(c) and cache_mod.kv_arena(c) is not None
            held = cache_mod.kv_arena(c)
            assert all(layer.keys.data_ptr() == held[0, i].data_ptr() and layer.values.data_ptr() == held[1, i].data_ptr()
                       for i, layer in enumerate(cache_mod.kv_layers(c)))
        target(input_ids=torch.randint(0, 60, (3, 6)), **cache_kwargs(target, c), use_cache=True)  # the "trees"
        caches.append(c)

    def same(rows):
        for a, b in zip(cache_mod.kv_layers(caches[0]), cache_mod.kv_layers(caches[1])):
            for r, n in enumerate(rows.length):
                assert torch.equal(a.keys[r, :, :n], b.keys[r, :, :n]) and torch.equal(a.values[r, :, :n], b.values[r, :, :n])

    rows = cache_mod.CacheRows([0, 3, 0], [16, 20, 18])
    got = [cache_mod.compact_rows(c, rows, [[0, 2, 5], [0, 1], [0, 3]]) for c in caches]
    assert got[0] == got[1]
    same(got[0])
    rows = got[0]
    torch.manual_seed(1)
    ids = torch.randint(0, 60, (3, 4))
    for c in caches:  # another round, moved the device round's way
        target(input_ids=ids, **cache_kwargs(target, c), use_cache=True)
        cache_mod.move_paths(c, rows, torch.tensor([[0, 1, 3], [0, 2, 0], [0, 0, 0]]))
    rows = cache_mod.set_lengths(caches[0], rows, [3, 2, 1])
    cache_mod.set_lengths(caches[1], got[0], [3, 2, 1])
    same(rows)
    kept = [cache_mod.select_rows(c, [2, 0], rows) for c in caches]  # the middle row finished
    assert kept[0] == kept[1] and cache_mod.kv_arena(caches[1]) is not None
    assert cache_mod.kv_arena(caches[1]).shape[2] == 2
    same(kept[0])
    layer = cache_mod.kv_layers(caches[1])[0]
    layer.keys = layer.keys.clone()  # a layer's tensors replaced: the arena no longer holds the cache
    assert cache_mod.kv_arena(caches[1]) is None
    last = [cache_mod.compact_rows(c, kept[0], [[0, 2], [0, 1]]) for c in caches]
    assert last[0] == last[1]
    same(last[0])

    caches = []  # one row: the arena's moves are a gather and a copy along the slots
    for arena in (False, True):
        c = cache_mod.make_cache(target, "static", 64)
        torch.manual_seed(2)
        target(input_ids=torch.randint(0, 60, (1, 26)), **cache_kwargs(target, c), use_cache=True)
        assert not arena or cache_mod.make_kv_arena(c)
        caches.append(c)
    got = [cache_mod.compact_rows(c, cache_mod.CacheRows([0], [20]), [[0, 1, 3, 5]]) for c in caches]
    assert got[0] == got[1] == cache_mod.CacheRows([0], [24])
    same(got[0])


@pytest.fixture(scope="module")
def pair():
    target = build_target("qwen3", "sdpa", layers=4)
    drafter = build_drafter(target)
    hf_ddtree.enable(target)
    return target, drafter


@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("kw", [dict(tree_budget=16), dict(method="dflash"), dict(method="ddtree-lookup", tree_budget=16)],
                         ids=["ddtree", "dflash", "ddtree-lookup"])
def test_at_most_two_host_reads_per_round(pair, B, sample, kw):
    target, drafter = pair
    torch.manual_seed(B)
    base = torch.randint(0, 60, (1, 6))
    ids = torch.cat([base, base, base], 1).expand(B, -1).clone()  # text that repeats: lookup finds candidates
    ids[:, -1] = torch.arange(B)
    gen = dict(assistant_model=drafter, max_new_tokens=48, return_dict_in_generate=True, do_sample=sample,
               device_round=True, **kw)
    with HostReads() as reads:
        out = target.generate(ids, **gen)
    acc = out.acceptance_lengths
    rounds = len(acc) if B == 1 else max(len(a) for a in acc)
    assert rounds >= 8
    # setup outside the rounds: the prompt's host copy, the first token, stopping-criteria ids
    assert reads.total <= 2 * rounds + 4, (reads.total, rounds, reads.sites(8))
    if kw.get("method") != "ddtree-lookup":
        assert reads.total <= rounds + 4, (reads.total, rounds, reads.sites(8))
    if not sample:  # and still the target's own output
        from hf_ddtree.decoding import GenerationMixin

        ref = GenerationMixin.generate(target, ids, max_new_tokens=48, do_sample=False)
        assert torch.equal(out.sequences, ref)


def test_host_reads_counts_reads():
    x = torch.arange(5)
    with HostReads() as reads:
        x.tolist()
        int(x[0])
        bool(x.any())
        (x + 1).sum()
    assert reads.total == 3 and reads.by_kind == {"tolist": 1, "__int__": 1, "__bool__": 1}


def test_the_round_compiles_fullgraph():
    """Tree build, accept walk and KV moves have no host read and no graph break: each compiles with
    fullgraph=True (inductor, CPU) and gives the eager results."""
    from hf_ddtree.cache import move_kv
    from hf_ddtree.tree import _beam_widths, beam_tree_tensors

    torch._dynamo.reset()
    roots, vals, ids, _, _ = _random_case(7)
    widths = _beam_widths(vals.shape[-1], vals.shape[1], 16)
    n = min(16, sum(widths))
    got = torch.compile(beam_tree_tensors, fullgraph=True)(roots, vals, ids, widths, n)
    for a, b in zip(got, beam_tree_tensors(roots, vals, ids, widths, n)):
        assert torch.equal(a, b)

    tree, scores = _random_tree_and_scores(5)
    vis = ancestor_matrix(tree.parents, tree.max_depth)
    args = (tree.tokens[None], tree.parents[None], vis[None], tree.depths[None], scores[None], False, tree.max_depth)
    for a, b in zip(torch.compile(accept_paths, fullgraph=True)(*args), accept_paths(*args)):
        assert torch.equal(a, b)
    compiled_vis = torch.compile(ancestor_matrix, fullgraph=True)(tree.parents, tree.max_depth)
    assert torch.equal(compiled_vis, vis)

    keys, values = torch.randn(2, 2, 12, 4), torch.randn(2, 2, 12, 4)
    index = torch.tensor([[0, 0, 1, 1], [8, 10, 9, 11], [5, 6, 7, 8]])
    k2, v2 = keys.clone(), values.clone()
    torch.compile(move_kv, fullgraph=True)(k2, v2, index)
    move_kv(keys, values, index)
    assert torch.equal(keys, k2) and torch.equal(values, v2)


def test_the_loop_pieces_compile_fullgraph_and_equal_the_host_built_masks():
    """What the loop compiles (`compat.compiled_function`): `tree_inputs` (ancestor matrices, positions, the full
    and a sliding-window mask) for a ragged, padded batch on the layout tensor equals the masks built from host
    ints (`cache.tree_attention_mask_rows`, `cache.sliding_window_mask_rows`), and `move_path_kv` (every layer's
    path moves in one graph) equals the per-layer moves; both compiled with inductor, fullgraph, and equal eager."""
    from hf_ddtree.cache import (CacheRows, layout_tensor, move_kv, move_path_kv, path_moves, sliding_window_mask_rows,
                                 tree_attention_mask_rows)
    from hf_ddtree.tree import ancestor_matrices
    from hf_ddtree.verify import tree_inputs

    torch._dynamo.reset()
    trees = [build_tree(1, *topk_per_position(torch.log_softmax(torch.randn(4, 9, generator=torch.Generator().manual_seed(s)),
                                                                -1), 3), 6) for s in (0, 1)]
    size = 8
    trees = [t.pad_to(size) for t in trees]
    parents = torch.stack([t.parents for t in trees])
    depths = torch.stack([t.depths for t in trees])
    max_depth = max(t.max_depth for t in trees)
    rows = CacheRows([0, 3], [10, 14])  # row 0 shorter (stale slots 10..13), row 1 left-padded
    num_real = [t.size - t.pad for t in trees]
    at = layout_tensor(rows, num_real, "cpu")
    windows = (("full_attention", None), ("sliding_attention", 3))
    kw = dict(max_depth=max_depth, kv_len=30, dtype=torch.float32, windows=windows)
    eager = tree_inputs(parents, depths, at, **kw)
    got = torch.compile(tree_inputs, fullgraph=True, dynamic=False)(parents, depths, at, **kw)
    vis = ancestor_matrices(parents, max_depth)
    assert torch.equal(eager[0], vis) and torch.equal(got[0], vis)
    positions = torch.tensor(rows.positions)[:, None] + depths
    assert torch.equal(eager[1], positions) and torch.equal(got[1], positions)
    full = tree_attention_mask_rows(vis, rows, 30, torch.float32, "cpu", num_real=num_real)
    want = {"full_attention": full, "sliding_attention": sliding_window_mask_rows(full, depths, rows, 3)}
    for i, (kind, _) in enumerate(windows):
        assert torch.equal(eager[2][i], want[kind]) and torch.equal(got[2][i], want[kind]), kind
    assert not torch.equal(want["full_attention"], want["sliding_attention"])  # the window does cut something

    paths = torch.tensor([[0, 2, 5, 0], [0, 1, 0, 0]])
    layers = [(torch.randn(2, 2, 30, 4), torch.randn(2, 2, 30, 4)) for _ in range(3)]
    ref = [(k.clone(), v.clone()) for k, v in layers]
    for k, v in ref:
        move_kv(k, v, path_moves(paths, at))
    torch.compile(move_path_kv, fullgraph=True, dynamic=False)([k for k, _ in layers], [v for _, v in layers], paths, at)
    for (k, v), (rk, rv) in zip(layers, ref):
        assert torch.equal(k, rk) and torch.equal(v, rv)
    # the moves land where compact_rows puts them: row b's path at slots [length[b], + P)
    assert torch.equal(path_moves(paths, at)[2], torch.tensor([10, 11, 12, 13, 14, 15, 16, 17]))


def test_lineage_matrices_equal_the_ancestor_matrices():
    """Trees the host builds carry each node's lineage (`Tree.lineage`); the eager round's visibility from it
    (`tree.lineage_matrices`, one write) equals `ancestor_matrices` from the parents: heap trees of several
    depths, a truncated one (CaDDTree), a chain, a merged lookup tree, padded to one size, B = 1 and 4."""
    from hf_ddtree.tree import ancestor_matrices, build_chain, lineage_matrices, merge_paths, tree_paths

    g = torch.Generator().manual_seed(0)
    trees = [build_tree(1, *topk_per_position(torch.log_softmax(torch.randn(6, 20, generator=g) * t, -1), 5), n)
             for t, n in ((1.0, 12), (4.0, 9), (8.0, 12))]
    trees.append(trees[0].truncate(5))
    trees.append(build_chain(1, torch.tensor([3, 4, 5, 6])))
    trees.append(merge_paths(1, tree_paths(trees[1]) + [([7, 8, 9], [-0.1, -0.2, -0.3])], 11))
    assert all(t.lineage is not None for t in trees) and max(t.max_depth for t in trees) >= 4
    size = max(t.size for t in trees) + 2
    padded = [t.pad_to(size) for t in trees]
    want = ancestor_matrices(torch.stack([t.parents for t in padded]), max(t.max_depth for t in padded))
    assert torch.equal(lineage_matrices([t.lineage for t in padded], size), want)
    for i, t in enumerate(padded):
        assert torch.equal(lineage_matrices([t.lineage], size)[0], want[i])


@pytest.mark.parametrize("layout", [([0], [10], 40), ([0], [10], 18), ([0, 3], [10, 14], 30), ([2, 0, 0], [2, 7, 12], 25)],
                         ids=["one-row-static", "one-row-dynamic", "ragged-padded", "empty-row"])
def test_the_eager_mask_from_host_ints_equals_the_tensor_core(layout):
    """The eager round writes its mask from the layout's host ints (`cache.tree_mask_from_layout`, and from the
    host trees' lineages with no visibility tensor, `cache.tree_mask_from_lineage`): the same values as the tensor
    core that compiles (`cache.tree_mask_core`), padded and unpadded trees, ragged rows, a row with no live slot, a
    kv_len past the tree (a static cache) or ending with it (a dynamic one), into a dirty buffer too."""
    from hf_ddtree.cache import CacheRows, layout_tensor, tree_mask_core, tree_mask_from_layout, tree_mask_from_lineage
    from hf_ddtree.tree import ancestor_matrices

    start, length, kv_len = layout
    rows = CacheRows(start, length)
    g = torch.Generator().manual_seed(len(start))
    trees = [build_tree(1, *topk_per_position(torch.log_softmax(torch.randn(4, 9, generator=g), -1), 3), n)
             for n in (5, 3, 6)[:len(start)]]
    size = kv_len - rows.write_at
    for padded in (False, True):
        ts = [t.pad_to(size) for t in trees] if padded else [t.pad_to(max(t.size for t in trees)) for t in trees]
        num_real = [t.size - t.pad for t in ts] if padded else [t.size for t in ts]
        vis = ancestor_matrices(torch.stack([t.parents for t in ts]), max(t.max_depth for t in ts))
        n = vis.shape[1]
        width = kv_len if padded else rows.write_at + n
        want = tree_mask_core(vis, layout_tensor(rows, num_real, "cpu"), width, torch.float32)
        got = tree_mask_from_layout(vis, rows, num_real, width, torch.float32)
        assert torch.equal(got, want)
        dirty = torch.randn(len(start), 1, n, width)
        assert tree_mask_from_layout(vis, rows, num_real, width, torch.float32, out=dirty) is dirty
        assert torch.equal(dirty, want)
        assert (want == 0).any() and (want < 0).any()
        lineages = [t.lineage for t in ts]  # padding rows (the loop's num_real: size - pad) see only themselves
        want = tree_mask_core(vis, layout_tensor(rows, [t.size - t.pad for t in ts], "cpu"), width, torch.float32)
        assert torch.equal(tree_mask_from_lineage(lineages, n, rows, width, torch.float32, "cpu"), want)
        dirty = torch.randn(len(start), 1, n, width)
        assert tree_mask_from_lineage(lineages, n, rows, width, torch.float32, "cpu", out=dirty) is dirty
        assert torch.equal(dirty, want)
        strided = torch.randn(len(start), 1, width, n).transpose(2, 3)  # a non-contiguous buffer is written too
        assert tree_mask_from_lineage(lineages, n, rows, width, torch.float32, "cpu", out=strided) is strided
        assert torch.equal(strided, want)


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_the_host_walk_gives_the_device_walks_tensors(B, sample):
    """`accept_on_host` hands the loop host lists (`verify.HostWalk`) and makes tensors only when asked: they equal
    `accept_paths`' on the same trees and scores (greedy; sampled, on scores whose every row is one-hot, so both
    walks draw the same tokens), and the visibility the lazy `TreeInputs` makes from lineages is the ancestor
    matrix."""
    from hf_ddtree.tree import ancestor_matrices
    from hf_ddtree.verify import HostWalk, TreeInputs, accept_on_host, unpack, walk_tensors

    g = torch.Generator().manual_seed(B + 2 * sample)
    trees = [build_tree(1, *topk_per_position(torch.log_softmax(torch.randn(5, 9, generator=g), -1), 3), n)
             for n in (9, 4, 12)[:B]]
    size = max(t.size for t in trees)
    trees = [t.pad_to(size) for t in trees]
    tokens, parents, depths = (torch.stack([getattr(t, k) for t in trees]) for k in ("tokens", "parents", "depths"))
    max_depth = max(t.max_depth for t in trees)
    # scores that follow each tree down a few levels: node i's choice is its first child's token, else a token
    # no child carries
    choice = torch.full((B, size), 8)
    for b, t in enumerate(trees):
        for i, kids in enumerate(t.children):
            if kids and (i == 0 or (i * 7 + b) % 4):
                choice[b, i] = min(kids)
    scores = torch.full((B, size, 9), -1e4).scatter(2, choice[..., None], 0.0)  # others: probability 0 exactly
    inputs = TreeInputs(depths, depths, None, None, max_depth, lineages=[t.lineage for t in trees])
    assert torch.equal(inputs.visibility, ancestor_matrices(parents, max_depth))
    host = accept_on_host(trees, tokens, parents, inputs, scores, sample)
    assert isinstance(host, HostWalk) and host.made is None
    want = accept_paths(tokens, parents, inputs.visibility, depths, scores, sample, max_depth)
    got = walk_tensors(host)
    for k in range(3):  # paths (root-padded both ways), counts, next tokens
        assert torch.equal(got[k], want[k])
    assert host.paths == want[0].tolist()
    # packed: the same commit (entries past a row's count are filler, `unpack` drops them)
    assert unpack(host.packed) == unpack(got[3].tolist()) == unpack(want[3].tolist())
    assert max(host.packed[b][0] for b in range(B)) >= 1  # some walk went past the root


def test_host_tensor_keeps_values_and_dtype():
    """`device.host_tensor` (made through NumPy) gives what `torch.tensor` gives: values, shape and dtype, and
    refuses a ragged list as torch.tensor does."""
    from hf_ddtree.device import host_tensor

    cases = [([[3, -1, 2**40], [0, 5, 7]], torch.long), ([0.5, float("-inf"), 1e-300], torch.float64),
             ([[True, False]], torch.bool), ([1.25, -2.0], torch.float32), ([], torch.long), (7, torch.long),
             ([[1, 2]], torch.int16)]
    for values, dtype in cases:
        got, want = host_tensor(values, "cpu", dtype), torch.tensor(values, dtype=dtype)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    with pytest.raises((ValueError, TypeError)):
        host_tensor([[1, 2], [3]], "cpu")


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("kw", [dict(tree_budget=16), dict(method="dflash"), dict(method="ddtree-lookup", tree_budget=16),
                                dict(tree_budget="auto", max_tree_budget=16), dict(tree_budget=0)],
                         ids=["ddtree", "dflash", "ddtree-lookup", "auto", "budget0"])
@pytest.mark.parametrize("cache", cache_mod.CACHE_KINDS)
def test_the_host_round_equals_the_device_round_and_stock(pair, B, kw, cache):
    """CPU users get the host heap and walk by default (device_round=None on CPU): same tokens as the
    device round and as stock, with a repetition penalty (processors by depth) and ragged rows."""
    from hf_ddtree.decoding import GenerationMixin

    target, drafter = pair
    torch.manual_seed(10 + B)
    ids = torch.randint(0, 60, (B, 10))
    mask = torch.ones_like(ids)
    if B > 1:
        mask[1, :3] = 0  # a left-padded row
    gen = dict(max_new_tokens=30, do_sample=False, repetition_penalty=1.3, attention_mask=mask, pad_token_id=0,
               cache_implementation=cache)
    ref = GenerationMixin.generate(target, ids, **gen)
    outs = [target.generate(ids, assistant_model=drafter, device_round=flag, return_dict_in_generate=True, **gen, **kw)
            for flag in (False, True)]
    for out in outs:
        assert torch.equal(out.sequences, ref)
    assert outs[0].acceptance_lengths == outs[1].acceptance_lengths  # the same trees, the same walks


def test_the_host_round_samples_the_exact_law():
    import test_sampling as ts

    cfg = ts.CONFIGS["penalty_topk_topp"]
    target, drafters = ts.setup(cfg["seed"])
    exact = ts.exact_distribution(target, cfg["procs"]())
    counts, accept, _ = ts.sample(target, ts.N_SPEC, seed=300, gen_kw=cfg["gen"],
                                  method_kw=dict(assistant_model=drafters["oracle"], tree_budget=8, device_round=False))
    assert chi_square_pvalue(counts, exact)[2] > ts.ALPHA
    assert max(accept) >= 3  # multi-node acceptances happen


class _DeviceMoves(torch.overrides.TorchFunctionMode):
    """Records every `Tensor.to(<device>)` / `Tensor.cuda()` that hf_ddtree's own code (outside `device.py`'s
    helpers) makes: on an accelerator each one from host memory waits for the device's queue."""

    def __init__(self):
        super().__init__()
        self.sites: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("to", "cuda") and (name == "cuda" or kwargs.get("device") is not None
                                        or any(isinstance(a, (torch.device, str)) for a in args[1:])):
            import sys

            frame = sys._getframe(1)  # the caller of .to()
            where = frame.f_code.co_filename.replace("\\", "/")
            if "/hf_ddtree/" in where and not where.endswith("/hf_ddtree/device.py"):
                self.sites.append(f"{where.split('/hf_ddtree/')[-1]}:{frame.f_lineno}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("kw", [dict(tree_budget=16), dict(method="dflash"), dict(method="ddtree-lookup", tree_budget=16)],
                         ids=["ddtree", "dflash", "ddtree-lookup"])
def test_no_blocking_host_to_device_copy_in_the_round(pair, B, kw):
    """The round's small host-made tensors (layout, drafter positions, committed tokens, lookup indices) reach the
    device through `device.to_device` / `host_tensor` (pinned + non_blocking on CUDA), never a plain `.to(device)`:
    on a GPU a pageable copy makes the host wait for everything queued. Seen on this CPU as the calls themselves."""
    target, drafter = pair
    torch.manual_seed(B)
    base = torch.randint(0, 60, (1, 6))
    ids = torch.cat([base, base, base], 1).expand(B, -1).clone()  # text that repeats: lookup finds candidates
    ids[:, -1] = torch.arange(B)
    with _DeviceMoves() as moves:
        out = target.generate(ids, assistant_model=drafter, max_new_tokens=32, do_sample=False, device_round=True,
                              return_dict_in_generate=True, **kw)
    acc = out.acceptance_lengths
    assert (len(acc) if B == 1 else max(len(a) for a in acc)) >= 4
    assert moves.sites == [], " ".join(sorted(set(moves.sites)))
