"""The generate() surface: prefix-dependent logits processors, streamer, return_dict / scores,
stop strings, and that enable()/disable() leave every other generate() call stock."""

from __future__ import annotations


import pytest
import torch
from transformers import GenerationConfig, GenerationMixin, PreTrainedTokenizerFast
from transformers.generation.streamers import BaseStreamer

import hf_ddtree

from conftest import CACHES, OracleDrafter, build_drafter, build_target

import hf_ddtree.decoding as generate_module  # the loop's module; `hf_ddtree.generate` is the functional form

NEW = 24
PROMPT = torch.tensor([[12, 40, 3, 33, 7, 50, 21]])
P = PROMPT.shape[1]
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/"  # one char per token id


def stock(target, ids=PROMPT, **kw):
    kw.setdefault("do_sample", False)
    return GenerationMixin.generate(target, ids, **kw)


@pytest.fixture
def target():
    return hf_ddtree.enable(build_target("qwen3", "sdpa", seed=11))


def first_new_at(generated: list[int], lo: int = 3) -> tuple[int, int]:
    for k in range(lo, len(generated) - 3):
        if generated[k] not in generated[:k]:
            return generated[k], k
    raise AssertionError(generated)


def drafters_for(target, reference):
    return {"oracle": OracleDrafter(target, reference), "random": build_drafter(target, seed=12)}


MODES = [dict(tree_budget=16), dict(tree_budget=64), dict()]


@pytest.mark.parametrize("proc", ["repetition_penalty", "no_repeat_ngram_size", "min_new_tokens", "all"])
def test_prefix_dependent_processors_match_stock(target, proc):
    kw = {"repetition_penalty": dict(repetition_penalty=1.3),
          "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
          "min_new_tokens": {},
          "all": dict(repetition_penalty=1.2, no_repeat_ngram_size=3)}[proc]
    if proc in ("min_new_tokens", "all"):
        plain = stock(target, max_new_tokens=NEW, **kw)
        eos, k = first_new_at(plain[0, P:].tolist(), lo=2)
        kw.update(eos_token_id=eos, pad_token_id=eos, min_new_tokens=k + 5)
    ref = stock(target, max_new_tokens=NEW, output_scores=True, return_dict_in_generate=True, **kw)
    unprocessed = stock(target, max_new_tokens=NEW)
    assert not torch.equal(ref.sequences, unprocessed), "the processor should change the output"
    long_ref = stock(target, max_new_tokens=NEW + 16, **{k: v for k, v in kw.items() if "token_id" not in k and k != "min_new_tokens"})
    oracle_ref = ref.sequences[0].tolist() + long_ref[0, ref.sequences.shape[1]:].tolist()
    for dname, drafter in drafters_for(target, oracle_ref).items():
        for mode in MODES:
            for cache in CACHES:
                out = target.generate(PROMPT, assistant_model=drafter, do_sample=False, max_new_tokens=NEW,
                                      cache_implementation=cache, return_dict_in_generate=True, output_scores=True,
                                      **mode, **kw)
                assert torch.equal(out.sequences, ref.sequences), (dname, mode, cache)
                assert len(out.scores) == len(ref.scores)
                for a, b in zip(out.scores, ref.scores):
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
                if dname == "oracle" and mode:
                    assert max(out.acceptance_lengths) >= 3  # processors were applied on multi-node paths


class Collect(BaseStreamer):
    def __init__(self):
        self.puts: list[list[int]] = []
        self.ends = 0

    def put(self, value):
        assert self.ends == 0, "put() after end()"
        self.puts.append([int(t) for t in value.reshape(-1).tolist()])

    def end(self):
        self.ends += 1


@pytest.mark.parametrize("eos", [False, True])
def test_streamer_gets_prompt_then_exactly_the_new_tokens(target, eos):
    kw = {}
    ref = stock(target, max_new_tokens=NEW)
    if eos:
        e, _ = first_new_at(ref[0, P:].tolist())
        kw = dict(eos_token_id=e, pad_token_id=e)
        ref = stock(target, max_new_tokens=NEW, **kw)
    stock_streamer = Collect()
    stock(target, max_new_tokens=NEW, streamer=stock_streamer, **kw)
    drafter = OracleDrafter(target, stock(target, max_new_tokens=NEW + 16)[0].tolist())
    for mode in MODES:
        s = Collect()
        out = target.generate(PROMPT, assistant_model=drafter, do_sample=False, max_new_tokens=NEW, streamer=s,
                              **mode, **kw)
        assert torch.equal(out, ref)
        assert s.puts[0] == PROMPT[0].tolist(), "the prompt comes first"
        assert [t for chunk in s.puts[1:] for t in chunk] == ref[0, P:].tolist(), "then exactly the new tokens, in order"
        assert s.ends == 1
        assert all(len(c) >= 1 for c in s.puts)
        if mode:
            assert max(len(c) for c in s.puts[1:]) > 1  # several tokens per round arrive together
    assert [t for chunk in stock_streamer.puts[1:] for t in chunk] == ref[0, P:].tolist()  # same stream as stock


def test_return_dict_scores_and_logits_match_stock(target):
    ref = stock(target, max_new_tokens=NEW, output_scores=True, output_logits=True, return_dict_in_generate=True,
                repetition_penalty=1.1)
    drafter = build_drafter(target, seed=5)
    for mode in MODES:
        out = target.generate(PROMPT, assistant_model=drafter, do_sample=False, max_new_tokens=NEW,
                              output_scores=True, output_logits=True, return_dict_in_generate=True,
                              repetition_penalty=1.1, **mode)
        assert isinstance(out, hf_ddtree.DDTreeGenerateOutput)
        assert torch.equal(out.sequences, ref.sequences)
        new = out.sequences.shape[1] - P
        assert len(out.scores) == len(out.logits) == new
        for got, want in ((out.scores, ref.scores), (out.logits, ref.logits)):
            for a, b in zip(got, want):
                assert a.shape == b.shape == (1, target.config.vocab_size)
                torch.testing.assert_close(a.float(), b.float(), atol=1e-5, rtol=1e-5)
        # one row per new token; the first new token comes from the prefill, the rest from rounds
        assert sum(out.acceptance_lengths) == new - 1
        assert out.stats.mean_acceptance_length == pytest.approx((new - 1) / len(out.acceptance_lengths))
    plain = target.generate(PROMPT, assistant_model=drafter, do_sample=False, max_new_tokens=NEW, tree_budget=4,
                            return_dict_in_generate=True)
    assert plain.scores is None and plain.logits is None


def char_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(CHARS)}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_stop_strings_stop_exactly_like_stock(target):
    tok = char_tokenizer()
    assert tok.decode([7, 8, 63]) == "hi/"
    gen = stock(target, max_new_tokens=NEW)[0, P:].tolist()
    text = "".join(CHARS[t] for t in gen)
    # a 2-character stop string whose first occurrence ends mid-sequence
    k = next(i for i in range(3, len(text) - 4) if text[i:i + 2] not in text[:i + 1])
    stop = text[k:k + 2]
    ref = stock(target, max_new_tokens=NEW, stop_strings=[stop], tokenizer=tok)
    assert ref.shape[1] == P + k + 2 and "".join(CHARS[t] for t in ref[0, P:].tolist()).endswith(stop)
    drafter = OracleDrafter(target, stock(target, max_new_tokens=NEW + 16)[0].tolist())
    for mode in MODES:
        out = target.generate(PROMPT, assistant_model=drafter, do_sample=False, max_new_tokens=NEW,
                              stop_strings=[stop], tokenizer=tok, **mode)
        assert torch.equal(out, ref), mode
        out = target.generate(PROMPT, assistant_model=drafter, tokenizer=tok,
                              generation_config=GenerationConfig(max_new_tokens=NEW, do_sample=False, stop_strings=stop),
                              **mode)
        assert torch.equal(out, ref), ("stop_strings via generation_config", mode)


def test_generation_config_object_is_honoured(target):
    ref = stock(target, max_new_tokens=NEW)
    drafter = build_drafter(target)
    out = target.generate(PROMPT, generation_config=GenerationConfig(max_new_tokens=NEW, do_sample=False),
                          assistant_model=drafter, tree_budget=8)
    assert torch.equal(out, ref)


def test_generate_without_assistant_is_stock_after_enable():
    plain = build_target("llama", "eager", seed=3)
    before = plain.generate(PROMPT, do_sample=False, max_new_tokens=NEW)
    torch.manual_seed(0)
    before_s = plain.generate(PROMPT, do_sample=True, max_new_tokens=8, temperature=1.0)
    hf_ddtree.enable(plain)
    assert torch.equal(plain.generate(PROMPT, do_sample=False, max_new_tokens=NEW), before)
    torch.manual_seed(0)
    assert torch.equal(plain.generate(PROMPT, do_sample=True, max_new_tokens=8, temperature=1.0), before_s)


def test_non_dflash_assistant_goes_to_stock_assisted_decoding(target, monkeypatch):
    ref = stock(target, max_new_tokens=NEW)
    assistant = build_target("qwen3", "sdpa", seed=21, layers=1)  # a regular small causal LM, same vocab
    calls = []
    original = type(target)._assisted_decoding

    def spy(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    def forbidden(*a, **k):
        raise AssertionError("hf_ddtree's loop must not run for a non-DFlash assistant")

    monkeypatch.setattr(type(target), "_assisted_decoding", spy)
    monkeypatch.setattr(generate_module, "speculative_decoding", forbidden)
    out = target.generate(PROMPT, assistant_model=assistant, do_sample=False, max_new_tokens=NEW)
    assert calls and torch.equal(out, ref)


def test_disable_restores_stock_generate(target):
    drafter = build_drafter(target)
    assert "generate" in vars(target) and target._hf_ddtree_enabled
    hf_ddtree.disable(target)
    assert "generate" not in vars(target) and not hasattr(target, "_hf_ddtree_enabled")
    assert target.generate.__func__ is type(target).generate
    with pytest.raises(ValueError, match="tree_budget"):  # stock generate() rejects the unknown kwarg
        target.generate(PROMPT, assistant_model=drafter, tree_budget=4, max_new_tokens=4)
    hf_ddtree.disable(target)  # idempotent
    hf_ddtree.enable(target)
    hf_ddtree.enable(target)  # and enabling twice is harmless
    out = target.generate(PROMPT, assistant_model=drafter, tree_budget=4, do_sample=False, max_new_tokens=NEW)
    assert torch.equal(out, stock(target, max_new_tokens=NEW))
    with pytest.raises(TypeError):
        hf_ddtree.enable(torch.nn.Linear(2, 2))
