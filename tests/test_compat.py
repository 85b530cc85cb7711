"""hf_ddtree.compat: the one place that follows transformers' API as it moves (5.17 .. newest).

These run on whichever transformers is installed; CI runs the suite on both ends of the range.
"""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
from torch import nn
from transformers.utils import logging as hf_logging

import hf_ddtree
from hf_ddtree import compat
from hf_ddtree.drafter import drafter_spec

from conftest import build_drafter, build_target


def test_cache_kwarg_follows_each_forward_signature():
    target = build_target("llama")
    params = inspect.signature(type(target).forward).parameters
    expected = "cache" if "cache" in params else "past_key_values"
    assert compat.cache_kwarg(target) == expected

    class OldStyle(nn.Module):  # remote code that kept the pre-5.24 name
        def forward(self, x, past_key_values=None):
            return x

    class NewStyle(nn.Module):
        def forward(self, x, cache=None):
            return x

    assert compat.cache_kwargs(OldStyle(), "C") == {"past_key_values": "C"}
    assert compat.cache_kwargs(NewStyle(), "C") == {"cache": "C"}
    # our drafter takes both names; it is called with the new one
    assert compat.cache_kwarg(build_drafter(target)) == "cache"


def test_cache_from_kwargs_reads_either_name():
    assert compat.cache_from_kwargs({"cache": 1}) == 1
    assert compat.cache_from_kwargs({"past_key_values": 2}) == 2
    assert compat.cache_from_kwargs({"cache": None, "past_key_values": 3}) == 3
    assert compat.cache_from_kwargs({}) is None


@pytest.mark.parametrize("layer_ids", [[0, 1], [0, 2], [1]])
def test_drafter_context_features_are_the_selected_decoder_layers(layer_ids):
    """The prefill features handed to the drafter equal output_hidden_states=True's layers
    (5.17-5.22 index a list selection differently: the wrong layer, or an IndexError)."""
    target = build_target("qwen3", layers=3)
    drafter = build_drafter(target, target_layer_ids=layer_ids)
    seen = []
    drafter.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["target_hidden"].clone()), with_kwargs=True)
    hf_ddtree.enable(target)
    prompt = torch.tensor([[3, 9, 4, 11, 7]])
    target.generate(prompt, assistant_model=drafter, tree_budget=4, max_new_tokens=3)
    with torch.no_grad():
        full = target(prompt, output_hidden_states=True).hidden_states
    expected = torch.cat([full[i + 1][0] for i in layer_ids], dim=-1)  # (P, F)
    assert drafter_spec(drafter).hidden_state_indices == [i + 1 for i in layer_ids]
    torch.testing.assert_close(seen[0][0], expected, rtol=0, atol=0)


def test_no_transformers_deprecation_in_a_decode():
    """No FutureWarning (pytest turns those into errors) and no deprecation log line from transformers."""
    target = hf_ddtree.enable(build_target("llama"))
    drafter = build_drafter(target)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.WARNING)
    root = hf_logging.get_logger("transformers")
    root.addHandler(handler)
    try:
        for kw in (dict(tree_budget=4), dict(), dict(tree_budget=4, cache_implementation="dynamic")):
            target.generate(torch.tensor([[1, 2, 3]]), assistant_model=drafter, max_new_tokens=6, **kw)
    finally:
        root.removeHandler(handler)
    deprecations = [r.getMessage() for r in records if "deprecat" in r.getMessage().lower()]
    assert deprecations == []


def test_no_submodule_is_shadowed_by_a_package_attribute():
    """`import hf_ddtree.<module> as m` gives the module (the package re-exports a function named
    `generate`: no module may carry that name, or any other re-exported name)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(hf_ddtree.__path__):
        module = importlib.import_module(f"hf_ddtree.{info.name}")
        if hasattr(hf_ddtree, info.name):
            assert getattr(hf_ddtree, info.name) is module, info.name
    import hf_ddtree.decoding as decoding

    assert callable(hf_ddtree.generate) and decoding.generate is hf_ddtree.generate
