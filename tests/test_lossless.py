"""Greedy DDTree / DFlash output is token-identical to stock greedy `generate()`.

Matrix: Qwen3 and Llama targets x sdpa/eager x static/dynamic cache x tree budgets {1, 4, 16, 64}
and the DFlash chain x with/without EOS x a random drafter and an oracle drafter. The oracle
(see conftest.OracleDrafter) knows the reference continuation and puts the right token at rank 1
every third position, so it gives long acceptances (multi-node paths, cache compaction of long
paths) and only a tree, not the chain, recovers the rank-1 positions.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

import hf_ddtree

from conftest import ARCHS, BLOCK, CACHES, IMPLS, OracleDrafter, build_drafter, build_target

NEW = 24
MODES = {"b1": dict(tree_budget=1), "b4": dict(tree_budget=4), "b16": dict(tree_budget=16),
         "b64": dict(tree_budget=64), "chain": dict()}


def stock(target, ids, **kw):
    """Stock transformers greedy generate (bypasses the enable() patch)."""
    from transformers import GenerationMixin

    return GenerationMixin.generate(target, ids, do_sample=False, **kw)


def pick_eos(generated: list[int], lo: int = 4) -> tuple[int, int]:
    """A token whose FIRST occurrence is mid-sequence, so an EOS there really stops generation early."""
    for k in range(lo, len(generated) - 4):
        if generated[k] not in generated[:k]:
            return generated[k], k
    raise AssertionError(f"no usable EOS token in {generated}")


@functools.lru_cache(maxsize=None)
def setup(arch: str, impl: str, prompt_len: int = 7, seed: int = 0) -> SimpleNamespace:
    target = build_target(arch, impl, seed=seed)
    vocab = target.config.vocab_size
    prompt = torch.randint(0, vocab - 1, (1, prompt_len), generator=torch.Generator().manual_seed(seed + 3))
    long = stock(target, prompt, max_new_tokens=NEW + 16, output_scores=True, return_dict_in_generate=True)
    top2 = torch.cat(long.scores).topk(2, dim=-1).values
    # every greedy choice is decided by a margin far above fp32 noise, so exact equality is a fair ask
    assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-4
    ref = long.sequences[:, : prompt_len + NEW]
    eos, k = pick_eos(ref[0, prompt_len:].tolist())
    ref_eos = stock(target, prompt, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=eos)
    assert ref_eos.shape[1] == prompt_len + k + 1 and int(ref_eos[0, -1]) == eos
    hf_ddtree.enable(target)
    return SimpleNamespace(
        target=target, prompt=prompt, ref=ref, full_ref=long.sequences, eos=eos, ref_eos=ref_eos,
        drafters={"random": build_drafter(target, seed=seed + 1),
                  "oracle": OracleDrafter(target, long.sequences[0].tolist())},
    )


def run(s, drafter, mode: str, cache: str, eos: bool = False, **kw):
    extra = dict(eos_token_id=s.eos, pad_token_id=s.eos) if eos else {}
    kw.setdefault("max_new_tokens", NEW)
    return s.target.generate(s.prompt, assistant_model=drafter, do_sample=False, cache_implementation=cache,
                             return_dict_in_generate=True, **MODES[mode], **extra, **kw)


def check_stats(out, prompt_len: int, budget: int | None = None):
    new = out.sequences.shape[1] - prompt_len
    # the first new token comes from the prefill forward; every later one from some round
    assert sum(out.acceptance_lengths) == new - 1, (out.acceptance_lengths, new)
    assert all(a >= 1 for a in out.acceptance_lengths)
    assert out.acceptance_lengths == out.stats.acceptance_lengths
    assert len(out.stats.tree_sizes) == len(out.acceptance_lengths)
    if budget is not None:
        assert all(0 <= n <= budget for n in out.stats.tree_sizes)
    for a, n in zip(out.acceptance_lengths, out.stats.tree_sizes):
        assert a <= min(n, BLOCK - 1) + 1  # accepted nodes lie on one path of depth < block size


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_is_token_identical(arch, impl, cache):
    s = setup(arch, impl)
    P = s.prompt.shape[1]
    mean_acc = {}
    for dname, drafter in s.drafters.items():
        for mode in MODES:
            for eos in (False, True):
                out = run(s, drafter, mode, cache, eos=eos)
                expect = s.ref_eos if eos else s.ref
                assert torch.equal(out.sequences, expect), (
                    f"{dname} {mode} eos={eos}: {out.sequences[0, P:].tolist()} != {expect[0, P:].tolist()}")
                check_stats(out, P, MODES[mode].get("tree_budget"))
                if not eos:
                    mean_acc[dname, mode] = out.stats.mean_acceptance_length
    # the oracle really exercises multi-node paths, and the tree beats the chain on rank-1 tokens
    for mode in ("b4", "b16", "b64", "chain"):
        assert mean_acc["oracle", mode] > 2, mean_acc
    assert 1.3 < mean_acc["oracle", "b1"] <= 2
    assert mean_acc["oracle", "b64"] > mean_acc["oracle", "b16"] > mean_acc["oracle", "b4"]
    assert mean_acc["oracle", "b64"] > mean_acc["oracle", "chain"] + 1, mean_acc
    assert max(mean_acc["random", m] for m in MODES) < mean_acc["oracle", "b64"]


@pytest.mark.parametrize("write_cache", [False, True], ids=["nocache", "writes"])
def test_oracle_drafter_cache_bookkeeping(write_cache):
    """The loop's drafter cache (crop(-block) after each draft) stays consistent with the context.

    The oracle asserts on every call that the cached length equals the first new position; without
    cache writes, `crop` on a never-initialised DynamicCache must be a harmless no-op."""
    s = setup("qwen3", "sdpa")
    oracle = OracleDrafter(s.target, s.full_ref[0].tolist(), write_cache=write_cache)
    for mode in ("b16", "chain"):
        for cache in CACHES:
            oracle.calls = 0
            out = run(s, oracle, mode, cache)
            assert torch.equal(out.sequences, s.ref)
            assert oracle.calls == len(out.acceptance_lengths) > 1


def test_tree_budget_zero_is_plain_decoding():
    s = setup("llama", "sdpa")
    for cache in CACHES:
        out = s.target.generate(s.prompt, assistant_model=s.drafters["oracle"], tree_budget=0, do_sample=False,
                                max_new_tokens=NEW, cache_implementation=cache, return_dict_in_generate=True)
        assert torch.equal(out.sequences, s.ref)
        assert out.acceptance_lengths == [1] * (NEW - 1)
        assert set(out.stats.tree_sizes) == {0}


@pytest.mark.parametrize("arch,impl", [("qwen3", "sdpa"), ("llama", "eager")])
def test_max_new_tokens_edges(arch, impl):
    s = setup(arch, impl)
    P = s.prompt.shape[1]
    for m in (1, 2, BLOCK - 1, BLOCK, BLOCK + 1):
        for dname in ("random", "oracle"):
            for mode in ("b4", "b64", "chain"):
                for cache in CACHES:
                    out = run(s, s.drafters[dname], mode, cache, max_new_tokens=m)
                    assert torch.equal(out.sequences, s.full_ref[:, : P + m]), (m, dname, mode, cache)
                    check_stats(out, P)


def test_max_length_ends_mid_tree():
    """max_length cuts the last round's tree (depth limit = tokens left - 1) at every possible phase."""
    s = setup("qwen3", "eager")
    P = s.prompt.shape[1]
    oracle = s.drafters["oracle"]
    cut_mid_round = False
    for max_length in range(P + 9, P + 19):
        for mode, cache in (("b64", "static"), ("b16", "dynamic"), ("chain", "static")):
            out = s.target.generate(s.prompt, assistant_model=oracle, do_sample=False, max_length=max_length,
                                    cache_implementation=cache, return_dict_in_generate=True, **MODES[mode])
            assert torch.equal(out.sequences, s.full_ref[:, :max_length]), (max_length, mode, cache)
            check_stats(out, P)
            # the last round had fewer tokens left than a full acceptance would have given
            cut_mid_round |= out.acceptance_lengths[-1] < max(out.acceptance_lengths)
    assert cut_mid_round


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_of_length_one(arch):
    target = build_target(arch, "sdpa", seed=2)
    prompt = torch.tensor([[5]])
    ref = stock(target, prompt, max_new_tokens=NEW + 16)
    hf_ddtree.enable(target)
    oracle = OracleDrafter(target, ref[0].tolist())
    drafter = build_drafter(target, seed=4)
    for d in (oracle, drafter):
        for mode in ("b1", "b16", "chain"):
            for cache in CACHES:
                out = target.generate(prompt, assistant_model=d, do_sample=False, max_new_tokens=NEW,
                                      cache_implementation=cache, return_dict_in_generate=True, **MODES[mode])
                assert torch.equal(out.sequences, ref[:, : 1 + NEW]), (type(d).__name__, mode, cache)
                check_stats(out, 1)


def test_plain_tensor_output_and_functional_form():
    """Without return_dict_in_generate the result is the (1, L) ids tensor, like stock; the
    functional `hf_ddtree.generate` gives the same."""
    s = setup("qwen3", "sdpa")
    out = s.target.generate(s.prompt, assistant_model=s.drafters["oracle"], tree_budget=16, do_sample=False,
                            max_new_tokens=NEW)
    assert isinstance(out, torch.Tensor) and torch.equal(out, s.ref)
    out2 = hf_ddtree.generate(s.target, s.prompt, s.drafters["random"], tree_budget=8, do_sample=False,
                              max_new_tokens=NEW)
    assert torch.equal(out2, s.ref)
