"""Lookup-augmented DDTree (method "ddtree-lookup"): the n-gram index against brute force, the
acceptance calibrator, the merged tree, the proposer, and end-to-end losslessness (greedy
token-identical to stock, sampling distributed exactly like stock), plus a repetitive prompt,
taken from the target's own greedy output, on which lookup must beat plain DDTree.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import hf_ddtree
from hf_ddtree import budget as budget_mod
from hf_ddtree import calibrate as calibrate_mod
from hf_ddtree.drafter import DrafterSpec
from hf_ddtree.lookup import (Candidate, LookupCalibrator, LookupIndex, _SCAN_FACTOR, candidate_paths,
                              lookup_tree)
from hf_ddtree.propose import LookupProposer, Round
from hf_ddtree.tree import build_tree, merge_paths, topk_per_position, tree_paths

import test_sampling as ts
from conftest import build_drafter, build_target
from test_d2sd import StubState, check_merge, node_paths
from test_lossless import check_stats, setup as lossless_setup, stock

torch.set_num_threads(1)

# ------------------------------------------------------------------------------------------------
# 1. the n-gram index against brute force
# ------------------------------------------------------------------------------------------------


def brute_candidates(text: list[int], depth: int, k: int, n_max: int, n_min: int) -> list[tuple[tuple[int, ...], int]]:
    """The spec, by rescanning the text: for n from long to short, the earlier occurrences of the
    last n tokens (most recent first, at most _SCAN_FACTOR * k looked at per n), each giving the
    tokens after it; a continuation that is a prefix of one already taken is skipped, one that
    extends a taken one replaces it."""
    L = len(text)
    out: list[tuple[tuple[int, ...], int]] = []
    if depth <= 0 or k <= 0 or L < 2:
        return out
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        suffix = text[L - n:]
        scanned = 0
        for i in range(L - 2, n - 2, -1):  # i = end of an earlier occurrence; i < L - 1
            if text[i - n + 1:i + 1] != suffix:
                continue
            scanned += 1
            cont = tuple(text[i + 1:i + 1 + depth])
            prefix_of = [j for j, (t, _) in enumerate(out) if t[:len(cont)] == cont]
            extends = [j for j, (t, _) in enumerate(out) if cont[:len(t)] == t]
            if prefix_of:
                pass
            elif extends:
                out[extends[0]] = (cont, out[extends[0]][1])
            else:
                out.append((cont, n))
                if len(out) >= k:
                    return out
            if scanned >= _SCAN_FACTOR * k:
                break
    return out


@pytest.mark.parametrize("n_max,n_min,k", [(4, 1, 4), (3, 2, 2), (1, 1, 1), (5, 1, 8)])
def test_index_matches_brute_force(n_max, n_min, k):
    rng = random.Random(n_max * 100 + n_min * 10 + k)
    for trial in range(60):
        vocab = rng.choice([2, 3, 5, 12])
        index = LookupIndex(n_max, n_min, k)
        text: list[int] = []
        while len(text) < 40:
            chunk = [rng.randrange(vocab) for _ in range(rng.randint(1, 5))]
            if rng.random() < 0.3 and len(text) > 4:  # copy an earlier stretch: long matches happen
                s = rng.randrange(len(text) - 3)
                chunk = text[s:s + rng.randint(2, 6)]
            text += chunk
            index.extend(chunk)
            assert index.text == text
            for depth in (0, 1, 3, 7):
                got = [(c.tokens, c.match_len) for c in index.candidates(depth)]
                assert got == brute_candidates(text, depth, k, n_max, n_min), (text, depth)
                assert [c.rank for c in index.candidates(depth)] == list(range(len(got)))
                assert all(1 <= len(t) <= depth for t, _ in got)


def test_index_examples_and_sync():
    idx = LookupIndex(max_ngram=3, min_ngram=1, num_candidates=3)
    idx.extend([1, 2, 3, 4, 1, 2, 3, 5, 1, 2])
    c = idx.candidates(4)
    # suffix (1, 2) matches at 0-1 and 4-5 (3-gram (5, 1, 2) has no earlier occurrence): most recent first
    assert [(x.tokens, x.match_len) for x in c] == [((3, 5, 1, 2), 2), ((3, 4, 1, 2), 2)]
    # periodic text: the continuation runs into the suffix itself; longer (earlier) ones replace the
    # short recent ones they extend
    idx = LookupIndex(2, 1, 2)
    idx.extend([7, 7, 7])
    assert [(x.tokens, x.match_len) for x in idx.candidates(5)] == [((7, 7), 2)]
    idx = LookupIndex(2, 2, 4)
    idx.extend([7, 7, 7, 7, 7])
    assert [x.tokens for x in idx.candidates(5)] == [(7, 7, 7)]
    assert [x.tokens for x in idx.candidates(2)] == [(7, 7)]
    # sync: extends when the ids extend the text, restarts on a different sequence
    idx = LookupIndex(2, 1, 2)
    idx.sync([1, 2, 3])
    idx.sync([1, 2, 3, 1])
    assert idx.text == [1, 2, 3, 1] and [x.tokens for x in idx.candidates(3)] == [(2, 3, 1)]
    idx.sync([9, 8])
    assert idx.text == [9, 8] and idx.candidates(3) == []
    with pytest.raises(ValueError):
        LookupIndex(2, 3)
    with pytest.raises(ValueError):
        LookupIndex(2, 1, 0)


# ------------------------------------------------------------------------------------------------
# 2. calibration
# ------------------------------------------------------------------------------------------------


def test_calibrator_counts_and_converges():
    cal = LookupCalibrator(max_ngram=4, prior_weight=4.0, decay=1.0)
    c0 = Candidate((5, 6, 7), 3, 0)
    c1 = Candidate((5, 9), 3, 1)
    assert cal.rate(c0, True) == pytest.approx(0.3) and cal.rate(c0, False) == pytest.approx(0.6)
    assert cal.rate(c1, True) == pytest.approx(0.15)
    # committed [5, 6, 8]: c0 right at 1 and 2, wrong at 3; c1 right at 1, wrong at 2
    cal.observe([c0, c1], [5, 6, 8])
    assert cal.acc[(3, False, True)] == pytest.approx(0.3 * 4 + 1) and cal.prop[(3, False, True)] == pytest.approx(5)
    assert cal.acc[(3, False, False)] == pytest.approx(0.6 * 4 + 1) and cal.prop[(3, False, False)] == pytest.approx(6)
    assert cal.acc[(3, True, True)] == pytest.approx(0.15 * 4 + 1)
    assert cal.acc[(3, True, False)] == pytest.approx(0.3 * 4) and cal.prop[(3, True, False)] == pytest.approx(5)
    # only what the round shows counts: committed [5] says nothing about token 2
    before = dict(cal.prop)
    cal.observe([c0], [5])
    assert cal.prop[(3, False, False)] == before[(3, False, False)]
    # a cell that is always right converges to 1 (capped), one that is always wrong to the floor
    cal = LookupCalibrator(decay=0.9)
    for _ in range(300):
        cal.observe([Candidate((1, 2), 2, 0), Candidate((3,), 2, 1)], [1, 2, 4])
    assert cal.rate(Candidate((1,), 2, 0), True) == pytest.approx(cal.ceil)
    assert cal.rate(Candidate((1,), 2, 1), True) == pytest.approx(cal.floor)
    logc = cal.token_logprobs(Candidate((1, 2, 3), 2, 0))
    assert len(logc) == 3 and all(x <= 0 for x in logc)


# ------------------------------------------------------------------------------------------------
# 3. the merged tree
# ------------------------------------------------------------------------------------------------


def random_top(seed: int, depth: int, vocab: int, width: int):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(depth, vocab, generator=g) * 2, dim=-1)
    return lp, topk_per_position(lp, width)


@pytest.mark.parametrize("seed", range(8))
def test_lookup_tree_merges_under_one_budget(seed):
    rng = random.Random(seed)
    D, V, root = 6, 10, 3
    lp, (top_lp, top_ids) = random_top(seed, D, V, 64)
    for budget in (0, 1, 4, 16, 64):
        cands = [Candidate(tuple(rng.randrange(V) for _ in range(rng.randint(1, D))), rng.randint(1, 4), r)
                 for r in range(rng.randint(0, 4))]
        logq = [[float(lp[d, t]) for d, t in enumerate(c.tokens)] for c in cands]
        logc = [[math.log(rng.uniform(0.05, 0.99))] * len(c.tokens) for c in cands]
        paths = candidate_paths(cands, logq, logc)
        for (toks, incs), q, c in zip(paths, logq, logc):
            assert incs == [max(a, b) for a, b in zip(q, c)]
        tree = lookup_tree(root, top_lp, top_ids, paths, budget)
        base = build_tree(root, top_lp, top_ids, budget)
        if not cands:
            assert node_paths(tree) == node_paths(base)
            continue
        # exactly the budget best nodes of (the drafter's budget-best tree + the lookup paths), prefix-closed
        all_paths = tree_paths(base) + paths
        check_merge(root, all_paths, budget)
        want = merge_paths(root, all_paths, budget)
        assert node_paths(tree) == node_paths(want) and tree.scores == pytest.approx(want.scores)
        assert tree.num_nodes <= budget
        # a truncation (CaDDTree's cut) keeps a prefix-closed best-first tree
        for k in range(tree.num_nodes + 1):
            cut = tree.truncate(k)
            assert all(0 <= p < i for i, p in enumerate(cut.parents.tolist()) if i)


def test_confident_lookup_displaces_drafter_nodes():
    lp, (top_lp, top_ids) = random_top(0, 5, 10, 16)
    root = 1
    worst = [int(torch.argmin(lp[d])) for d in range(5)]  # the drafter's least likely tokens
    paths = candidate_paths([Candidate(tuple(worst), 4, 0)], [[float(lp[d, t]) for d, t in enumerate(worst)]],
                            [[math.log(0.99)] * 5])
    tree = lookup_tree(root, top_lp, top_ids, paths, 6)
    assert tuple(worst) in node_paths(tree)  # the whole lookup path made it in ...
    assert len(set(node_paths(tree)) & set(node_paths(build_tree(root, top_lp, top_ids, 6)))) == 1  # ... at the cost of 5 drafter nodes
    assert tree.scores[1:] == sorted(tree.scores[1:], reverse=True)
    # an unlikely lookup path stays out
    low = candidate_paths([Candidate(tuple(worst), 1, 0)], [[float(lp[d, t]) for d, t in enumerate(worst)]],
                          [[math.log(1e-4)] * 5])
    assert node_paths(lookup_tree(root, top_lp, top_ids, low, 6)) == node_paths(build_tree(root, top_lp, top_ids, 6))


# ------------------------------------------------------------------------------------------------
# 4. the proposer (stub drafter, no model)
# ------------------------------------------------------------------------------------------------


def test_proposer_builds_the_merged_tree_and_calibrates():
    V, D = 20, 7
    spec = DrafterSpec(8, 19, (0, 1))
    state = StubState(spec, V, 3)
    prop = LookupProposer(state, 16)
    text = [4, 5, 6, 7, 8, 4, 5]
    ids = torch.tensor([text])
    [tree] = prop.propose(Round(ids, None, torch.tensor([len(text) - 1]), D))
    lp = state.out[0][0, :D]
    cands = prop.rows[0].pending
    assert cands == [Candidate((6, 7, 8, 4, 5), 2, 0)]  # (4, 5) occurred before; (8, 4, 5) did not
    cal = LookupCalibrator()
    paths = candidate_paths(cands, [[float(lp[d, t]) for d, t in enumerate(c.tokens)] for c in cands],
                            [cal.token_logprobs(c) for c in cands])
    top_lp, top_ids = topk_per_position(lp, 16)
    want = lookup_tree(5, top_lp, top_ids, paths, 16)
    assert node_paths(tree) == node_paths(want) and tree.scores == pytest.approx(want.scores)
    # next round: 3 tokens committed (6, 7, 9); the first candidate was right twice, then wrong
    first = cands[0]
    assert first.tokens[:2] == (6, 7)
    ids = torch.tensor([text + [6, 7, 9]])
    prop.propose(Round(ids, None, torch.tensor([ids.shape[1] - 1]), D))
    key = prop.calibrator._key(first, True)
    assert prop.calibrator.prop[key] == pytest.approx(0.99 * 4 + 1)
    assert prop.index.text == text + [6, 7, 9]


def test_lookup_candidates_reach_past_the_drafters_block():
    """Lookup paths may be deeper than the drafter's block (up to Round.max_depth and the proposer's cap);
    past the block a token is scored by its calibrated lookup rate alone."""
    V, D = 20, 3
    text = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2]  # (1, 2) recurs: the candidate is 3, 4, 5, ... 9, 1, 2
    ids = torch.tensor([text])
    for max_depth, cap, want in ((10, 16, 9), (10, 5, 5), (2, 16, 3), (None, 16, 3)):
        state = StubState(DrafterSpec(D + 1, 19, (0, 1)), V, 5)
        prop = LookupProposer(state, 400, max_depth=cap)
        [tree] = prop.propose(Round(ids, None, torch.tensor([len(text) - 1]), D, max_depth=max_depth))
        cand = prop.rows[0].pending[0]
        assert len(cand.tokens) == want and cand.tokens[:3] == (3, 4, 5), (max_depth, cap, cand)
        assert int(tree.depths.max()) == want  # the whole candidate is in the tree (400 nodes are plenty)
        lp = state.out[0][0, :D]
        node, score = 0, 0.0
        logc = prop.calibrator.token_logprobs(cand)
        for d, t in enumerate(cand.tokens):
            node = tree.children[node][t]
            q = float(lp[d, t]) if d < D else float("-inf")
            score += max(q, logc[d])
            assert tree.scores[node] == pytest.approx(score)


def test_lookup_proposer_keeps_one_index_per_row():
    """A batch: each row's lookup candidates come from its own text (right-aligned ids, ragged lengths), and
    select() keeps the surviving rows' indexes."""
    V, D = 20, 5
    state = StubState(DrafterSpec(8, 19, (0, 1)), V, 4)
    prop = LookupProposer(state, 16)
    a = [4, 5, 6, 7, 8, 4, 5]  # (4, 5) recurs: candidate (6, 7, 8, ...)
    b = [9, 10, 11, 9, 10]  # (9, 10) recurs: candidate (11, 9, 10)
    ids = torch.tensor([a, [0, 0] + b])  # row 1 is shorter: left-filled
    prop.propose(Round(ids, None, torch.tensor([len(a) - 1, len(b) - 1]), D))
    assert prop.rows[0].index.text == a and prop.rows[1].index.text == b
    assert prop.rows[0].pending[0].tokens[:3] == (6, 7, 8) and prop.rows[1].pending[0].tokens[:1] == (11,)
    prop.select([1])
    assert len(prop.rows) == 1 and prop.index.text == b


# ------------------------------------------------------------------------------------------------
# 5. end to end: greedy, CaDDTree, sampling, and a repetitive prompt
# ------------------------------------------------------------------------------------------------

BUDGETS = (0, 1, 4, 16, 64)


@pytest.mark.parametrize("cache", ("static", "dynamic"))
@pytest.mark.parametrize("arch", ("qwen3", "llama"))
def test_greedy_is_token_identical(arch, cache):
    s = lossless_setup(arch, "sdpa")
    P = s.prompt.shape[1]
    for dname, drafter in s.drafters.items():
        for b in BUDGETS:
            for eos in (False, True):
                extra = dict(eos_token_id=s.eos, pad_token_id=s.eos) if eos else {}
                out = s.target.generate(s.prompt, assistant_model=drafter, method="ddtree-lookup", tree_budget=b,
                                        do_sample=False, cache_implementation=cache, max_new_tokens=24,
                                        return_dict_in_generate=True, **extra)
                expect = s.ref_eos if eos else s.ref
                assert torch.equal(out.sequences, expect), (dname, b, eos)
                check_stats(out, P, b)


def calibrated_as(monkeypatch, tmp_path, lat):
    """CaDDTree's calibration replaced by the latency model `lat` (an empty disk cache around it)."""
    monkeypatch.setenv("HF_DDTREE_CACHE", str(tmp_path / "hfdd"))
    calibrate_mod.clear_memory_cache()
    monkeypatch.setattr(calibrate_mod, "calibrate", lambda *a, **k: lat)
    yield lat
    calibrate_mod.clear_memory_cache()


@pytest.fixture
def fake_latency(monkeypatch, tmp_path):
    yield from calibrated_as(monkeypatch, tmp_path,
                             budget_mod.LatencyModel.from_points([0, 8, 64], [1.0, 1.3, 4.0], t_draft=0.2))


def test_caddtree_lookup_is_lossless(fake_latency):
    s = lossless_setup("qwen3", "sdpa")
    for drafter in s.drafters.values():
        out = s.target.generate(s.prompt, assistant_model=drafter, method="ddtree-lookup", tree_budget="auto",
                                max_tree_budget=32, do_sample=False, max_new_tokens=24, return_dict_in_generate=True)
        assert torch.equal(out.sequences, s.ref)
        check_stats(out, s.prompt.shape[1], 32)


def test_bad_arguments():
    s = lossless_setup("qwen3", "sdpa")
    for bad in (-1, 1.5, "x", True):
        with pytest.raises(ValueError, match="tree_budget"):
            s.target.generate(s.prompt, assistant_model=s.drafters["random"], method="ddtree-lookup", tree_budget=bad,
                              max_new_tokens=4)


def test_sampling_matches_exact_distribution():
    cfg = ts.CONFIGS["penalty_topk_topp"]
    target, drafters = ts.setup(cfg["seed"])
    exact = ts.exact_distribution(target, cfg["procs"]())
    wrong = ts.exact_distribution(target, cfg["wrong"]())
    for i, (dname, b) in enumerate((("oracle", 8), ("random", 16))):
        counts, accept, _ = ts.sample(target, ts.N_SPEC, seed=300 + i, gen_kw=cfg["gen"],
                                      method_kw=dict(assistant_model=drafters[dname], method="ddtree-lookup", tree_budget=b))
        stat, df, p = ts.chi_square_pvalue(counts, exact)
        assert p > ts.ALPHA, f"{dname}: chi2={stat:.1f} df={df} p={p:.2e}"
        assert ts.chi_square_pvalue(counts, wrong)[2] < ts.ALPHA  # the test has power on these samples
        assert sum(accept) == ts.N_SPEC * (ts.NEW - 1)


def repetitive_case():
    """A prompt whose greedy continuation repeats text seen before: the target's own greedy output
    (tiny random targets fall into loops), cut where the next 24 tokens are mostly predictable from a
    2-gram lookup over the text before them. Returns (target, prompt, stock continuation)."""
    target = build_target("qwen3", "sdpa", seed=1)
    seed_prompt = torch.randint(0, 63, (1, 7), generator=torch.Generator().manual_seed(4))
    full = stock(target, seed_prompt, max_new_tokens=80)[0].tolist()
    for cut in range(12, len(full) - 24):
        text, hits = full[:cut], 0
        for tok in full[cut:cut + 24]:
            c = brute_candidates(text, 1, 1, 2, 2)
            hits += bool(c) and c[0][0][0] == tok
            text = text + [tok]
        if hits >= 16:  # two thirds of the continuation repeats earlier text
            prompt = torch.tensor([full[:cut]])
            return target, prompt, stock(target, prompt, max_new_tokens=24)
    raise AssertionError(f"the target's greedy output does not repeat itself: {full}")


@pytest.fixture
def costly_drafter(monkeypatch, tmp_path):
    """A latency model where the drafter forward costs 4 verifies: CaDDTree then skips it where it does not pay."""
    yield from calibrated_as(monkeypatch, tmp_path,
                             budget_mod.LatencyModel.from_points([0, 8, 64], [1.0, 1.1, 2.0], t_draft=4.0))


def test_caddtree_lookup_skips_the_drafter_where_it_does_not_pay(costly_drafter):
    """Rounds of the lookup tree alone (no drafter forward) on repeated text, of the root alone elsewhere, a
    drafted round at least every `explore_every` rounds; the output is stock's either way."""
    target, prompt, ref = repetitive_case()
    hf_ddtree.enable(target)
    drafter = build_drafter(target, seed=2)
    calls = []
    handle = drafter.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        out = target.generate(prompt, assistant_model=drafter, method="ddtree-lookup", tree_budget="auto",
                              max_tree_budget=16, do_sample=False, max_new_tokens=24, return_dict_in_generate=True)
    finally:
        handle.remove()
    assert torch.equal(out.sequences, ref)
    kinds = out.stats.round_kinds
    assert len(kinds) == len(out.acceptance_lengths)
    assert kinds[0] == "draft" and "lookup" in kinds and len(calls) == kinds.count("draft")
    runs = "".join(k[0] for k in kinds).split("d")
    assert len(runs[1]) < 8  # explore_every: the first exploratory draft within 8 rounds (later ones back off)
    for kind, acc, size in zip(kinds, out.acceptance_lengths, out.stats.tree_sizes):
        if kind == "root":
            assert acc == 1 and size == 0
    # where drafting pays (a cheap drafter), the plan keeps drafting
    costly_drafter.t_draft = 0.0
    costly_drafter._totals.clear()
    out = target.generate(prompt, assistant_model=build_drafter(target, seed=2), method="ddtree-lookup",
                          tree_budget="auto", max_tree_budget=16, do_sample=False, max_new_tokens=24,
                          return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)


def test_caddtree_lookup_round_kinds_keep_the_sampling_law(costly_drafter):
    cfg = ts.CONFIGS["penalty_topk_topp"]
    target, drafters = ts.setup(cfg["seed"])
    exact = ts.exact_distribution(target, cfg["procs"]())
    counts, accept, _ = ts.sample(target, ts.N_SPEC, seed=321, gen_kw=cfg["gen"],
                                  method_kw=dict(assistant_model=drafters["oracle"], method="ddtree-lookup",
                                                 tree_budget="auto", max_tree_budget=8))
    stat, df, p = ts.chi_square_pvalue(counts, exact)
    assert p > ts.ALPHA, f"chi2={stat:.1f} df={df} p={p:.2e}"


def test_lookup_wins_on_a_repetitive_prompt():
    target, prompt, ref = repetitive_case()
    hf_ddtree.enable(target)
    drafter = build_drafter(target, seed=2)
    for b in (4, 16):
        acc = {}
        for method in ("ddtree", "ddtree-lookup"):
            out = target.generate(prompt, assistant_model=drafter, method=method, tree_budget=b, do_sample=False,
                                  max_new_tokens=24, return_dict_in_generate=True)
            assert torch.equal(out.sequences, ref), method
            acc[method] = out.stats.mean_acceptance_length
        assert acc["ddtree-lookup"] > acc["ddtree"] + 0.5, acc
