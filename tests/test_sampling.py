"""Sampling is lossless: DDTree / DFlash samples follow the target's exact sampling distribution.

A tiny target (vocab 8) generates 4 new tokens (so the first round verifies trees of depth 2 and
accepted paths of several nodes occur). The exact probability of every one of the 8^4 sequences is
computed by enumeration: the product over positions of softmax(processed logits), where the
processing uses transformers' own logits processors in generate()'s order. Samples from stock
`generate(do_sample=True)`, from DDTree and from the DFlash chain (each with its own seed) are each
chi-square-tested against that exact law; the same test must reject a deliberately wrong law
(other temperature / processor left out), which shows it has power at this sample size.
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from transformers import GenerationMixin
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import hf_ddtree

from conftest import OracleDrafter, build_drafter, build_target

V = 8
NEW = 4
BLOCK = 4
PROMPT = torch.tensor([[1, 5, 2, 6]])
P = PROMPT.shape[1]
ALPHA = 1e-3


@functools.lru_cache(maxsize=None)
def setup(seed: int):
    target = build_target("qwen3", "sdpa", vocab=V, hidden=32, layers=2, logit_scale=2.0, seed=seed)
    greedy = GenerationMixin.generate(target, PROMPT, do_sample=False, max_new_tokens=16)
    hf_ddtree.enable(target)
    drafters = {"oracle": OracleDrafter(target, greedy[0].tolist(), block_size=BLOCK),
                "random": build_drafter(target, block_size=BLOCK, seed=seed + 3)}
    return target, drafters


def exact_distribution(target, processors: LogitsProcessorList) -> torch.Tensor:
    """(V**NEW,) float64: P(new tokens = t1..t4), cell index = t1*V^3 + t2*V^2 + t3*V + t4."""
    rows = torch.tensor(list(itertools.product(range(V), repeat=NEW - 1)))  # every (t1, t2, t3)
    seqs = torch.cat([PROMPT.expand(rows.shape[0], -1), rows], dim=1)
    with torch.no_grad():
        logits = target(input_ids=seqs, use_cache=False).logits.float()
    cond = []  # cond[j][r] = law of token j+1 given the first j tokens of row r
    for j in range(NEW):
        scores = processors(seqs[:, : P + j], logits[:, P - 1 + j].clone())
        cond.append(torch.softmax(scores.double(), dim=-1))
    cells = torch.tensor(list(itertools.product(range(V), repeat=NEW)))
    prob = torch.ones(cells.shape[0], dtype=torch.float64)
    for j in range(NEW):
        # the row whose first j tokens equal the cell's (later tokens of that row are irrelevant)
        row = torch.zeros(cells.shape[0], dtype=torch.long)
        for i in range(j):
            row += cells[:, i] * V ** (NEW - 2 - i)
        prob *= cond[j][row, cells[:, j]]
    assert abs(float(prob.sum()) - 1) < 1e-9
    return prob


def chi_square_pvalue(counts: torch.Tensor, prob: torch.Tensor) -> tuple[float, int, float]:
    """Pearson chi-square of observed counts against exact probabilities; cells with expected < 5
    are pooled. Returns (statistic, degrees of freedom, p-value = Q(df/2, stat/2))."""
    if bool((counts[prob == 0] > 0).any()):  # a sample outside the support: impossible under the law
        return math.inf, 0, 0.0
    n = counts.sum()
    expected = prob * n
    big = expected >= 5
    obs, exp = list(counts[big]), list(expected[big])
    rest_o, rest_e = counts[~big].sum(), expected[~big].sum()
    if rest_e >= 5:
        obs.append(rest_o)
        exp.append(rest_e)
    elif exp:  # too little mass left over for its own bin: fold it into the smallest bin
        k = min(range(len(exp)), key=lambda i: exp[i])
        obs[k] = obs[k] + rest_o
        exp[k] = exp[k] + rest_e
    obs_t, exp_t = torch.stack(obs).double(), torch.stack(exp).double()
    stat = float(((obs_t - exp_t) ** 2 / exp_t).sum())
    df = len(obs) - 1
    p = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))
    return stat, df, p


def sample(target, n: int, seed: int, gen_kw: dict, method_kw: dict):
    counts = torch.zeros(V**NEW, dtype=torch.float64)
    accept, seqs = [], []
    torch.manual_seed(seed)
    for _ in range(n):
        out = target.generate(PROMPT, do_sample=True, max_new_tokens=NEW, return_dict_in_generate=True,
                              **gen_kw, **method_kw)
        toks = out.sequences[0, P:].tolist()
        assert len(toks) == NEW
        seqs.append(toks)
        counts[sum(t * V ** (NEW - 1 - i) for i, t in enumerate(toks))] += 1
        accept += list(getattr(out, "acceptance_lengths", None) or [])
    return counts, accept, seqs


class _CommittedPrefixOnly:
    """Wraps a processor so it only sees the first `n` ids (a deliberately wrong law for the power check)."""

    def __init__(self, proc, n: int):
        self.proc, self.n = proc, n

    def __call__(self, input_ids, scores):
        return self.proc(input_ids[:, : self.n], scores)


CONFIGS = {
    # warpers only (prefix-free: processed once for all tree nodes)
    "temperature": dict(
        seed=0,
        gen=dict(temperature=1.0, top_k=0),
        procs=lambda: LogitsProcessorList([TemperatureLogitsWarper(1.0)]),
        wrong=lambda: LogitsProcessorList([TemperatureLogitsWarper(1.3)]),
        methods={"tree_oracle": ("oracle", dict(tree_budget=16)), "chain_oracle": ("oracle", {}),
                 "tree_random": ("random", dict(tree_budget=64))},
    ),
    # a prefix-dependent processor (per node, on that node's own path) + top-k + top-p
    "penalty_topk_topp": dict(
        seed=1,  # a target where the penalty on the drafted path changes the law a lot (power below)
        gen=dict(temperature=0.8, top_k=4, top_p=0.9, repetition_penalty=3.0),
        procs=lambda: LogitsProcessorList([RepetitionPenaltyLogitsProcessor(3.0), TemperatureLogitsWarper(0.8),
                                           TopKLogitsWarper(4), TopPLogitsWarper(0.9)]),
        # the classic bug: the penalty sees only the committed prefix (prompt + first token), not the node's path
        wrong=lambda: LogitsProcessorList([_CommittedPrefixOnly(RepetitionPenaltyLogitsProcessor(3.0), P + 1),
                                           TemperatureLogitsWarper(0.8), TopKLogitsWarper(4), TopPLogitsWarper(0.9)]),
        methods={"tree_oracle": ("oracle", dict(tree_budget=8)), "chain_random": ("random", {})},
    ),
}
N_STOCK = 150
N_SPEC = 200


@pytest.mark.parametrize("config", list(CONFIGS))
def test_sampling_matches_exact_distribution(config):
    cfg = CONFIGS[config]
    target, drafters = setup(cfg["seed"])
    exact = exact_distribution(target, cfg["procs"]())
    wrong = exact_distribution(target, cfg["wrong"]())

    counts, _, _ = sample(target, N_STOCK, seed=100, gen_kw=cfg["gen"], method_kw={})
    stat, df, p = chi_square_pvalue(counts, exact)
    assert p > ALPHA, f"stock sampling vs the enumerated law: chi2={stat:.1f} df={df} p={p:.2e} (the test itself is off)"

    for i, (name, (dname, kw)) in enumerate(cfg["methods"].items()):
        counts, accept, _ = sample(target, N_SPEC, seed=200 + i, gen_kw=cfg["gen"],
                                   method_kw=dict(assistant_model=drafters[dname], **kw))
        stat, df, p = chi_square_pvalue(counts, exact)
        assert p > ALPHA, f"{config}/{name}: chi2={stat:.1f} df={df} p={p:.2e}"
        # power: the same samples, the same test, a deliberately wrong law -> rejected
        stat_w, df_w, p_w = chi_square_pvalue(counts, wrong)
        assert p_w < ALPHA, f"{config}/{name}: test has no power (wrong law accepted, p={p_w:.2e})"
        assert sum(accept) == N_SPEC * (NEW - 1)
        if dname == "oracle" and "tree_budget" in kw:
            # multi-node acceptances really happen under sampling (a 2-node path + bonus = 3 tokens)
            assert accept.count(3) > N_SPEC // 10, {a: accept.count(a) for a in set(accept)}


def test_chi_square_helper():
    prob = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    stat, df, p = chi_square_pvalue(prob * 800, prob)
    assert stat == 0 and df == 3 and p == pytest.approx(1.0)
    # chi2 with 2 df: survival function is exp(-x/2)
    stat, df, p = chi_square_pvalue(torch.tensor([60.0, 20.0, 20.0]), torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))
    assert df == 2 and stat == pytest.approx(100 / 50 + 25 / 25 + 25 / 25) and p == pytest.approx(math.exp(-stat / 2))
    _, _, p = chi_square_pvalue(torch.tensor([0.0, 10.0]), torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert p == 0.0
