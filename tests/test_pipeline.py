"""`pipeline("text-generation", model=target, tokenizer=tok, assistant_model=drafter)` runs hf_ddtree
without `assistant_tokenizer`: transformers' pipelines treat the assistant as sharing the target's
tokenizer when vocab_size and bos/eos/pad_token_id agree, so every drafter config hf_ddtree writes
(make_drafter_config, save_drafter, the shipped drafters) carries the target's ids."""

from __future__ import annotations

import json

import pytest
from transformers import pipeline

import hf_ddtree
from hf_ddtree import models
from hf_ddtree.drafter import SPECIAL_TOKEN_FIELDS, special_token_ids

from conftest import build_drafter, build_target
from test_generate_api import CHARS, char_tokenizer
from test_models_data import needs_target


class Forwards:
    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_pre_hook(lambda *a: setattr(self, "calls", self.calls + 1))


@pytest.fixture
def tiny():
    target = build_target("qwen3", "sdpa", seed=11)
    target.config.bos_token_id, target.config.eos_token_id, target.config.pad_token_id = 0, 63, 63
    return target, build_drafter(target, seed=3)


def test_drafter_config_carries_the_targets_special_ids(tiny, tmp_path):
    target, drafter = tiny
    assert special_token_ids(drafter.config) == {"bos_token_id": 0, "eos_token_id": 63, "pad_token_id": 63}
    # save_drafter writes the target's ids even into a config that lacks them (a drafter made before this)
    for name in SPECIAL_TOKEN_FIELDS:
        setattr(drafter.config, name, None)
    from hf_ddtree.hub import save_drafter

    out = save_drafter(drafter, tmp_path / "repo", target=target, custom_generate=False)
    saved = json.loads((out / "config.json").read_text())
    assert {k: saved[k] for k in SPECIAL_TOKEN_FIELDS} == special_token_ids(target.config)


@pytest.mark.parametrize("mode", [dict(tree_budget=8), dict()], ids=["ddtree", "dflash"])
def test_pipeline_without_assistant_tokenizer_matches_stock(tiny, mode):
    target, drafter = tiny
    tok = char_tokenizer()
    text = "abcXYZ0123hello"
    assert all(c in CHARS for c in text)
    want = pipeline("text-generation", model=target, tokenizer=tok)(text, max_new_tokens=16, do_sample=False)
    hf_ddtree.enable(target)
    seen = Forwards(drafter)
    try:
        pipe = pipeline("text-generation", model=target, tokenizer=tok, assistant_model=drafter)
        got = pipe(text, max_new_tokens=16, do_sample=False, **mode)
    finally:
        seen.handle.remove()
        hf_ddtree.disable(target)
    assert got == want
    assert seen.calls > 0  # our loop drafted (not a stock fallback)
    # the check the ids are for: a drafter whose config lacks them needs an assistant tokenizer in transformers
    drafter.config.eos_token_id = None
    with pytest.raises(ValueError, match="different tokenizer"):
        pipeline("text-generation", model=target, tokenizer=tok, assistant_model=drafter)


@pytest.mark.slow
@needs_target
def test_embedded_pair_in_a_chat_pipeline():
    target, tok = models.load_target()
    for variant in ("dflash", "prefix"):
        d = models.load_default_drafter(target, variant=variant)
        assert special_token_ids(d.config) == special_token_ids(target.config), variant
    drafter = models.load_default_drafter(target)
    chat = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    want = pipeline("text-generation", model=target, tokenizer=tok)(chat, max_new_tokens=24, do_sample=False)
    hf_ddtree.enable(target)
    seen = Forwards(drafter)
    try:
        got = pipeline("text-generation", model=target, tokenizer=tok, assistant_model=drafter)(
            chat, max_new_tokens=24, do_sample=False, tree_budget=16)
    finally:
        seen.handle.remove()
        hf_ddtree.disable(target)
    assert got == want and seen.calls > 0
