"""Bad inputs fail early with a ValueError that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config

import hf_ddtree
from hf_ddtree import drafter_spec, validate_pair

from conftest import BLOCK, build_drafter, build_target

PROMPT = torch.tensor([[3, 9, 27, 14, 5]])


@pytest.fixture(scope="module")
def target():
    return hf_ddtree.enable(build_target("qwen3", "sdpa", seed=0))


@pytest.fixture(scope="module")
def drafter(target):
    return build_drafter(target)


def gen(target, drafter, ids=PROMPT, **kw):
    kw.setdefault("max_new_tokens", 4)
    kw.setdefault("do_sample", False)
    return target.generate(ids, assistant_model=drafter, **kw)


def test_batch_of_identical_rows_is_stock(target, drafter):
    """B > 1 is supported (tests/test_batch.py); two copies of one prompt give two copies of its output."""
    from transformers import GenerationMixin

    out = gen(target, drafter, ids=PROMPT.repeat(2, 1), tree_budget=4)
    ref = GenerationMixin.generate(target, PROMPT, do_sample=False, max_new_tokens=4)
    assert torch.equal(out, ref.repeat(2, 1))


def test_drafter_hidden_size_mismatch(target):
    bad = build_drafter(target, hidden_size=32, head_dim=8)
    with pytest.raises(ValueError, match=r"hidden_size 32 != target hidden size 64.*drafter trained for this target"):
        gen(target, bad, tree_budget=4)


@pytest.mark.parametrize("layers", [[0, 3], [-1, 1], [7]])
def test_target_layer_ids_out_of_range(target, layers):
    bad = build_drafter(target, target_layer_ids=layers)
    with pytest.raises(ValueError, match=r"target has 3 layers.*out of range.*load the drafter that matches"):
        gen(target, bad, tree_budget=4)


@pytest.mark.parametrize("mask", [64, 1000])
def test_mask_token_outside_vocab(target, mask):
    bad = build_drafter(target, mask_token_id=mask)
    with pytest.raises(ValueError, match=rf"mask_token_id {mask} is outside the target vocabulary \(64 rows\).*(drafter trained|resize)"):
        gen(target, bad, tree_budget=4)


def test_vocab_mismatch(target):
    bad = build_drafter(target, vocab_size=80)
    with pytest.raises(ValueError, match=r"vocab_size 80 != target vocabulary 64.*another tokenizer"):
        gen(target, bad, tree_budget=4)


def test_fc_width_mismatch(target):
    bad = build_drafter(target)
    bad.fc = torch.nn.Linear(3 * 64, 64, bias=False)  # trained on 3 target layers, config says 2
    with pytest.raises(ValueError, match=r"fc expects 192 input features.*2 layers x 64 = 128.*does not belong"):
        gen(target, bad, tree_budget=4)


def test_block_size_too_small(target):
    bad = build_drafter(target, block_size=1)
    with pytest.raises(ValueError, match=r"block_size must be >= 2.*config"):
        gen(target, bad, tree_budget=4)


@pytest.mark.parametrize("budget", [-1, 4097, 10**6])
def test_tree_budget_out_of_range(target, drafter, budget):
    with pytest.raises(ValueError, match=rf"tree_budget={budget} is out of range: use 0 <= tree_budget <= 4096"):
        gen(target, drafter, tree_budget=budget)


@pytest.mark.parametrize("budget", [4.0, "64", True, [8]])
def test_tree_budget_not_an_int(target, drafter, budget):
    with pytest.raises(ValueError, match=r"tree_budget must be an int in \[0, 4096\] or 'auto'"):
        gen(target, drafter, tree_budget=budget)


def test_tree_budget_limits_are_inclusive(target, drafter):
    for budget in (0, 4096):
        out = gen(target, drafter, tree_budget=budget, max_new_tokens=3)
        assert out.shape == (1, PROMPT.shape[1] + 3)


def test_non_dflash_assistant_with_tree_budget(target):
    plain = build_target("qwen3", "sdpa", seed=4, layers=1)
    with pytest.raises(ValueError, match=r"need a DFlash drafter as assistant_model, got a Qwen3ForCausalLM.*drop tree_budget"):
        gen(target, plain, tree_budget=8)
    with pytest.raises(ValueError, match=r"need a DFlash drafter.*Qwen3ForCausalLM"):
        gen(target, plain, method="ddtree")


def test_tree_budget_without_assistant(target):
    with pytest.raises(ValueError, match=r"need a DFlash drafter as assistant_model, got no assistant_model"):
        target.generate(PROMPT, tree_budget=8, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"need a DFlash drafter.*no assistant_model"):
        target.generate(PROMPT, method="dflash", max_new_tokens=4)


def test_padded_attention_mask(target, drafter):
    ids = PROMPT.clone()
    mask = torch.ones_like(ids)
    mask[0, 2] = 0  # a hole: neither left nor right padding
    with pytest.raises(ValueError, match=r"needs left padding.*padding_side = 'left'"):
        gen(target, drafter, attention_mask=mask, tree_budget=4)
    mask = torch.ones_like(ids)
    mask[0, -1] = 0  # right padding
    with pytest.raises(ValueError, match=r"needs left padding.*right-padded"):
        gen(target, drafter, attention_mask=mask, tree_budget=4)
    # left padding is decoded like stock decodes it
    from transformers import GenerationMixin

    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ref = GenerationMixin.generate(target, ids, attention_mask=mask, do_sample=False, max_new_tokens=4)
    assert torch.equal(gen(target, drafter, attention_mask=mask, tree_budget=4), ref)
    # an all-ones mask is fine
    out = gen(target, drafter, attention_mask=torch.ones_like(ids), tree_budget=4)
    assert out.shape[1] == ids.shape[1] + 4


def test_beam_search(target, drafter):
    with pytest.raises(ValueError, match=r"beam search: set num_beams=1"):
        gen(target, drafter, num_beams=2, tree_budget=4)


def test_num_return_sequences(target, drafter):
    with pytest.raises(ValueError, match=r"num_return_sequences"):
        gen(target, drafter, num_return_sequences=2, do_sample=True, tree_budget=4)


def test_flash_attention_target():
    t = hf_ddtree.enable(build_target("qwen3", "sdpa", seed=0))
    d = build_drafter(t)
    t.config._attn_implementation = "flash_attention_2"  # faked: no flash-attn kernel is needed to hit the check
    with pytest.raises(ValueError, match=r"flash_attention_2.*cannot take an arbitrary tree mask.*attn_implementation='sdpa'"):
        gen(t, d, tree_budget=4)


def test_output_attentions_or_hidden_states(target, drafter):
    for kw in (dict(output_attentions=True), dict(output_hidden_states=True)):
        with pytest.raises(ValueError, match=r"cannot return attentions or hidden states: drop"):
            gen(target, drafter, tree_budget=4, return_dict_in_generate=True, **kw)


def test_method_errors(target, drafter):
    with pytest.raises(ValueError, match=r"method='dflash' verifies the drafter's single chain: drop tree_budget"):
        gen(target, drafter, method="dflash", tree_budget=8)
    with pytest.raises(ValueError, match=r"method='beam' is not one of"):
        gen(target, drafter, method="beam")


def test_unsupported_cache_implementation(target, drafter):
    with pytest.raises(ValueError, match=r"cache_implementation"):
        gen(target, drafter, tree_budget=4, cache_implementation="offloaded")


def test_unsupported_layer_types():
    """Sliding-window layers work (tests/test_sliding_window.py), and Gated DeltaNet linear attention
    (tests/test_hybrid.py); chunked attention cannot, nor linear-attention layers of an unknown module.
    (stock generate() itself already fails on such a Qwen3 config, so the refusal is checked where it lives)"""
    from transformers import Qwen3ForCausalLM

    from hf_ddtree.cache import make_cache

    cfg_target = build_target("qwen3", "sdpa", seed=0)
    for kind in ("chunked_attention", "linear_attention"):
        cfg = Qwen3Config(**{**cfg_target.config.to_dict(), "layer_types": [kind, "full_attention", "full_attention"]})
        msg = (r"not Gated DeltaNet layers hf_ddtree knows" if kind == "linear_attention"
               else rf"full-attention, sliding-window and Gated DeltaNet linear-attention layers only.*'{kind}' layers")
        with pytest.raises(ValueError, match=msg):
            make_cache(Qwen3ForCausalLM._from_config(cfg, attn_implementation="sdpa"), "static", 32)


def test_drafter_spec_and_validate_pair_directly(target, drafter):
    spec = validate_pair(target, drafter)
    assert spec.block_size == BLOCK and spec.mask_token_id == 63 and spec.target_layer_ids == (0, 1)
    assert spec.hidden_state_indices == [1, 2]
    with pytest.raises(ValueError, match=r"Linear is not a DFlash drafter.*drop `tree_budget`"):
        drafter_spec(torch.nn.Linear(2, 2))
