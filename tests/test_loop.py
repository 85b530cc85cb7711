"""The loop's interfaces: Round / proposer draft-build-observe, the budget policy applied by the loop to
any method (D2SD included), tree padding, the vectorised mask, and calibration timing the loop's own
functions."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import GenerationMixin

import hf_ddtree
from hf_ddtree import calibrate as calibration
from hf_ddtree import propose, verify
from hf_ddtree import cache as cache_mod
from hf_ddtree.cache import compact, make_cache, tree_attention_mask
from hf_ddtree.decoding import speculative_decoding
from hf_ddtree.propose import Round
from hf_ddtree.tree import Tree, ancestor_matrix, build_chain, build_tree, merge_paths, topk_per_position
from hf_ddtree.verify import run_tree

from conftest import CACHES, IMPLS, build_drafter, build_target

HIDDEN_IDX = [1, 2]


def old_visibility(tree: Tree) -> torch.Tensor:
    """The construction the loop used before (a Python loop over nodes): the reference."""
    n = tree.size
    vis = torch.zeros(n, n, dtype=torch.bool)
    parents = tree.parents.tolist()
    for i in range(n):
        if parents[i] >= 0:
            vis[i] = vis[parents[i]]
        vis[i, i] = True
    return vis


def old_mask(vis: torch.Tensor, past_len: int, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    n = vis.shape[0]
    mask = torch.full((1, 1, n, kv_len), torch.finfo(dtype).min, dtype=dtype)
    mask[..., :past_len] = 0
    mask[0, 0, :, past_len:past_len + n].masked_fill_(vis, 0)
    return mask


def random_tree(seed: int, budget: int, depth: int = 5, vocab: int = 40) -> Tree:
    g = torch.Generator().manual_seed(seed)
    lp, ids = topk_per_position(torch.log_softmax(torch.randn(depth, vocab, generator=g) * 2, -1), 4)
    return build_tree(3, lp, ids, budget)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vectorised_mask_equals_the_old_construction(seed, dtype):
    tree = random_tree(seed, budget=[0, 1, 5, 17, 40, 64][seed])
    vis = tree.visibility()
    assert torch.equal(vis, old_visibility(tree))
    past = 3 + seed
    for kv_len in (past + tree.size, past + tree.size + 7):  # dynamic width; static buffer with stale slots
        want = old_mask(old_visibility(tree), past, kv_len, dtype)
        assert torch.equal(tree_attention_mask(vis, past, kv_len, dtype, torch.device("cpu")), want)
        out = torch.empty_like(want).fill_(1.0)  # in place into a preallocated buffer
        got = tree_attention_mask(vis, past, kv_len, dtype, torch.device("cpu"), out=out)
        assert got is out and torch.equal(out, want)


def test_padding_nodes_see_only_themselves():
    tree = random_tree(1, budget=9)
    padded = tree.pad_to(16)
    assert padded.size == 16 and padded.pad == 16 - tree.size and padded.num_nodes == tree.num_nodes
    vis = padded.visibility()
    n = tree.size
    assert torch.equal(vis[:n, :n], tree.visibility())
    assert torch.equal(vis[n:], torch.eye(16, dtype=torch.bool)[n:])  # padding rows: itself only
    assert not vis[:n, n:].any()  # no real node sees padding
    mask = tree_attention_mask(vis, 4, 4 + 16 + 2, torch.float32, torch.device("cpu"), num_real=n)
    allowed = mask[0, 0] == 0
    assert allowed[:n, :4].all() and not allowed[n:, :4].any()  # padding does not read the cache
    assert torch.equal(allowed[n:, 4:20], torch.eye(16, dtype=torch.bool)[n:])
    # never walked: no padding node is anybody's child, whatever the target picks
    assert all(c < n for ch in padded.children for c in ch.values())
    scores = torch.zeros(16, 40)
    scores[:, int(padded.tokens[-1])] = 1.0  # the padding token everywhere
    path, _ = verify.walk(padded, scores, False)
    assert all(i < n for i in path)
    with pytest.raises(ValueError):
        padded.truncate(3)
    with pytest.raises(ValueError):
        tree.pad_to(tree.size - 1)


def test_ancestor_matrix_of_a_chain_is_lower_triangular():
    chain = build_chain(1, torch.arange(6))
    assert torch.equal(ancestor_matrix(chain.parents, 6), torch.ones(7, 7, dtype=torch.bool).tril())


@pytest.mark.parametrize("cache_kind", CACHES)
@pytest.mark.parametrize("impl", IMPLS)
def test_padded_verify_equals_unpadded_at_real_nodes(impl, cache_kind):
    target = build_target("qwen3", impl, seed=4)
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, 60, (1, 11), generator=g)
    past = prefix.shape[1] - 1
    tree = random_tree(3, budget=9, vocab=60)
    results = []
    with torch.no_grad():
        for t in (tree, tree.pad_to(17)):
            cache = make_cache(target, cache_kind, past + 1 + 17)
            target(input_ids=prefix[:, :past], position_ids=torch.arange(past)[None],
                   **hf_ddtree.compat.cache_kwargs(target, cache), use_cache=True)
            logits, feats = run_tree(target, t, cache, past, HIDDEN_IDX)
            assert logits.shape[0] == t.size and feats.shape[0] == t.size
            keep = torch.tensor([0, 1])
            compact(cache, past, keep)  # padding K/V is never kept
            assert int(cache.get_seq_length()) == past + 2
            results.append((logits, feats))
    n = tree.size
    torch.testing.assert_close(results[1][0][:n], results[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(results[1][1][:n], results[0][1], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# the loop: observe hooks, the policy on any method, padding end to end
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    target = build_target("qwen3", "sdpa", seed=0, logit_scale=6.0)
    return target, build_drafter(target, seed=1), build_drafter(target, seed=2)


def run_loop(target, ids, max_new_tokens=24, **loop_kwargs):
    fn = functools.partial(speculative_decoding, **loop_kwargs)
    return GenerationMixin.generate(target, ids, custom_generate=fn, do_sample=False, max_new_tokens=max_new_tokens,
                                    return_dict_in_generate=True)


class HalfPolicy:
    """A budget policy that keeps half the tree and records what the loop tells it."""

    def __init__(self):
        self.sizes, self.observed = [], []

    def __call__(self, tree: Tree) -> int:
        self.sizes.append(tree.num_nodes)
        return tree.num_nodes // 2

    def observe(self, accepted: list[int]) -> None:
        self.observed.append(list(accepted))


@pytest.mark.parametrize("method", ["ddtree", "d2sd", "d2sd-tree"])
def test_the_loop_applies_the_policy_to_any_method_and_observes_once_per_round(pair, method, monkeypatch):
    target, d1, d2 = pair
    ids = torch.randint(0, 60, (1, 9), generator=torch.Generator().manual_seed(5))
    ref = target.generate(ids, do_sample=False, max_new_tokens=24)
    seen = []
    monkeypatch.setattr(propose.Proposer, "observe", lambda self, accepted: seen.append(list(accepted)))
    policy = HalfPolicy()
    extra = dict(drafter2=d2) if method != "ddtree" else {}
    out = run_loop(target, ids, drafter=d1, method=method, tree_budget=12, budget_policy=policy, **extra)
    assert torch.equal(out.sequences, ref)  # greedy identity with the cut trees
    rounds = len(out.stats.acceptance_lengths)
    assert len(policy.observed) == rounds and seen == policy.observed  # once per round, proposer and policy
    assert all(len(a) == 1 for a in seen)  # one entry per row
    # accepted draft tokens = committed - 1 (the bonus), except a round cut short by max_new_tokens
    assert [a[0] + 1 for a in seen][:-1] == out.stats.acceptance_lengths[:-1]
    drafted = [n for n in policy.sizes]
    assert drafted and out.stats.tree_sizes[:len(drafted)] == [n // 2 for n in drafted]


@pytest.mark.parametrize("method", ["ddtree", "dflash", "auto"])
def test_padded_trees_decode_identically(pair, method):
    target, d1, _ = pair
    ids = torch.randint(0, 60, (1, 7), generator=torch.Generator().manual_seed(8))
    ref = target.generate(ids, do_sample=False, max_new_tokens=20)
    kw = dict(budget_policy=HalfPolicy()) if method == "auto" else {}
    for cache_kind in CACHES:
        target.generation_config.cache_implementation = cache_kind
        try:
            out = run_loop(target, ids, 20, drafter=d1, method=method, tree_budget=10, pad_tree=True, **kw)
        finally:
            target.generation_config.cache_implementation = None
        assert torch.equal(out.sequences, ref), cache_kind


def test_timing_is_booked_by_the_loop(pair):
    target, d1, _ = pair
    ids = torch.randint(0, 60, (1, 7), generator=torch.Generator().manual_seed(3))
    out = run_loop(target, ids, 12, drafter=d1, method="ddtree", tree_budget=8, collect_timing=True)
    s = out.stats
    assert s.prefill_s > 0 and s.draft_s > 0 and s.tree_s > 0 and s.verify_s > 0 and s.commit_s > 0
    off = run_loop(target, ids, 12, drafter=d1, method="ddtree", tree_budget=8)
    assert off.stats.draft_s == off.stats.verify_s == 0.0


def test_round_carries_rows():
    r = Round(torch.tensor([[4, 5, 6]]), torch.zeros(1, 2, 8), torch.tensor([2]), 3)
    assert r.roots.tolist() == [6] and r.text(0).tolist() == [4, 5, 6] and r.lengths() == [2] and r.past == [2]
    assert r.text_list(0) == [4, 5, 6]  # no host copy given: read from the ids
    # ragged rows: right-aligned ids (row 1 has one real token before its root), per-row context lengths
    two = Round(torch.tensor([[4, 5, 8], [0, 6, 7]]), torch.zeros(2, 3, 8), torch.tensor([2, 1]), 3,
                torch.tensor([3, 1]))
    assert two.roots.tolist() == [8, 7] and two.rows == 2
    assert two.text(0).tolist() == [4, 5, 8] and two.text(1).tolist() == [6, 7]
    assert two.lengths() == [3, 1]
    hosted = Round(two.ids, two.context, [2, 1], 3, [3, 1], host_text=[[4, 5, 8], [6, 7]])
    assert hosted.text_list(1) == [6, 7] == hosted.text(1).tolist()


def test_merged_d2sd_trees_are_cut_prefix_closed():
    """What lets the loop truncate D2SD trees: merge_paths pops parents first, scores non-increasing."""
    paths = [([1, 2, 3], [-0.1, -0.5, -0.2]), ([1, 4], [-0.1, -0.3]), ([5, 6, 7], [-1.0, -0.1, -0.1])]
    tree = merge_paths(0, paths, 8)
    for k in range(tree.num_nodes + 1):
        cut = tree.truncate(k)
        assert all(0 <= p < i for i, p in enumerate(cut.parents.tolist()) if i)
    assert tree.scores[1:] == sorted(tree.scores[1:], reverse=True)


# ------------------------------------------------------------------------------------------------
# calibration runs the loop's own functions
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["auto", "d2sd-tree"])
def test_calibration_times_the_loops_own_calls(pair, method, monkeypatch, tmp_path):
    target, d1, d2 = pair
    monkeypatch.setenv("HF_DDTREE_CACHE", str(tmp_path))
    counts = {"draft": 0, "build": 0, "verify_tree": 0, "compact": 0, "move_paths": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    cls = propose.D2SDProposer if method == "d2sd-tree" else propose.DFlashProposer
    monkeypatch.setattr(cls, "draft", counting("draft", cls.draft))
    monkeypatch.setattr(cls, "build", counting("build", cls.build))
    monkeypatch.setattr(verify, "verify_tree", counting("verify_tree", verify.verify_tree))
    monkeypatch.setattr(cache_mod, "compact", counting("compact", cache_mod.compact))
    monkeypatch.setattr(cache_mod, "move_paths", counting("move_paths", cache_mod.move_paths))
    ns, reps, warmup = [0, 4, 8], 2, 1
    m = calibration.measure_latency(target, d1, 8, ns=ns, reps=reps, warmup=warmup, past_len=32, progress=False,
                                    method=method, drafter2=d2 if method != "auto" else None)
    rounds = reps + warmup
    assert counts["verify_tree"] == rounds * len(ns)
    # keep the path as the loop does (move_paths + set_lengths), then back to past_len (compact)
    assert counts["move_paths"] == counts["compact"] == rounds * len(ns)
    assert counts["build"] == rounds and counts["draft"] == 2 * rounds  # one untimed priming draft each
    assert m["t_draft"] > 0 and len(m["times"]) == len(ns)


def test_calibration_key_holds_the_code_version(pair, monkeypatch):
    target, d1, d2 = pair
    key = calibration.calibration_key(target, d1, 16)
    assert key["hf_ddtree"] == f"{hf_ddtree.__version__}+calibration{calibration.CALIBRATION_FORMAT}"
    from hf_ddtree import _version

    monkeypatch.setattr(_version, "__version__", "99.0")  # where the package (and calibrate) read it
    assert calibration.calibration_key(target, d1, 16) != key
    monkeypatch.undo()
    monkeypatch.setattr(calibration, "CALIBRATION_FORMAT", calibration.CALIBRATION_FORMAT + 1)
    assert calibration.calibration_key(target, d1, 16) != key
    monkeypatch.undo()
    assert calibration.calibration_key(target, d1, 16, method="d2sd", drafter2=d2) != key
