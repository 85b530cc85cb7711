"""The scripts under examples/ run as a user would run them, and do what they say."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import GenerationMixin

from test_models_data import needs_target

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@needs_target
def test_chat_example_carries_the_cache_and_matches_stock(monkeypatch, capsys):
    chat = load_example("chat")
    seen = {}
    real_enable = chat.hf_ddtree.enable

    def enable(target):  # the example's target, with each generate() call's prefill length recorded
        real_enable(target)
        lengths, prefills, inner = [], [], target.generate
        target.model.register_forward_pre_hook(lambda m, a, k: lengths.append(k["input_ids"].shape[1]), with_kwargs=True)

        def generate(*args, **kwargs):
            start = len(lengths)
            out = inner(*args, **kwargs)
            prefills.append(lengths[start])
            return out

        target.generate = generate
        seen.update(target=target, prefills=prefills)
        return target

    monkeypatch.setattr(chat.hf_ddtree, "enable", enable)
    turns = chat.main(["--greedy", "--max-new-tokens", "16"])
    printed = capsys.readouterr().out
    assert len(turns) == 3 and printed.count(">>> ") == 3 and "tokens per target forward" in printed
    previous = None
    for ids, full, _ in turns:
        if previous is not None:
            assert torch.equal(ids[:, :previous.shape[1]], previous)  # the conversation grows by appending
        want = GenerationMixin.generate(seen["target"], ids, max_new_tokens=16, do_sample=False)
        assert torch.equal(full, want)  # each turn is the target's own greedy answer
        previous = full
    # turn 1 reads its prompt; later turns only what the cache does not hold (the last answer token, the new message)
    want_prefills = [turns[0][0].shape[1]] + [ids.shape[1] - (prev.shape[1] - 1) for (ids, _, _), (_, prev, _)
                                              in zip(turns[1:], turns[:-1])]
    assert seen["prefills"] == want_prefills
    # sampled (the default) runs too
    assert len(chat.main(["--max-new-tokens", "8", "Hi!", "And then?"])) == 2


@pytest.mark.slow
@needs_target
def test_demo_reports_each_prompt_kind_and_the_mean(capsys):
    from hf_ddtree.cli import DEMO_PROMPTS, demo_main

    assert demo_main(["--dtype", "fp32", "--max-new-tokens", "12", "--threads", "1"]) == 0  # fp32: every text identical
    out = capsys.readouterr().out
    for kind, _ in DEMO_PROMPTS:
        assert f"| {kind} |" in out
    assert "| **all** |" in out and "fp32" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and ("x |" in line or "x** |" in line)]
    assert len(rows) == len(DEMO_PROMPTS) + 1 and all(line.endswith("| yes |") for line in rows), rows
