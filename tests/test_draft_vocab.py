"""Drafting vocabulary shortlists (hf_ddtree.draft_vocab): the builder's ranking, loading from a drafter
folder, clear errors, the drafter's renormalised (D, V) log-probs, and greedy exactness with a shortlist
that leaves out tokens the target wants (so drafted paths are rejected there and the target's own
correction token, outside the shortlist, is committed)."""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import pytest
import torch

import hf_ddtree
from hf_ddtree import models
from hf_ddtree.draft_vocab import (
    DRAFT_VOCAB_FILE,
    build_draft_vocab,
    check_draft_vocab,
    count_tokens,
    load_draft_vocab,
    rank_tokens,
    response_token_ids,
    save_draft_vocab,
    set_draft_vocab,
)
from hf_ddtree.drafter import drafter_spec
from hf_ddtree.propose import DrafterState

from conftest import CACHES, OracleDrafter, build_drafter, build_target

NEW = 24


def stock(target, ids, **kw):
    from transformers import GenerationMixin

    return GenerationMixin.generate(target, ids, do_sample=False, **kw)


# ------------------------------------------------------------------ builder


def test_rank_by_count_ties_by_id_always_first():
    counts = count_tokens([[3, 3, 5, 1], [5, 3, 7], []], vocab_size=10)
    assert counts.tolist() == [0, 1, 0, 3, 0, 2, 0, 1, 0, 0]
    assert rank_tokens(counts, 4).tolist() == [3, 5, 1, 7]  # 1 and 7 tie: smaller id first
    assert rank_tokens(counts, 3, always=[9, 5]).tolist() == [9, 5, 3]  # forced ids lead, no duplicates
    assert rank_tokens(counts, 100).numel() == 10  # clipped to V; unseen ids follow in id order
    assert rank_tokens(counts, 100).tolist()[4:] == [0, 2, 4, 6, 8, 9]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        count_tokens([[1, 10]], vocab_size=10)
    with pytest.raises(ValueError, match=">= 1"):
        rank_tokens(counts, 0)


def test_build_from_response_jsonl_and_roundtrip(tmp_path):
    path = tmp_path / "r.jsonl"
    recs = [{"id": "a", "prompt_ids": [9, 9, 9], "response_ids": [4, 4, 2]},
            {"id": "b", "prompt_ids": [9], "response_ids": [2, 4, 6]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"id": "torn", "resp')  # interrupted writer
    ids = build_draft_vocab(response_token_ids([path]), vocab_size=12, size=3, always=[11])
    assert ids.tolist() == [11, 4, 2]
    with_prompts = build_draft_vocab(response_token_ids([path], with_prompts=True), vocab_size=12, size=2)
    assert with_prompts.tolist() == [9, 4]
    out = save_draft_vocab(ids, tmp_path / "drafter")
    assert out.name == DRAFT_VOCAB_FILE
    from safetensors.torch import load_file

    assert load_file(str(out))["token_ids"].dtype == torch.int32  # small on disk
    assert load_draft_vocab(tmp_path / "drafter").tolist() == [11, 4, 2]
    assert load_draft_vocab(out, vocab_size=12, size=2).tolist() == [11, 4]


def test_bad_shortlists_are_clear_errors(tmp_path):
    save_draft_vocab(torch.tensor([1, 2, 70]), tmp_path)
    with pytest.raises(ValueError, match="outside the target vocabulary"):
        load_draft_vocab(tmp_path, vocab_size=64)
    with pytest.raises(ValueError, match="draft_vocab_size=9"):
        load_draft_vocab(tmp_path, size=9)
    with pytest.raises(FileNotFoundError, match="hf-ddtree draft-vocab"):
        load_draft_vocab(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="twice"):
        check_draft_vocab(torch.tensor([1, 1]), 64)
    with pytest.raises(ValueError, match="1-D integer"):
        check_draft_vocab(torch.tensor([[1, 2]]), 64)


def test_out_of_vocab_shortlist_fails_before_any_forward():
    target = build_target()
    drafter = build_drafter(target)
    set_draft_vocab(drafter, torch.tensor([0, 5, target.config.vocab_size]))
    calls = []
    target.register_forward_pre_hook(lambda *a: calls.append(1))
    hf_ddtree.enable(target)
    with pytest.raises(ValueError, match="draft_vocab_ids.*outside the target vocabulary"):
        target.generate(torch.tensor([[1, 2, 3]]), assistant_model=drafter, tree_budget=4, do_sample=False,
                        max_new_tokens=4)
    assert not calls


def test_loads_from_the_drafter_folder(monkeypatch, tmp_path):
    """load_default_drafter attaches the shortlist when the config sets draft_vocab_size (its first S ids),
    and leaves a drafter without the field on the full vocabulary."""
    monkeypatch.setattr(models, "_ASSETS", tmp_path)
    target = build_target()
    drafter = build_drafter(target)
    folder = tmp_path / "smollm2-135m"
    drafter.save_pretrained(folder)
    save_draft_vocab(torch.arange(40, 0, -1), folder)
    assert getattr(models.load_default_drafter(target), "draft_vocab_ids", None) is None  # no config field
    drafter.config.draft_vocab_size = 32
    drafter.save_pretrained(folder)
    loaded = models.load_default_drafter(target)
    assert loaded.draft_vocab_ids.tolist() == list(range(40, 8, -1))
    save_draft_vocab(torch.tensor([3, 64]), folder)  # built for another tokenizer
    drafter.config.draft_vocab_size = 2
    drafter.save_pretrained(folder)
    with pytest.raises(ValueError, match="outside the target vocabulary"):
        models.load_default_drafter(target)


# ------------------------------------------------------------------ the drafter's distribution


def test_shortlisted_draft_is_the_renormalised_restriction():
    target = build_target()
    drafter = build_drafter(target, seed=3)
    spec = drafter_spec(drafter)
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()
    vocab = target.config.vocab_size
    context = torch.randn(1, 5, len(spec.target_layer_ids) * target.config.hidden_size,
                          generator=torch.Generator().manual_seed(0))
    block = torch.full((1, spec.block_size), spec.mask_token_id)
    block[0, 0] = 7
    full = DrafterState(drafter, spec, embed, head).draft(block, context, 5)  # (1, bs-1, V)
    ids = torch.randperm(vocab, generator=torch.Generator().manual_seed(1))[:20]
    set_draft_vocab(drafter, ids)
    short = DrafterState(drafter, spec, embed, head).draft(block, context, 5)
    assert short.shape == full.shape
    outside = torch.ones(vocab, dtype=torch.bool)
    outside[ids] = False
    assert torch.isneginf(short[..., outside]).all()
    expect = torch.log_softmax(full[..., ids], dim=-1)  # restriction, renormalised
    torch.testing.assert_close(short[..., ids], expect, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ exactness


@functools.lru_cache(maxsize=None)
def setup(arch: str) -> SimpleNamespace:
    target = build_target(arch, "sdpa", seed=0)
    vocab = target.config.vocab_size
    prompt = torch.randint(0, vocab - 1, (1, 7), generator=torch.Generator().manual_seed(3))
    long = stock(target, prompt, max_new_tokens=NEW + 16)
    generated = long[0, 7:7 + NEW].tolist()
    # leave out every other distinct token the target generates: drafts must miss there
    wanted = list(dict.fromkeys(generated))
    missing = set(wanted[::2])
    keep = torch.tensor([t for t in range(vocab) if t not in missing])
    hf_ddtree.enable(target)
    return SimpleNamespace(target=target, prompt=prompt, ref=long[:, :7 + NEW], reference=long[0].tolist(),
                           keep=keep, missing=missing)


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("budget", [4, 64])
@pytest.mark.parametrize("kind", ["random", "oracle"])
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_greedy_identical_with_a_shortlist(arch, kind, budget, cache):
    s = setup(arch)
    if kind == "random":
        drafter = build_drafter(s.target, seed=2)
    else:
        drafter = OracleDrafter(s.target, s.reference, rank1_every=0)
    kw = dict(assistant_model=drafter, tree_budget=budget, do_sample=False, max_new_tokens=NEW,
              cache_implementation=cache, return_dict_in_generate=True)
    full = s.target.generate(s.prompt, **kw)
    set_draft_vocab(drafter, s.keep)
    short = s.target.generate(s.prompt, **kw)
    assert torch.equal(full.sequences, s.ref)
    assert torch.equal(short.sequences, s.ref)
    assert sum(short.acceptance_lengths) == NEW - 1
    if kind == "oracle":  # the oracle drafts every wanted token at rank 0 unless the shortlist drops it
        assert sum(short.acceptance_lengths) / len(short.acceptance_lengths) < \
            sum(full.acceptance_lengths) / len(full.acceptance_lengths)


def test_sliced_head_is_reused_and_follows_changes():
    target = build_target()
    drafter = build_drafter(target)
    spec = drafter_spec(drafter)
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()
    set_draft_vocab(drafter, torch.tensor([5, 1, 9]))
    a = DrafterState(drafter, spec, embed, head)
    assert DrafterState(drafter, spec, embed, head).head_weight is a.head_weight  # no re-slice per call
    torch.testing.assert_close(a.head_weight, head.weight[[5, 1, 9]])
    set_draft_vocab(drafter, torch.tensor([2, 3]))  # a new shortlist
    c = DrafterState(drafter, spec, embed, head)
    torch.testing.assert_close(c.head_weight, head.weight[[2, 3]])
    with torch.no_grad():
        head.weight[2] += 1.0  # the target's head changed in place
    torch.testing.assert_close(DrafterState(drafter, spec, embed, head).head_weight, head.weight[[2, 3]])
