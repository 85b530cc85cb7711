"""Every generate() argument is either honoured exactly like stock generate() or refused with a clear
ValueError before any forward: attention kernels, guidance_scale, inputs_embeds / empty input_ids,
the model's own stop_strings, tree_budget / max_tree_budget semantics, integral numbers, the returned
cache and what user stopping criteria receive, and a drafter passed to stock generate()."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import hf_ddtree
from hf_ddtree.compat import CACHE_FIELD

from conftest import CACHES, OracleDrafter, build_drafter
from test_generate_api import CHARS, PROMPT, char_tokenizer, stock, target  # noqa: F401 (target: a fixture)

import hf_ddtree.decoding as generate_module

NEW = 20
P = PROMPT.shape[1]
MODES = [dict(tree_budget=16), dict(), dict(tree_budget=0)]


@pytest.fixture
def oracle(target):
    return OracleDrafter(target, stock(target, max_new_tokens=NEW + 16)[0].tolist())


class CountForwards:
    """Counts forwards of a module (a pre-hook); with `forbid=True` any forward raises instead of running."""

    def __init__(self, module, forbid: bool = False):
        self.calls, self.forbid = 0, forbid
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.forbid:
            raise AssertionError("a forward ran although the call must be refused first")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---- 2. attention kernels that cannot take a tree mask ------------------------------------------

def test_flex_attention_is_refused_before_any_forward(target):
    drafter = build_drafter(target)
    target.set_attn_implementation("flex_attention")
    assert target.config._attn_implementation == "flex_attention"
    # the forward under flex attention can crash the interpreter: a pre-hook makes sure none runs
    with CountForwards(target, forbid=True), CountForwards(drafter, forbid=True):
        for mode in (dict(tree_budget=0), dict(tree_budget=4), dict()):
            with pytest.raises(ValueError, match=r"attn_implementation='flex_attention' cannot take an arbitrary tree "
                                                 r"mask.*attn_implementation='sdpa'.*set_attn_implementation\('sdpa'\)"):
                target.generate(PROMPT, assistant_model=drafter, do_sample=False, max_new_tokens=4, **mode)
    target.set_attn_implementation("sdpa")
    out = target.generate(PROMPT, assistant_model=drafter, do_sample=False, max_new_tokens=NEW, tree_budget=4)
    assert torch.equal(out, stock(target, max_new_tokens=NEW))


# ---- 3. classifier-free guidance ---------------------------------------------------------------

def test_guidance_scale_is_refused(target, oracle):
    with CountForwards(target) as t_calls, CountForwards(oracle) as d_calls:
        with pytest.raises(ValueError, match=r"guidance_scale=1.5.*classifier-free guidance.*not be lossless.*Drop guidance_scale"):
            target.generate(PROMPT, assistant_model=oracle, do_sample=False, max_new_tokens=4, guidance_scale=1.5,
                            tree_budget=4)
    assert t_calls.calls == d_calls.calls == 0
    # guidance_scale=1 is no guidance in stock generate() either
    out = target.generate(PROMPT, assistant_model=oracle, do_sample=False, max_new_tokens=NEW, guidance_scale=1.0,
                          tree_budget=4)
    assert torch.equal(out, stock(target, max_new_tokens=NEW))


# ---- 4. inputs_embeds and empty input_ids --------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Passing .* with `inputs_embeds`:UserWarning")  # stock's note on processors
@pytest.mark.parametrize("cache", CACHES)
def test_inputs_embeds_match_stock(target, oracle, cache):
    embeds = target.get_input_embeddings()(PROMPT).detach()  # (1, P, H)
    kw = dict(repetition_penalty=1.3, no_repeat_ngram_size=2)  # prefix-dependent: they see only the new ids
    ref = stock(target, None, inputs_embeds=embeds, max_new_tokens=NEW, output_scores=True,
                return_dict_in_generate=True, **kw)
    assert ref.sequences.shape == (1, NEW), "stock returns only the new tokens for inputs_embeds alone"
    assert not torch.equal(ref.sequences, stock(target, None, inputs_embeds=embeds, max_new_tokens=NEW))
    ref_len = stock(target, None, inputs_embeds=embeds, max_length=P + 9)  # max_length counts the embedded prompt
    ref_both = stock(target, PROMPT, inputs_embeds=embeds, max_new_tokens=NEW)
    assert ref_len.shape == (1, 9) and ref_both.shape == (1, P + NEW)
    for drafter in (oracle, build_drafter(target, seed=5)):
        for mode in MODES:
            out = target.generate(inputs_embeds=embeds, assistant_model=drafter, do_sample=False, max_new_tokens=NEW,
                                  output_scores=True, return_dict_in_generate=True, cache_implementation=cache,
                                  **mode, **kw)
            assert torch.equal(out.sequences, ref.sequences), mode
            for a, b in zip(out.scores, ref.scores, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            if drafter is oracle and mode.get("tree_budget"):
                assert max(out.acceptance_lengths) >= 3  # multi-token rounds after an embeds prefill
            out = target.generate(inputs_embeds=embeds, assistant_model=drafter, do_sample=False, max_length=P + 9,
                                  cache_implementation=cache, **mode)
            assert torch.equal(out, ref_len), mode
            out = target.generate(PROMPT, inputs_embeds=embeds, assistant_model=drafter, do_sample=False,
                                  max_new_tokens=NEW, cache_implementation=cache, **mode)
            assert torch.equal(out, ref_both), mode


def test_empty_or_mismatched_prompt_is_refused(target, oracle):
    embeds = target.get_input_embeddings()(PROMPT).detach()
    with CountForwards(target, forbid=True):
        with pytest.raises(ValueError, match=r"input_ids is empty \(shape \(1, 0\)\).*at least one prompt token"):
            target.generate(PROMPT[:, :0], assistant_model=oracle, do_sample=False, max_new_tokens=4, tree_budget=4)
        with pytest.raises(ValueError, match=r"inputs_embeds covers 7 positions but input_ids has 3"):
            target.generate(PROMPT[:, :3], inputs_embeds=embeds, assistant_model=oracle, do_sample=False,
                            max_new_tokens=4, tree_budget=4)


def test_no_input_starts_from_bos_like_stock(target):
    target.generation_config.bos_token_id = 5
    ref = stock(target, None, max_new_tokens=NEW)
    assert ref[0, 0] == 5 and ref.shape == (1, 1 + NEW)
    out = target.generate(assistant_model=build_drafter(target, seed=5), do_sample=False, max_new_tokens=NEW,
                          tree_budget=8)
    assert torch.equal(out, ref)


# ---- 5. the model's own generation_config.stop_strings ------------------------------------------

def test_model_generation_config_stop_strings(target, oracle):
    tok = char_tokenizer()
    text = "".join(CHARS[t] for t in stock(target, max_new_tokens=NEW)[0, P:].tolist())
    k = next(i for i in range(3, len(text) - 4) if text[i:i + 2] not in text[:i + 1])
    stop = text[k:k + 2]
    target.generation_config.stop_strings = [stop]
    ref = stock(target, max_new_tokens=NEW, tokenizer=tok)
    assert ref.shape[1] == P + k + 2, "stock stops at the model's stop string"
    ref_off = stock(target, max_new_tokens=NEW, tokenizer=tok, stop_strings=None)
    assert ref_off.shape[1] == P + NEW, "stop_strings=None switches it off"
    for mode in MODES:
        assert torch.equal(target.generate(PROMPT, assistant_model=oracle, do_sample=False, max_new_tokens=NEW,
                                           tokenizer=tok, **mode), ref), mode
        assert torch.equal(target.generate(PROMPT, assistant_model=oracle, do_sample=False, max_new_tokens=NEW,
                                           tokenizer=tok, stop_strings=None, **mode), ref_off), mode
    with pytest.raises(ValueError, match=r"stop_strings needs the tokenizer: pass generate\(\.\.\., tokenizer=tokenizer\)"):
        target.generate(PROMPT, assistant_model=oracle, do_sample=False, max_new_tokens=NEW, tree_budget=4)


# ---- 6. tree_budget / max_tree_budget: one meaning, contradictions refused ----------------------

@pytest.fixture
def fake_caddtree(monkeypatch):
    """Replace CaDDTree's calibrated policy by 'verify every node up to the cap'; records the cap."""
    import hf_ddtree.calibrate as calibrate

    caps = []

    def policy_factory(target, drafter, max_nodes, **kwargs):
        caps.append(max_nodes)

        class Policy:  # the budget-policy interface: policy(tree) -> n, policy.observe(accepted)
            def __call__(self, tree):
                return min(tree.num_nodes, max_nodes)

            def observe(self, accepted):
                pass

        return Policy()

    monkeypatch.setattr(calibrate, "caddtree_policy", policy_factory)
    return caps


def test_caddtree_cap(target, oracle, fake_caddtree):
    ref = stock(target, max_new_tokens=NEW)
    cases = [(dict(method="auto", tree_budget=8), 8),
             (dict(method="auto", tree_budget=np.int64(8), max_tree_budget=8), 8),
             (dict(method="auto"), 256),
             (dict(tree_budget="auto"), 256),
             (dict(tree_budget="auto", max_tree_budget=6), 6),
             (dict(method="auto", max_tree_budget=np.int32(5)), 5)]
    for kw, cap in cases:
        out = target.generate(PROMPT, assistant_model=oracle, do_sample=False, max_new_tokens=NEW,
                              return_dict_in_generate=True, **kw)
        assert torch.equal(out.sequences, ref), kw
        assert fake_caddtree[-1] == cap and type(fake_caddtree[-1]) is int, kw
        assert max(out.stats.tree_sizes) <= cap, kw


def test_tree_budget_contradictions_are_refused(target, oracle):
    with CountForwards(target, forbid=True):
        with pytest.raises(ValueError, match=r"max_tree_budget only applies to tree_budget='auto'.*method='ddtree'.*"
                                             r"Drop max_tree_budget"):
            target.generate(PROMPT, assistant_model=oracle, tree_budget=8, max_tree_budget=2, max_new_tokens=4)
        with pytest.raises(ValueError, match=r"max_tree_budget only applies.*method='dflash'"):
            target.generate(PROMPT, assistant_model=oracle, max_tree_budget=16, max_new_tokens=4)
        with pytest.raises(ValueError, match=r"method='auto' with tree_budget=8 caps CaDDTree at 8.*max_tree_budget=16"):
            target.generate(PROMPT, assistant_model=oracle, method="auto", tree_budget=8, max_tree_budget=16,
                            max_new_tokens=4)
        with pytest.raises(ValueError, match=r"max_tree_budget only applies.*method='d2sd'"):
            target.generate(PROMPT, assistant_model=(oracle, build_drafter(target)), tree_budget=8,
                            max_tree_budget=16, max_new_tokens=4)
        with pytest.raises(ValueError, match=r"need a DFlash drafter"):
            target.generate(PROMPT, max_tree_budget=16, max_new_tokens=4)
        for bad in (0, 5000, 2.0, True):
            with pytest.raises(ValueError, match=r"max_tree_budget"):
                target.generate(PROMPT, assistant_model=oracle, tree_budget="auto", max_tree_budget=bad)
            with pytest.raises(ValueError, match=r"tree_budget"):
                target.generate(PROMPT, assistant_model=oracle, method="auto", tree_budget=bad)


# ---- 10. any integral number ------------------------------------------------------------------

def test_integral_numbers_are_accepted(target, oracle, monkeypatch):
    seen = []
    loop = generate_module.speculative_decoding

    def spy(*a, **k):
        seen.append({key: k[key] for key in ("tree_budget", "d2sd_boundaries", "d2sd_alternatives") if key in k})
        return loop(*a, **k)

    monkeypatch.setattr(generate_module, "speculative_decoding", spy)
    ref = stock(target, max_new_tokens=NEW)
    for budget in (np.int64(8), np.uint8(8), torch.tensor(8).item()):
        out = target.generate(PROMPT, assistant_model=oracle, tree_budget=budget, do_sample=False, max_new_tokens=NEW)
        assert torch.equal(out, ref)
        assert seen[-1]["tree_budget"] == 8 and type(seen[-1]["tree_budget"]) is int
    out = target.generate(PROMPT, assistant_model=(oracle, build_drafter(target, seed=3)), method="d2sd",
                          tree_budget=np.int64(8), d2sd_boundaries=np.int64(2), d2sd_alternatives=np.int16(1),
                          do_sample=False, max_new_tokens=NEW)
    assert torch.equal(out, ref)
    assert seen[-1] == dict(tree_budget=8, d2sd_boundaries=2, d2sd_alternatives=1)
    assert all(type(v) is int for v in seen[-1].values())
    for name, bad in (("d2sd_boundaries", True), ("d2sd_alternatives", np.float64(1.0)), ("d2sd_boundaries", 0)):
        with pytest.raises(ValueError, match=name):
            target.generate(PROMPT, assistant_model=(oracle, oracle), tree_budget=8, max_new_tokens=4, **{name: bad})


# ---- 7. the returned cache, and what stopping criteria receive ----------------------------------

def assert_same_cache(got, want, length: int):
    assert int(got.get_seq_length()) == int(want.get_seq_length()) == length
    assert len(got.layers) == len(want.layers)
    for a, b in zip(got.layers, want.layers):
        torch.testing.assert_close(a.keys[..., :length, :], b.keys[..., :length, :], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values[..., :length, :], b.values[..., :length, :], atol=1e-5, rtol=1e-5)


def first_new_at(generated: list[int], lo: int = 3) -> int:
    return next(generated[k] for k in range(lo, len(generated) - 3) if generated[k] not in generated[:k])


@pytest.mark.parametrize("cache", CACHES)
def test_returned_cache_is_stocks(target, oracle, cache):
    eos = first_new_at(stock(target, max_new_tokens=NEW)[0, P:].tolist(), lo=5)
    embeds = target.get_input_embeddings()(PROMPT).detach()
    for extra in (dict(), dict(eos_token_id=eos, pad_token_id=eos), dict(inputs_embeds=embeds)):
        ids = None if "inputs_embeds" in extra else PROMPT
        offset = P if ids is None else 0
        ref = stock(target, ids, max_new_tokens=NEW, return_dict_in_generate=True, cache_implementation=cache, **extra)
        want = getattr(ref, CACHE_FIELD)
        assert want is not None
        for mode in MODES:
            out = target.generate(ids, assistant_model=oracle, do_sample=False, max_new_tokens=NEW,
                                  return_dict_in_generate=True, cache_implementation=cache, **mode, **extra)
            assert torch.equal(out.sequences, ref.sequences), (extra.keys(), mode)
            got = getattr(out, CACHE_FIELD)
            assert type(got) is type(want)
            assert_same_cache(got, want, offset + out.sequences.shape[1] - 1)
            if "eos_token_id" in extra and mode.get("tree_budget"):
                assert out.sequences.shape[1] < P + NEW  # stopped by EOS: the cut path's K/V are gone too
    if cache == "static":
        return  # stock's static cache is full (max_length - 1 slots): it cannot continue either
    # usable to continue, like stock's: one more generate() on top of each returns the same tokens
    ref = stock(target, max_new_tokens=NEW, return_dict_in_generate=True, cache_implementation=cache)
    out = target.generate(PROMPT, assistant_model=oracle, do_sample=False, max_new_tokens=NEW, tree_budget=8,
                          return_dict_in_generate=True, cache_implementation=cache)
    more_ref = stock(target, ref.sequences, max_new_tokens=6, **{CACHE_FIELD: getattr(ref, CACHE_FIELD)})
    more = stock(target, out.sequences, max_new_tokens=6, **{CACHE_FIELD: getattr(out, CACHE_FIELD)})
    assert torch.equal(more, more_ref)
    assert torch.equal(more, stock(target, max_new_tokens=NEW + 6))


class Record(StoppingCriteria):
    def __init__(self):
        self.calls = []

    def __call__(self, input_ids, scores, **kwargs):
        self.calls.append((input_ids.shape[1], scores if scores is None else tuple(scores)))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("output_scores", [True, False])
def test_stopping_criteria_receive_stocks_scores(target, oracle, output_scores):
    kw = dict(max_new_tokens=NEW, return_dict_in_generate=True, output_scores=output_scores, repetition_penalty=1.2)
    want = Record()
    stock(target, stopping_criteria=StoppingCriteriaList([want]), **kw)
    assert len(want.calls) == NEW
    for mode in MODES:
        got = Record()
        target.generate(PROMPT, assistant_model=oracle, do_sample=False, stopping_criteria=StoppingCriteriaList([got]),
                        **mode, **kw)
        assert [n for n, _ in got.calls] == [n for n, _ in want.calls] == list(range(P + 1, P + NEW + 1))
        for (_, g), (_, w) in zip(got.calls, want.calls):
            if not output_scores:
                assert g is None and w is None
                continue
            assert len(g) == len(w)  # the tuple of all processed scores so far
            for a, b in zip(g, w):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- 8. a DFlash drafter handed to stock generate() ---------------------------------------------

def test_drafter_in_stock_generate_after_disable(target):
    drafter = build_drafter(target, seed=5)
    hf_ddtree.disable(target)
    assert not hasattr(drafter, "generation_config")  # still an AttributeError: hasattr probes keep working
    with CountForwards(target, forbid=True), CountForwards(drafter, forbid=True):
        with pytest.raises(AttributeError, match=r"DFlash drafter, not a causal LM.*hf_ddtree\.enable\(target\).*"
                                                 r"speculation_type='dflash'"):
            target.generate(PROMPT, assistant_model=drafter, do_sample=False, max_new_tokens=4)
    # transformers' built-in DFlash chain runs the same drafter, losslessly
    out = target.generate(PROMPT, assistant_model=drafter, speculation_type="dflash", do_sample=False,
                          max_new_tokens=NEW)
    assert torch.equal(out, stock(target, max_new_tokens=NEW))


def test_default_cache_kind_and_the_one_asked_for(target):
    """Without a cache or cache_implementation the loop makes a StaticCache (cache.DEFAULT_CACHE_KIND, faster for
    tree rounds); cache_implementation="dynamic" gives a DynamicCache; the tokens are stock's either way."""
    from transformers import GenerationMixin
    from transformers.cache_utils import DynamicCache, StaticCache

    from hf_ddtree.cache import DEFAULT_CACHE_KIND

    assert DEFAULT_CACHE_KIND == "static"
    drafter = build_drafter(target, seed=5)
    stock_out = GenerationMixin.generate(target, PROMPT, max_new_tokens=6, do_sample=False)
    for kw, kind in (({}, StaticCache), (dict(cache_implementation="dynamic"), DynamicCache)):
        out = target.generate(PROMPT, assistant_model=drafter, tree_budget=4, max_new_tokens=6, do_sample=False,
                              return_dict_in_generate=True, **kw)
        assert type(getattr(out, CACHE_FIELD)) is kind, kw
        assert torch.equal(out.sequences, stock_out), kw
