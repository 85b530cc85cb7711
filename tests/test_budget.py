"""CaDDTree budget selection: convex latency fit, the greedy stopping rule, calibration cache, policy."""

import json
import math
import random

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import hf_ddtree
from hf_ddtree import DFlashDraftModel, budget, make_drafter_config
from hf_ddtree import calibrate as calibration
from hf_ddtree.calibrate import caddtree_policy, calibrate
from hf_ddtree.budget import (
    LatencyModel,
    choose_budget,
    exhaustive_best_budget,
    fit_convex_nondecreasing,
    throughput_curve,
)
from hf_ddtree.tree import build_tree, topk_per_position

SMALL = dict(ns=[0, 4, 32], reps=1, warmup=1)  # a fast calibration for the tiny models


def is_convex_nondecreasing(xs, ys, tol=1e-12):
    slopes = [(ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) for i in range(len(xs) - 1)]
    return all(s >= -tol for s in slopes) and all(b >= a - tol for a, b in zip(slopes, slopes[1:]))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own empty on-disk calibration cache and a clean in-process memo."""
    monkeypatch.setenv("HF_DDTREE_CACHE", str(tmp_path / "hfdd"))
    calibration.clear_memory_cache()
    yield
    calibration.clear_memory_cache()


@pytest.fixture(scope="module")
def tiny_pair():
    # one intra-op thread: on a shared, oversubscribed CPU two spinning OpenMP threads make these
    # tiny forwards 10-30x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=False)
    target = Qwen3ForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    dcfg = make_drafter_config(target.config, num_hidden_layers=1, block_size=8, mask_token_id=255,
                               target_layer_ids=[1, 2])
    drafter = DFlashDraftModel(dcfg).eval()
    yield target, drafter
    torch.set_num_threads(threads)


def _no_timing(*args, **kwargs):
    raise AssertionError("measure_latency was called: the calibration should have come from the cache")


# ------------------------------------------------------------------------------------------------
# convex fit
# ------------------------------------------------------------------------------------------------

def test_fit_interpolates_convex_input_exactly():
    ns = calibration.default_sizes(256)
    assert ns == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256]
    ts = [2.0 + 0.01 * n + 1e-4 * n * n for n in ns]
    kx, ky = fit_convex_nondecreasing(ns, ts)
    assert kx == [float(n) for n in ns]
    assert ky == pytest.approx(ts, rel=1e-12, abs=1e-12)
    lat = LatencyModel.from_points(ns, ts, t_draft=0.5)
    for n, t in zip(ns, ts):
        assert lat.verify_time(n) == pytest.approx(t, rel=1e-12)
        assert lat.total_time(n) == pytest.approx(t + 0.5, rel=1e-12)
    # piecewise linear between knots, linear extrapolation past the last one
    assert lat.verify_time(48) == pytest.approx((ts[6] + ts[7]) / 2)
    slope = (ts[-1] - ts[-2]) / 128
    assert lat.verify_time(300) == pytest.approx(ts[-1] + 44 * slope)
    # a straight line (flat, too) is convex: unchanged
    assert fit_convex_nondecreasing([0, 10, 20], [1.0, 1.0, 1.0])[1] == [1.0, 1.0, 1.0]
    assert fit_convex_nondecreasing([0, 10, 20], [1.0, 2.0, 3.0])[1] == pytest.approx([1.0, 2.0, 3.0])


@pytest.mark.parametrize("seed", range(25))
def test_fit_projects_noisy_points_to_convex_nondecreasing(seed):
    rng = random.Random(seed)
    ns = sorted(rng.sample(range(0, 513), rng.randint(2, 14)))
    ts = [1.0 + 0.003 * n + 2e-6 * n * n + rng.gauss(0, 0.05) for n in ns]
    if seed % 5 == 0:
        ns = ns + ns[:3]  # repeated sizes are averaged
        ts = ts + [t + rng.gauss(0, 0.05) for t in ts[:3]]
    kx, ky = fit_convex_nondecreasing(ns, ts)
    assert kx == sorted(set(float(n) for n in ns))
    assert is_convex_nondecreasing(kx, ky, tol=1e-12)
    lat = LatencyModel.from_points(ns, ts)
    T = lat.totals(600)
    assert all(b >= a - 1e-12 for a, b in zip(T, T[1:]))
    assert all(T[n + 1] - T[n] >= T[n] - T[n - 1] - 1e-12 for n in range(1, 600))


def test_fit_of_known_shapes():
    # decreasing data: the best non-decreasing fit is flat at the mean
    kx, ky = fit_convex_nondecreasing([0, 1, 2, 3], [4.0, 3.0, 2.0, 1.0])
    assert ky == pytest.approx([2.5] * 4)
    # a concave bump is replaced by the chord of its end points (and shifted by the LS offset)
    kx, ky = fit_convex_nondecreasing([0, 1, 2], [0.0, 2.0, 2.0])
    assert is_convex_nondecreasing(kx, ky)
    assert ky[1] - ky[0] == pytest.approx(ky[2] - ky[1])
    assert sum(ky) == pytest.approx(4.0)  # the offset keeps the mean residual at zero
    # one point: a constant
    assert fit_convex_nondecreasing([5], [0.3]) == ([5.0], [0.3])
    with pytest.raises(ValueError):
        fit_convex_nondecreasing([0, 1], [1.0, float("nan")])


def test_latency_model_validation_and_dict_roundtrip():
    with pytest.raises(ValueError, match="T\\(0\\)"):
        LatencyModel.from_points([0, 8], [0.0, 1.0])  # a zero-cost round would make F(0) infinite
    lat = LatencyModel.from_points([0, 8], [0.0, 1.0], t_draft=0.25)  # t_draft makes T(0) > 0
    assert lat.total_time(0) == 0.25
    with pytest.raises(ValueError, match="convex"):
        LatencyModel([0, 1, 2], [0.0, 2.0, 2.0], 1.0)
    back = LatencyModel.from_dict(json.loads(json.dumps(lat.to_dict())))
    assert back.knots_n == lat.knots_n and back.knots_t == lat.knots_t and back.t_draft == lat.t_draft


# ------------------------------------------------------------------------------------------------
# stopping rule
# ------------------------------------------------------------------------------------------------

def _random_probs(rng, n):
    """Non-increasing path probabilities in (0, 1] of a few shapes."""
    kind = rng.randrange(4)
    if kind == 0:  # best-first tree surrogate: products of per-depth probabilities
        lp = torch.log_softmax(torch.randn(rng.randint(1, 12), 64, generator=torch.Generator().manual_seed(rng.randrange(10**6))) * rng.uniform(0.5, 6), -1)
        top_lp, top_ids = topk_per_position(lp, n)
        tree = build_tree(0, top_lp, top_ids, n)
        return [math.exp(s) for s in tree.scores[1:]]
    if kind == 1:
        return sorted((rng.random() for _ in range(n)), reverse=True)
    if kind == 2:  # geometric decay
        r = rng.uniform(0.5, 0.999)
        return sorted((rng.uniform(0.3, 1.0) * r ** i for i in range(n)), reverse=True)
    return sorted((rng.random() ** rng.uniform(1, 20) for _ in range(n)), reverse=True)


def _random_convex_latency(rng, cap):
    kind = rng.randrange(3)
    if kind == 0:  # a calibrated-looking model: noisy measurements through the convex fit
        ns = calibration.default_sizes(cap)
        base, lin, quad = rng.uniform(0.5, 5), rng.uniform(0, 0.05), rng.uniform(0, 1e-3)
        ts = [base + lin * n + quad * n * n + rng.gauss(0, 0.05 * base) for n in ns]
        return LatencyModel.from_points(ns, ts, t_draft=rng.uniform(0, 2))
    if kind == 1:  # a flat stretch then a kink (GPU-like: free nodes up to a tile size)
        knee = rng.randint(1, cap)
        return LatencyModel.from_points([0, knee, max(cap, knee + 1)], [1.0, 1.0, 1.0 + rng.uniform(0.01, 5)],
                                        t_draft=rng.uniform(0, 1))
    slopes = sorted(rng.uniform(0, 0.1) for _ in range(cap))  # a raw convex table
    T = [rng.uniform(0.1, 3)]
    for s in slopes:
        T.append(T[-1] + s)
    return T


@pytest.mark.parametrize("seed", range(300))
def test_greedy_stop_equals_exhaustive_argmax_under_convex_cost(seed):
    rng = random.Random(seed)
    cap = rng.choice([1, 2, 5, 16, 64, 256])
    probs = _random_probs(rng, rng.randint(0, cap + 8))
    latency = _random_convex_latency(rng, cap + 8)
    greedy = choose_budget(probs, latency, cap)
    best = exhaustive_best_budget(probs, latency, cap)
    f = throughput_curve(probs, latency, cap)
    assert 0 <= greedy <= min(cap, len(probs))
    # equal, up to float ties between neighbours
    assert all(a >= b for a, b in zip(probs, probs[1:]))
    assert greedy == best or f[greedy] >= f[best] * (1 - 1e-12)


def test_greedy_can_fail_without_convexity():
    # a step in T (not convex) makes F bimodal: the first drop is not the global maximum
    T = [1.0, 2.0] + [2.0] * 8
    probs = [0.9] * 9
    assert choose_budget(probs, T) == 0
    assert exhaustive_best_budget(probs, T) == 9


def test_stopping_rule_edge_cases():
    rising = LatencyModel.from_points([0, 256], [1.0, 2.0])
    flat = LatencyModel.from_points([0, 256], [1.0, 1.0])
    assert choose_budget([1e-12] * 256, rising, 256) == 0  # nothing worth verifying
    assert choose_budget([1.0] * 256, flat, 256) == 256  # free nodes, all accepted: the cap
    assert choose_budget([1.0] * 256, flat, 10) == 10  # cap respected
    assert choose_budget([1.0] * 7, flat, 256) == 7  # a smaller tree than the cap
    assert choose_budget([], rising, 256) == 0
    assert choose_budget([0.5, 0.4], rising, 0) == 0
    assert choose_budget(torch.tensor([1.0] * 5), flat, 256) == 5  # tensors work too
    # a flat cost with positive probabilities always grows: strictly higher E at the same T
    assert choose_budget([1e-6] * 16, flat, 16) == 16
    # callable latency
    assert choose_budget([1.0] * 4, lambda n: 1.0 + 0.0 * n, 4) == 4


def test_policy_on_trees_matches_choose_budget():
    lat = LatencyModel.from_points([0, 8, 64, 256], [1.0, 1.05, 1.6, 4.0], t_draft=0.3)
    policy = caddtree_policy(None, None, max_nodes=64, latency=lat)
    g = torch.Generator().manual_seed(0)
    for i in range(20):
        lp = torch.log_softmax(torch.randn(7, 256, generator=g) * (1 + i / 3), -1)
        top_lp, top_ids = topk_per_position(lp, 64)
        tree = build_tree(1, top_lp, top_ids, 64)
        n = policy(tree)
        probs = [math.exp(s) for s in tree.scores[1:]]
        assert n == choose_budget(probs, lat, 64) == exhaustive_best_budget(probs, lat, 64)
        assert isinstance(n, int) and 0 <= n <= 64
    assert len(policy.budgets) == 20
    root_only = build_tree(1, top_lp, top_ids, 0)
    assert policy(root_only) == 0


def test_policy_on_a_batch_maximises_batch_throughput():
    """One budget for B trees: the argmax over n of (B + sum_b sum_{i<=n} p_{b,i}) / (B t_draft + t_verify(B (n+1) - 1))."""
    lat = LatencyModel.from_points([0, 8, 64, 256], [1.0, 1.05, 1.6, 4.0], t_draft=0.3)
    g = torch.Generator().manual_seed(1)
    for B in (2, 3, 8):
        for i in range(6):
            policy = caddtree_policy(None, None, max_nodes=64, latency=lat)
            trees = []
            for b in range(B):
                lp = torch.log_softmax(torch.randn(7, 256, generator=g) * (1 + (i + b) / 3), -1)
                top_lp, top_ids = topk_per_position(lp, 64)
                trees.append(build_tree(1, top_lp, top_ids, 64 - 3 * b))  # rows with fewer nodes add nothing past their end
            n = policy(trees)
            best, best_f = 0, -1.0
            for m in range(65):
                e = B + sum(math.exp(s) for t in trees for s in t.scores[1:m + 1])
                f = e / (B * lat.t_draft + lat.verify_time(B * (m + 1) - 1))
                if f > best_f + 1e-12:
                    best, best_f = m, f
            assert n == best, (B, i, n, best)
    # B = 1 as a list is the single-tree rule
    policy = caddtree_policy(None, None, max_nodes=64, latency=lat)
    assert policy([trees[0]]) == policy(trees[0])


def test_acceptance_calibration_rescales_the_surrogate():
    lat = LatencyModel.from_points([0, 8, 64, 256], [1.0, 1.05, 1.6, 4.0], t_draft=0.3)
    g = torch.Generator().manual_seed(1)
    lp = torch.log_softmax(torch.randn(7, 256, generator=g) * 2.5, -1)
    top_lp, top_ids = topk_per_position(lp, 64)
    tree = build_tree(1, top_lp, top_ids, 64)
    probs = [math.exp(s) for s in tree.scores[1:]]

    over = budget.CaDDTreePolicy(lat, 64)  # the drafter promises a lot and nothing is ever accepted
    n0 = over(tree)
    assert n0 == exhaustive_best_budget(probs, lat, 64) and n0 > 0
    for _ in range(60):
        over.observe([0])
        n = over(tree)
    r = over.acceptance_scale
    assert over.min_scale <= r < 0.1 and n < n0
    # the choice is exactly the argmax of the rescaled throughput E(n) = 1 + r * sum p_i
    assert n == exhaustive_best_budget([r * p for p in probs], lat, 64)

    fixed = budget.CaDDTreePolicy(lat, 64, calibrate_acceptance=False)
    for _ in range(60):
        fixed(tree)
        fixed.observe([0])
    assert fixed.acceptance_scale == 1.0 and fixed(tree) == n0

    honest = budget.CaDDTreePolicy(lat, 64)  # accepted = promised: r stays 1, budgets stay the surrogate's
    for _ in range(30):
        k = honest(tree)
        honest.observe([sum(probs[:k])])
    assert honest.acceptance_scale == pytest.approx(1.0) and honest(tree) == n0
    honest.observe([3])
    honest.observe([3])  # a report without a preceding choice is ignored
    assert honest.acceptance_scale > 1.0


def test_online_overhead_refinement_is_a_constant_shift():
    lat = LatencyModel.from_points([0, 8, 64], [1.0, 1.1, 2.0], t_draft=0.5)
    clock_values = iter([0.0, 2.0, 4.0, 6.0, 1000.0, 1002.0])  # rounds of 2s, one 994s pause
    policy = budget.CaDDTreePolicy(lat, 64, online=True, ema=0.5, clock=lambda: next(clock_values))
    tree = build_tree(1, torch.tensor([[-0.01, -5.0]] * 3), torch.tensor([[3, 4]] * 3), 6)
    ns = [policy(tree) for _ in range(6)]
    assert ns[0] == 3  # the deep chain is almost surely accepted
    # observed 2.0s for n=3 rounds; the model said 0.5 + 1.0375 = 1.5375: overhead moves toward 0.4625
    assert 0 < lat.t_overhead < 0.4625 + 1e-12
    before = lat.t_overhead
    T = lat.totals(64)
    assert is_convex_nondecreasing(list(range(65)), T, tol=1e-12)
    assert T[0] == pytest.approx(0.5 + 1.0 + before)
    assert lat.base_totals(64)[0] == pytest.approx(1.5)
    policy._observe(3, 1e6)  # a gap that cannot be one round is ignored
    assert lat.t_overhead == before


# ------------------------------------------------------------------------------------------------
# calibration and its cache
# ------------------------------------------------------------------------------------------------

def test_calibration_cache_roundtrip(tiny_pair, tmp_path, monkeypatch):
    target, drafter = tiny_pair
    calls = []

    def fake_measure(target, drafter, max_nodes, **kw):
        calls.append(max_nodes)
        return {"ns": [0, 4, max_nodes], "times": [1.0, 1.1, 1.5 + max_nodes / 100], "t_draft": 0.2, "seconds": 0.0}

    monkeypatch.setattr(calibration, "measure_latency", fake_measure)
    lat = calibrate(target, drafter, 32)
    assert calls == [32]
    files = list((tmp_path / "hfdd" / "latency").glob("*.json"))
    assert len(files) == 1
    blob = json.loads(files[0].read_text())
    assert blob["key"]["max_nodes"] == 32 and blob["key"]["torch"] == torch.__version__
    assert blob["key"]["device_type"] == "cpu" and blob["key"]["dtype"] == "torch.float32"

    # same key, fresh process (memo cleared): loaded from disk, no timing
    calibration.clear_memory_cache()
    monkeypatch.setattr(calibration, "measure_latency", _no_timing)
    again = calibrate(target, drafter, 32)
    assert again.knots_n == lat.knots_n and again.knots_t == lat.knots_t and again.t_draft == lat.t_draft
    assert caddtree_policy(target, drafter, max_nodes=32).latency.knots_t == lat.knots_t

    # a different key (cap; no drafter) recalibrates
    monkeypatch.setattr(calibration, "measure_latency", fake_measure)
    calibrate(target, drafter, 64)
    calibrate(target, None, 32)
    assert calls == [32, 64, 32]
    assert len(list((tmp_path / "hfdd" / "latency").glob("*.json"))) == 3

    # a corrupt file is ignored and rewritten
    files[0].write_text("{not json")
    calibration.clear_memory_cache()
    calibrate(target, drafter, 32)
    assert calls == [32, 64, 32, 32]
    assert json.loads(files[0].read_text())["key"]["max_nodes"] == 32


def test_real_calibration_policy_and_lossless_generate(tiny_pair, monkeypatch):
    target, drafter = tiny_pair
    policy = caddtree_policy(target, drafter, max_nodes=32, **SMALL)
    lat = policy.latency
    assert lat.raw_n == [0.0, 4.0, 32.0] and all(t > 0 for t in lat.raw_t) and lat.t_draft > 0
    assert is_convex_nondecreasing(lat.knots_n, lat.knots_t, tol=1e-15)

    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 3.0, 10.0):
        lp = torch.log_softmax(torch.randn(7, 256, generator=g) * scale, -1)
        top_lp, top_ids = topk_per_position(lp, 32)
        n = policy(build_tree(5, top_lp, top_ids, 32))
        assert isinstance(n, int) and 0 <= n <= 32

    # generate(tree_budget="auto") must take the cached calibration, not time again
    calibration.clear_memory_cache()
    monkeypatch.setattr(calibration, "measure_latency", _no_timing)
    reports = []
    observe = budget.CaDDTreePolicy.observe
    monkeypatch.setattr(budget.CaDDTreePolicy, "observe",
                        lambda self, k: (reports.append(k), observe(self, k))[1])
    hf_ddtree.enable(target)
    try:
        ids = torch.randint(0, 250, (1, 12), generator=g)
        ref = target.generate(ids, do_sample=False, max_new_tokens=30)
        out = target.generate(ids, assistant_model=drafter, tree_budget="auto", max_tree_budget=32,
                              do_sample=False, max_new_tokens=30, return_dict_in_generate=True)
    finally:
        hf_ddtree.disable(target)
    assert torch.equal(out.sequences, ref)
    assert out.stats.tree_sizes and all(0 <= n <= 32 for n in out.stats.tree_sizes)
    # the loop reports every round's accepted drafts to the policy (its acceptance calibration)
    assert len(reports) == len(out.stats.acceptance_lengths)
    assert all(len(k) == 1 for k in reports)  # one entry per row
    assert [k[0] + 1 for k in reports][:-1] == out.stats.acceptance_lengths[:-1]


def test_plan_picks_the_round_kind_by_expected_rate():
    """`CaDDTreePolicy.plan`: draft until drafted rounds have a rate; then the best of drafting (its realised
    rate), the lookup tree alone (E = 1 + calibrated mass of the best n nodes, T = t_verify(n)) and the root
    alone (1 / t_verify(0)); a drafted round at least every `explore_every`."""
    from hf_ddtree.budget import CaDDTreePolicy, LatencyModel
    from hf_ddtree.tree import merge_paths

    lat = LatencyModel.from_points([0, 8, 64], [1.0, 1.2, 3.0], t_draft=1.0)
    pol = CaDDTreePolicy(lat, 16, explore_every=4)
    sure = merge_paths(5, [([6, 7, 8], [math.log(0.9)] * 3)], 16)  # a lookup path accepted with 0.9 per token
    assert pol.plan(sure) == ("draft", 0)  # nothing known about drafting yet
    pol(sure)  # the drafted round's budget (any tree)
    pol.observe([0])  # it committed 1 token in T(n) > 2 s: 0.5 tok/s at best
    kind, n = pol.plan(sure)
    e = 1 + 0.9 + 0.81 + 0.729
    assert kind == "lookup" and n == 3 and e / lat.verify_time(3) > 1 / lat.verify_time(0)
    assert pol.plan(None) == ("root", 0)  # no lookup: the root alone (1 tok/s) beats drafting (0.5)
    assert pol.plan(None) == ("root", 0)
    assert pol.plan(None) == ("draft", 0)  # 3 rounds without drafting: the 4th explores
    assert pol.kinds == ["draft", "lookup", "root", "root", "draft"]
    pol(sure)
    pol.observe([0])  # the exploratory draft lost again: the next one waits twice as long
    assert [pol.plan(None)[0] for _ in range(8)] == ["root"] * 7 + ["draft"]
    rich = CaDDTreePolicy(lat, 16)
    rich.plan(None)
    rich(sure)
    rich.observe([6])  # 7 tokens per drafted round: well above the root's rate
    assert rich.plan(None) == ("draft", 0) and rich.plan(sure) == ("draft", 0)
