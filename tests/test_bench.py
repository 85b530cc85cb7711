"""hf_ddtree.bench on a tiny random pair: schema of the outputs, greedy identity (a real losslessness
check through the benchmark path), AR invariants, plots, shard/merge, CLI (in-process and torchrun)."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from hf_ddtree import DFlashDraftModel, make_drafter_config
from hf_ddtree.bench import merge_rows, parse_methods, run_benchmark, shard_prompts, summarize, write_results
from hf_ddtree.bench.runner import prepare_prompts

VOCAB = HIDDEN = 64
METHODS = "ar,dflash,ddtree:4,ddtree:16,caddtree,ddtree-lookup:4,caddtree-lookup,pld,hf-dflash"
OURS = ("ar", "dflash", "ddtree", "caddtree", "ddtree-lookup", "caddtree-lookup")
TEMPS = (0.0, 1.0)
NEW = 12


def tiny_target(seed: int = 0):
    """Tiny random Qwen3; orthonormal lm_head rows keep greedy argmax gaps far above fp32 noise."""
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=HIDDEN // 4, max_position_embeddings=512,
                      tie_word_embeddings=False, initializer_range=0.1, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM._from_config(cfg, attn_implementation="sdpa").float().eval()
    q, _ = torch.linalg.qr(torch.randn(HIDDEN, VOCAB, generator=torch.Generator().manual_seed(seed + 1)))
    with torch.no_grad():
        model.lm_head.weight.copy_(q.T)
    gc = model.generation_config
    gc.bos_token_id = gc.eos_token_id = gc.pad_token_id = None
    return model


def tiny_drafter(target, seed: int = 1):
    torch.manual_seed(seed)
    cfg = make_drafter_config(target.config, num_hidden_layers=1, block_size=8, mask_token_id=VOCAB - 1,
                              target_layer_ids=[0, 1])
    cfg.initializer_range = 0.1
    return DFlashDraftModel(cfg).float().eval()


def tiny_prefix_drafter(target, seed: int = 2, target_layer_ids=(0, 1)):
    """A second tiny random drafter, flagged variable-prefix like a `--prefix-mode` one (D^2SD's drafter 2)."""
    torch.manual_seed(seed)
    cfg = make_drafter_config(target.config, num_hidden_layers=1, block_size=8, mask_token_id=VOCAB - 1,
                              target_layer_ids=list(target_layer_ids))
    cfg.initializer_range = 0.1
    cfg.dflash_config = {**cfg.dflash_config, "variable_prefix": True}
    return DFlashDraftModel(cfg).float().eval()


def tiny_prompts(n_per_dataset: int = 2, datasets=("code", "math"), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for ds in datasets:
        for i in range(n_per_dataset):
            ids = torch.randint(0, VOCAB - 2, (int(torch.randint(6, 14, (1,), generator=g)),), generator=g)
            out.append({"id": f"{ds}-{i}", "dataset": ds, "input_ids": ids.tolist()})
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_fake_calibration():
    """One torch thread (tiny models, shared machine), and a synthetic CaDDTree latency model instead of
    timing one: the policy, truncation and generate path stay real, only calibration is skipped."""
    from hf_ddtree import budget, calibrate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    real = calibrate.calibrate

    def fake_calibrate(target, drafter=None, max_nodes=256, **kw):
        ns = calibrate.default_sizes(max_nodes)
        return budget.LatencyModel.from_points(ns, [1e-3 * (1 + 0.05 * n) for n in ns], t_draft=5e-4)

    calibrate.calibrate = fake_calibrate
    yield
    calibrate.calibrate = real
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair():
    t = tiny_target()
    return t, tiny_drafter(t)


@pytest.fixture(scope="module")
def bench(pair, tmp_path_factory):
    target, drafter = pair
    rows = run_benchmark(target, None, drafter, tiny_prompts(1), METHODS, temperatures=TEMPS, max_new_tokens=NEW,
                         seed=0, warmup=1, max_tree_budget=16, progress=False)
    out = tmp_path_factory.mktemp("bench")
    config = {"command": "test", "target": "tiny", "drafter": "tiny", "dtype": "fp32", "max_new_tokens": NEW,
              "device": "cpu", "threads": 1, "world_size": 1, "torch": torch.__version__, "transformers": "x"}
    res = write_results(out, config, rows, [m.name for m in parse_methods(METHODS)])
    return rows, res, out


# ---- methods --------------------------------------------------------------------------------------

def test_parse_methods_and_bad_name():
    ms = parse_methods("ddtree:64,dflash,caddtree,ddtree:64")
    assert [m.name for m in ms] == ["ar", "ddtree:64", "dflash", "caddtree"]  # ar added first, dupes dropped
    assert ms[1].budget == 64 and ms[1].tree_budget == 64 and ms[3].tree_budget == "auto"
    for bad in ("ddtre:4", "ddtree", "ddtree:0", "ddtree:x", "beam"):
        with pytest.raises(ValueError) as e:
            parse_methods(f"ar,{bad}")
        msg = str(e.value)
        assert repr(bad) in msg
        for valid in ("ar", "dflash", "ddtree:N", "caddtree", "d2sd:N", "d2sd-tree:N", "pld", "hf-dflash"):
            assert valid in msg
    ms = parse_methods("ddtree-lookup:16,caddtree-lookup")
    assert [(m.name, m.kind, m.tree_budget) for m in ms[1:]] == [
        ("ddtree-lookup:16", "ddtree-lookup", 16), ("caddtree-lookup", "caddtree-lookup", "auto")]
    for bad in ("ddtree-lookup", "ddtree-lookup:0", "caddtree-lookup:16"):
        with pytest.raises(ValueError, match=repr(bad)):
            parse_methods(bad)
    ms = parse_methods("d2sd-tree:8,d2sd:8,D2SD:8")
    assert [(m.name, m.kind, m.tree_budget, m.needs_drafter2) for m in ms] == [
        ("ar", "ar", None, False), ("d2sd-tree:8", "d2sd-tree", 8, True), ("d2sd:8", "d2sd", 8, True)]
    for bad in ("d2sd", "d2sd-tree", "d2sd:0", "d2sd-tree:x", "d2sd-chain:8"):
        with pytest.raises(ValueError, match=repr(bad)):
            parse_methods(bad)


def test_cli_bad_method_exits_with_valid_list(capsys):
    from hf_ddtree.bench.cli import bench_main

    with pytest.raises(SystemExit) as e:
        bench_main(["--methods", "ar,medusa", "--out", "unused"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'medusa'" in err and "ddtree:N" in err and "hf-dflash" in err and "d2sd-tree:N" in err
    with pytest.raises(SystemExit) as e:
        bench_main(["--methods", "ar,d2sd:8", "--d2sd-boundaries", "0", "--out", "unused"])
    assert e.value.code == 2 and "--d2sd-boundaries" in capsys.readouterr().err


# ---- one benchmark run ----------------------------------------------------------------------------

def test_rows_one_per_prompt_temperature_method(bench):
    rows, _, _ = bench
    names = [m.name for m in parse_methods(METHODS)]
    assert len(rows) == 2 * len(TEMPS) * len(names)
    assert {(r["prompt_index"], r["temperature"], r["method"]) for r in rows} == {
        (i, t, m) for i in range(2) for t in TEMPS for m in names}
    # prompt-major: every method of prompt 0 before any row of prompt 1; AR first within a prompt
    assert [r["prompt_index"] for r in rows] == sorted(r["prompt_index"] for r in rows)
    assert rows[0]["method"] == "ar"


def test_greedy_identity_is_exact_for_our_methods(bench):
    rows, res, _ = bench
    for r in rows:
        if r["kind"] in OURS:
            assert r["status"] == "ok", (r["method"], r["reason"])
            assert r["new_tokens"] == NEW
            if r["temperature"] == 0:
                assert r["identical_to_ar"] is True, (r["method"], r["dataset"], r["prompt_id"], r["first_mismatch"])
    for s in res["summary"]:
        if s["kind"] in OURS and s["temperature"] == 0:
            assert s["identity_vs_ar"] == 1.0 and s["n_mismatches"] == 0, s
        if s["temperature"] > 0:
            assert s["identity_vs_ar"] is None


def test_ar_acceptance_and_speedup_are_one(bench):
    rows, res, _ = bench
    for r in rows:
        if r["kind"] == "ar":
            assert r["acceptance_lengths"] == [1] * (NEW - 1)
            assert r["mean_acceptance_length"] == 1.0 and r["target_forwards"] == NEW
    ar = [s for s in res["summary"] if s["kind"] == "ar"]
    assert ar and all(s["mean_acceptance_length"] == 1.0 and s["speedup_vs_ar"] == 1.0 for s in ar)


def test_acceptance_accounting(bench):
    rows, _, _ = bench
    for r in rows:
        if r["status"] != "ok" or r["acceptance_lengths"] is None:
            continue
        acc = r["acceptance_lengths"]
        assert all(a >= 1 for a in acc)
        assert sum(acc) == r["new_tokens"] - 1, r["method"]  # prefill gives the first token
        assert r["rounds"] == len(acc) == r["target_forwards"] - 1
        if r["kind"] in ("dflash", "ddtree", "caddtree"):
            assert len(r["tree_sizes"]) == len(acc)
            assert all(r[k] is not None and r[k] >= 0 for k in ("prefill_s", "draft_s", "tree_s", "verify_s", "commit_s"))
        if r["kind"] == "ddtree":
            assert max(r["tree_sizes"]) <= r["tree_budget"] + 1
        if r["kind"] == "caddtree":
            assert max(r["tree_sizes"]) <= 16 + 1


def test_baselines_run_or_are_skipped_with_reason(bench):
    rows, res, _ = bench
    for kind in ("pld", "hf-dflash"):
        sel = [r for r in rows if r["kind"] == kind]
        assert sel
        for r in sel:
            assert r["status"] in ("ok", "skipped")
            if r["status"] == "skipped":
                assert r["reason"] and res["summary"]
    # on this pair both run (hf-dflash through the adapter unless the drafter speaks transformers' DFlash)
    assert all(r["status"] == "ok" for r in rows if r["kind"] in ("pld", "hf-dflash"))


def test_results_json_schema(bench):
    _, _, out = bench
    data = json.loads((out / "results.json").read_text())
    assert set(data) == {"schema_version", "config", "skipped", "summary", "rows"}
    assert data["schema_version"] == 1 and data["config"]["command"] == "test"
    row_types = {
        "prompt_id": str, "dataset": str, "prompt_index": int, "prompt_tokens": int, "method": str, "kind": str,
        "temperature": float, "seed": int, "rank": int, "status": str, "new_tokens": int, "time_s": float,
        "tokens_per_s": float, "target_forwards": int, "rounds": int, "acceptance_lengths": list,
        "mean_acceptance_length": float, "output_ids": list,
    }
    for r in data["rows"]:
        for k, ty in row_types.items():
            assert isinstance(r[k], ty), (k, r[k])
        for k in ("reason", "note", "tree_sizes", "prefill_s", "draft_s", "tree_s", "verify_s", "commit_s",
                  "identical_to_ar", "first_mismatch", "tree_budget"):
            assert k in r
    from hf_ddtree.bench.report import SUMMARY_FIELDS

    for s in data["summary"]:
        assert set(s) == set(SUMMARY_FIELDS)
        if s["status"] == "ok":
            assert isinstance(s["time_s"], float) and isinstance(s["tokens_per_s"], float)
            assert isinstance(s["speedup_vs_ar"], float) and isinstance(s["mean_acceptance_length"], float)
            assert isinstance(s["mismatches"], list)


def test_results_csv_one_row_per_dataset_method_temperature(bench):
    _, _, out = bench
    with open(out / "results.csv") as f:
        recs = list(csv.DictReader(f))
    from hf_ddtree.bench.report import SUMMARY_FIELDS

    assert list(recs[0]) == list(SUMMARY_FIELDS)
    names = [m.name for m in parse_methods(METHODS)]
    keys = [(r["dataset"], r["method"], float(r["temperature"])) for r in recs]
    assert len(keys) == len(set(keys)) == (2 + 1) * len(names) * len(TEMPS)  # datasets + "all"
    assert set(keys) == {(d, m, t) for d in ("code", "math", "all") for m in names for t in TEMPS}
    for r in recs:
        assert r["status"] == "ok"
        float(r["speedup_vs_ar"]), float(r["tokens_per_s"]), float(r["mean_acceptance_length"])
        if r["method"] == "ar":
            assert float(r["speedup_vs_ar"]) == 1.0 and float(r["mean_acceptance_length"]) == 1.0


def test_overall_summary_pools_datasets(bench):
    _, res, _ = bench
    by = {(s["dataset"], s["method"], s["temperature"]): s for s in res["summary"]}
    for (ds, m, t), s in by.items():
        if ds != "all":
            continue
        parts = [by[(d, m, t)] for d in ("code", "math")]
        assert s["n_prompts"] == sum(p["n_prompts"] for p in parts) == 2
        assert s["new_tokens"] == sum(p["new_tokens"] for p in parts)
        assert s["time_s"] == pytest.approx(sum(p["time_s"] for p in parts))
        assert s["speedup_vs_ar"] == pytest.approx(s["ar_time_s"] / s["time_s"])


def test_markdown_and_plots(bench):
    _, res, out = bench
    md = (out / "summary.md").read_text()
    assert md == res["markdown"]
    assert "| method | acceptance length | tok/s | speedup vs AR | identical to AR |" in md
    for m in ("ddtree:16", "caddtree", "hf-dflash", "pld"):
        assert f"| {m} |" in md
    for name in ("speedup_vs_budget.png", "acceptance_hist.png"):
        p = out / name
        assert p.is_file() and p.stat().st_size > 2000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- skip path ------------------------------------------------------------------------------------

def test_failing_baseline_is_skipped_not_fatal(pair):
    target, drafter = pair
    from hf_ddtree.bench import runner

    real = runner._MethodRunner._call_hf_dflash

    def broken(self, model, ids, kw):
        raise RuntimeError("no DFlash here")

    runner._MethodRunner._call_hf_dflash = broken
    try:
        rows = run_benchmark(target, None, drafter, tiny_prompts(1, ("x",)), "ar,hf-dflash,ddtree:4",
                             max_new_tokens=6, warmup=1, progress=False, log=lambda s: None)
    finally:
        runner._MethodRunner._call_hf_dflash = real
    st = {r["method"]: r for r in rows}
    assert st["hf-dflash"]["status"] == "skipped" and "no DFlash here" in st["hf-dflash"]["reason"]
    assert st["ddtree:4"]["status"] == "ok" and st["ddtree:4"]["identical_to_ar"] is True
    s = {x["method"]: x for x in summarize(rows) if x["dataset"] == "all"}
    assert s["hf-dflash"]["status"] == "skipped" and s["hf-dflash"]["speedup_vs_ar"] is None


def test_a_differing_output_reports_where_and_the_targets_margin_there(pair, monkeypatch, tmp_path):
    """bf16 can round a near-tie the other way: the row says where the output first differs and the target's
    top-2 logit margin there (from a plain forward of the shared prefix), the summary and markdown carry it."""
    target, drafter = pair
    from hf_ddtree.bench import runner
    from hf_ddtree.bench.report import format_markdown

    real = runner._MethodRunner.run

    def flip_fourth_token(self, method, ids, temperature, max_new_tokens):  # a stand-in for a rounding difference
        res = real(self, method, ids, temperature, max_new_tokens)
        if method.kind == "ddtree" and len(res["output_ids"]) > 3:
            out = list(res["output_ids"])
            out[3] = (out[3] + 1) % target.config.vocab_size
            res = {**res, "output_ids": out}
        return res

    monkeypatch.setattr(runner._MethodRunner, "run", flip_fourth_token)
    prompts = tiny_prompts(1, ("x",))
    rows = run_benchmark(target, None, drafter, prompts, "ar,ddtree:4", max_new_tokens=8, warmup=0, progress=False,
                         log=lambda s: None)
    ar, ours = rows
    assert ours["identical_to_ar"] is False and ours["first_mismatch"] == 3
    ids = torch.tensor([prompts[0]["input_ids"] + ar["output_ids"][:3]])
    with torch.no_grad():
        logits = target(input_ids=ids).logits[0, -1]
    top = logits.topk(2).values
    assert ours["mismatch_margin"] == pytest.approx(float(top[0] - top[1]), abs=1e-5)
    assert ours["mismatch_gap"] == pytest.approx(float(logits[ar["output_ids"][3]] - logits[ours["output_ids"][3]]),
                                                 abs=1e-5)
    assert ours["mismatch_gap"] > 0  # AR's token is the target's argmax there
    s = next(x for x in summarize(rows) if x["dataset"] == "all" and x["method"] == "ddtree:4")
    assert s["n_mismatches"] == 1 and s["max_mismatch_margin"] == pytest.approx(ours["mismatch_margin"])
    assert "@3 (margin " in s["mismatches"][0]
    assert "top-2 margin there <=" in format_markdown(summarize(rows))
    assert runner.mismatch_margin(target, prompts[0]["input_ids"], [1, 2], [1], 1) == (None, None)  # stopped earlier


# ---- D^2SD (two drafters) ------------------------------------------------------------------------

D2SD_METHODS = "ar,ddtree:8,d2sd:8,d2sd-tree:8"


@pytest.fixture(scope="module")
def d2sd_bench(pair, tmp_path_factory):
    target, drafter = pair
    rows = run_benchmark(target, None, drafter, tiny_prompts(1), D2SD_METHODS, temperatures=TEMPS,
                         max_new_tokens=NEW, warmup=1, drafter2=tiny_prefix_drafter(target), d2sd_boundaries=2,
                         progress=False, log=lambda s: None)
    out = tmp_path_factory.mktemp("bench_d2sd")
    res = write_results(out, {"command": "test"}, rows, [m.name for m in parse_methods(D2SD_METHODS)])
    return rows, res, out


def test_d2sd_rows_identity_and_accounting(d2sd_bench):
    rows, res, _ = d2sd_bench
    for name, kind in (("d2sd:8", "d2sd"), ("d2sd-tree:8", "d2sd-tree")):
        sel = [r for r in rows if r["method"] == name]
        assert len(sel) == 2 * len(TEMPS)
        for r in sel:
            assert r["status"] == "ok", r["reason"]
            assert r["kind"] == kind and r["tree_budget"] == 8 and r["note"] is None
            assert r["new_tokens"] == NEW
            if r["temperature"] == 0:
                assert r["identical_to_ar"] is True, (name, r["prompt_id"], r["first_mismatch"])
            acc = r["acceptance_lengths"]
            assert all(a >= 1 for a in acc) and r["mean_acceptance_length"] >= 1
            assert sum(acc) == NEW - 1 and r["rounds"] == len(acc) == r["target_forwards"] - 1
            assert len(r["tree_sizes"]) == len(acc) and max(r["tree_sizes"]) <= 8 + 1
            assert all(r[k] is not None and r[k] >= 0 for k in ("prefill_s", "draft_s", "tree_s", "verify_s", "commit_s"))
        for s in res["summary"]:
            if s["method"] == name:
                assert s["status"] == "ok" and s["kind"] == kind and s["mean_acceptance_length"] >= 1
                assert s["speedup_vs_ar"] > 0 and s["other_s"] is not None
                if s["temperature"] == 0:
                    assert s["identity_vs_ar"] == 1.0 and s["n_mismatches"] == 0


def test_d2sd_in_files_and_own_plot_series(d2sd_bench, monkeypatch, tmp_path):
    rows, res, out = d2sd_bench
    with open(out / "results.csv") as f:
        recs = list(csv.DictReader(f))
    assert {(r["dataset"], r["method"]) for r in recs if r["kind"].startswith("d2sd")} == {
        (d, m) for d in ("code", "math", "all") for m in ("d2sd:8", "d2sd-tree:8")}
    data = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in data["rows"]} >= {"d2sd:8", "d2sd-tree:8"} and data["skipped"] == {}
    assert "| d2sd:8 |" in res["markdown"] and "| d2sd-tree:8 |" in res["markdown"]
    assert (out / "speedup_vs_budget.png").is_file()

    from matplotlib.axes import Axes

    from hf_ddtree.bench.report import plot_speedup_vs_budget

    labels = []
    real = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **kw: (labels.append(kw.get("label")), real(self, *a, **kw))[1])
    assert plot_speedup_vs_budget(res["summary"], tmp_path / "p.png")
    assert {"all: ddtree", "all: d2sd", "all: d2sd-tree"} <= set(labels)
    labels.clear()
    only = [s for s in res["summary"] if s["kind"] in ("ar", "d2sd")]  # d2sd alone still makes the plot
    assert plot_speedup_vs_budget(only, tmp_path / "q.png") and "all: d2sd" in labels


def test_d2sd_without_drafter2_is_skipped_with_reason(pair):
    target, drafter = pair
    rows = run_benchmark(target, None, drafter, tiny_prompts(1, ("x",)), "ar,d2sd:8,ddtree:4,d2sd-tree:8",
                         max_new_tokens=6, warmup=1, drafter2_error="no drafter here", progress=False,
                         log=lambda s: None)
    st = {r["method"]: r for r in rows}
    for m in ("d2sd:8", "d2sd-tree:8"):
        assert st[m]["status"] == "skipped" and "no drafter here" in st[m]["reason"]
        assert st[m]["output_ids"] is None and st[m]["identical_to_ar"] is None
    assert st["ddtree:4"]["status"] == "ok" and st["ddtree:4"]["identical_to_ar"] is True
    s = {x["method"]: x for x in summarize(rows) if x["dataset"] == "all"}
    assert s["d2sd:8"]["status"] == "skipped" and "no drafter here" in s["d2sd:8"]["reason"]
    from hf_ddtree.bench.cli import exit_code
    from hf_ddtree.bench.report import build_results

    assert build_results({}, rows, summarize(rows))["skipped"]["d2sd-tree:8"]["status"] == "skipped"
    assert exit_code(rows, "fp32") == 0  # a missing optional drafter is not a failure


def test_d2sd_plain_drafter2_runs_with_note(pair):
    target, drafter = pair
    rows = run_benchmark(target, None, drafter, tiny_prompts(1, ("x",)), "ar,d2sd:4", max_new_tokens=6, warmup=0,
                         drafter2=tiny_drafter(target, seed=3), progress=False, log=lambda s: None)
    r = rows[-1]
    assert r["status"] == "ok" and r["identical_to_ar"] is True and "variable_prefix" in r["note"]


# ---- sharding -------------------------------------------------------------------------------------

def test_shard_merge_roundtrip_synthetic():
    prompts = prepare_prompts(tiny_prompts(5, ("a", "b")))
    assert [p.index for p in prompts] == list(range(10))
    world = 3
    shards = [shard_prompts(prompts, r, world) for r in range(world)]
    assert sorted(p.index for s in shards for p in s) == list(range(10))
    assert [p.index for p in shards[1]] == [1, 4, 7]
    methods = ["ar", "dflash", "ddtree:4"]
    fake = lambda p, t, m, r: {"prompt_index": p.index, "temperature": t, "method": m, "rank": r}
    single = [fake(p, t, m, 0) for p in prompts for t in TEMPS for m in methods]
    parts = [[fake(p, t, m, r) for p in shards[r] for t in TEMPS for m in methods] for r in range(world)]
    merged = merge_rows(parts[::-1], methods)  # arrival order must not matter
    assert [(x["prompt_index"], x["temperature"], x["method"]) for x in merged] == \
           [(x["prompt_index"], x["temperature"], x["method"]) for x in single]
    with pytest.raises(ValueError):
        shard_prompts(prompts, 3, 3)


def test_sharded_runs_merge_to_the_single_run(pair):
    target, drafter = pair
    prompts = prepare_prompts(tiny_prompts(1, ("a", "b", "c"), seed=3))
    kw = dict(temperatures=(0.0, 1.0), max_new_tokens=6, warmup=0, seed=5, progress=False)
    full = run_benchmark(target, None, drafter, prompts, "ar,ddtree:4", **kw)
    parts = [run_benchmark(target, None, drafter, shard_prompts(prompts, r, 2), "ar,ddtree:4", rank=r, **kw)
             for r in range(2)]
    merged = merge_rows(parts, ["ar", "ddtree:4"])
    key = lambda r: (r["prompt_index"], r["temperature"], r["method"], r["seed"], r["output_ids"])
    assert [key(r) for r in merged] == [key(r) for r in full]  # same seeds per prompt => same samples for AR
    assert {r["rank"] for r in merged} == {0, 1}


# ---- command line -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_pair(pair, tmp_path_factory):
    target, drafter = pair
    d = tmp_path_factory.mktemp("models")
    target.save_pretrained(d / "target")
    drafter.save_pretrained(d / "drafter")
    with open(d / "prompts.jsonl", "w") as f:
        for p in tiny_prompts(2, ("j",), seed=7):
            f.write(json.dumps({"id": p["id"], "input_ids": p["input_ids"]}) + "\n")
    return d


def test_cli_d2sd(saved_pair, pair, tmp_path, monkeypatch, capsys):
    """--drafter2 DIR runs d2sd:N / d2sd-tree:N; --drafter2 default with no shipped prefix drafter, or a
    drafter2 that does not fit drafter 1, reports them as skipped with the reason (exit 0)."""
    from hf_ddtree import models
    from hf_ddtree.bench.cli import bench_main, build_parser, load_drafter2

    target, drafter = pair
    d2 = tmp_path / "drafter2"
    tiny_prefix_drafter(target).save_pretrained(d2)
    base = ["--target", str(saved_pair / "target"), "--drafter", str(saved_pair / "drafter"),
            "--dataset", str(saved_pair / "prompts.jsonl"), "--methods", "ar,d2sd:4,d2sd-tree:4",
            "--max-new-tokens", "6", "--temperature", "0", "--threads", "1", "--dtype", "fp32", "--warmup", "0", "--no-plots",
            "--no-progress"]
    assert bench_main(base + ["--drafter2", str(d2), "--d2sd-boundaries", "2", "--out", str(tmp_path / "a")]) == 0
    data = json.loads((tmp_path / "a" / "results.json").read_text())
    assert data["config"]["drafter2"] == str(d2) and data["config"]["d2sd_boundaries"] == 2
    assert [r["status"] for r in data["rows"]] == ["ok"] * 6 and all(r["identical_to_ar"] for r in data["rows"])

    monkeypatch.setattr(models, "_ASSETS", tmp_path / "no-assets")
    assert bench_main(base + ["--out", str(tmp_path / "b")]) == 0  # --drafter2 default
    capsys.readouterr()
    data = json.loads((tmp_path / "b" / "results.json").read_text())
    assert data["config"]["drafter2"] == "default"
    assert set(data["skipped"]) == {"d2sd:4", "d2sd-tree:4"}
    for r in data["rows"]:
        if r["kind"] == "ar":
            assert r["status"] == "ok"
        else:
            assert r["status"] == "skipped" and "train-drafter --prefix-mode --init-from-drafter" in r["reason"]

    bad = tmp_path / "bad"
    tiny_prefix_drafter(target, target_layer_ids=(0, 2)).save_pretrained(bad)
    args = build_parser().parse_args(["--methods", "d2sd:4", "--drafter2", str(bad), "--out", "x"])
    d, why = load_drafter2(args, target, drafter)
    assert d is None and "target layers" in why
    args = build_parser().parse_args(["--methods", "ddtree:4", "--drafter2", str(bad), "--out", "x"])
    assert load_drafter2(args, target, drafter) == (None, None)  # not needed: not loaded


def test_cli_in_process(saved_pair, tmp_path, capsys):
    from hf_ddtree.bench.cli import bench_main

    out = tmp_path / "run"
    argv = ["--target", str(saved_pair / "target"), "--drafter", str(saved_pair / "drafter"),
            "--dataset", str(saved_pair / "prompts.jsonl"), "--methods", "ar,dflash,ddtree:4,pld",
            "--max-new-tokens", "8", "--temperature", "0", "--threads", "1", "--no-progress", "--out", str(out),
            "--dtype", "fp32"]
    assert bench_main(argv) == 0
    printed = capsys.readouterr().out
    assert "| ddtree:4 |" in printed
    data = json.loads((out / "results.json").read_text())
    cfg = data["config"]
    assert cfg["argv"] == argv and cfg["command"].startswith("hf-ddtree bench --target")
    assert cfg["dtype"] == cfg["dtype_requested"] == "fp32" and cfg["threads"] == 1 and cfg["world_size"] == 1
    assert cfg["methods"] == ["ar", "dflash", "ddtree:4", "pld"] and cfg["datasets"] == ["prompts"]
    assert isinstance(cfg["device"], str) and cfg["device"] and cfg["torch"] == torch.__version__
    assert len(data["rows"]) == 2 * 4
    assert all(s["identity_vs_ar"] == 1.0 for s in data["summary"])


def test_cli_batch_size(pair, tmp_path, capsys):
    """--batch-size 1,2,3: every method on the same left-padded groups, against stock batched AR in the same run;
    greedy rows identical to AR, throughput and per-row acceptance reported, pld skipped with the reason."""
    from hf_ddtree.bench.cli import bench_main

    target, drafter = pair
    d = tmp_path / "m"
    target.save_pretrained(d / "target")
    drafter.save_pretrained(d / "drafter")
    with open(d / "prompts.jsonl", "w") as f:  # mixed lengths: the groups really are padded
        for i, p in enumerate(tiny_prompts(3, ("k",), seed=9)):
            f.write(json.dumps({"id": p["id"], "input_ids": p["input_ids"][: 3 + 2 * i]}) + "\n")
    out = tmp_path / "batch"
    argv = ["--target", str(d / "target"), "--drafter", str(d / "drafter"), "--dataset", str(d / "prompts.jsonl"),
            "--methods", "ar,ddtree:4,dflash,pld", "--batch-size", "1,2,3", "--max-new-tokens", "6", "--threads", "1", "--dtype", "fp32",
            "--warmup", "0", "--no-progress", "--no-plots", "--out", str(out)]
    assert bench_main(argv) == 0
    printed = capsys.readouterr().out
    assert "| 3 | ddtree:4 | 1 |" in printed
    assert "%" in printed.split("| 3 | ddtree:4 | 1 |")[1].splitlines()[0]  # the time split of our methods
    data = json.loads((out / "batch_results.json").read_text())
    assert data["config"]["batch_sizes"] == [1, 2, 3]
    groups = {(r["batch_size"], r["group"]) for r in data["rows"]}
    assert groups == {(1, 0), (1, 1), (1, 2), (2, 0), (3, 0)}
    for r in data["rows"]:
        if r["kind"] == "pld":
            assert r["status"] == "skipped" and "batch" in r["reason"]
            continue
        assert r["status"] == "ok" and r["identical_to_ar"] is True and r["tokens_per_s"] > 0
        assert len(r["row_new_tokens"]) == r["batch_size"] and r["new_tokens"] == sum(r["row_new_tokens"])
        if r["kind"] != "ar":
            assert len(r["row_acceptance"]) == r["batch_size"] and r["mean_acceptance_length"] >= 1
    summary = {(s["batch_size"], s["method"]): s for s in data["summary"]}
    assert summary[2, "ar"]["speedup_vs_ar"] == pytest.approx(1.0)
    assert summary[3, "ddtree:4"]["identical_to_ar"] is True and summary[3, "ddtree:4"]["speedup_vs_ar"] > 0
    with pytest.raises(SystemExit):
        bench_main(argv[:-1] + [str(out), "--temperature", "1"])  # greedy only
    with pytest.raises(ValueError, match="batch-size 4"):
        bench_main(["4" if a == "1,2,3" else a for a in argv])  # more rows than prompts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(os.environ.get("HF_DDTREE_TEST_DIST") != "1",
                    reason="2 fresh interpreters (~10-40 s of imports on a shared CPU); set HF_DDTREE_TEST_DIST=1")
def test_two_ranks_gloo_merge(saved_pair, tmp_path):
    """A real 2-process gloo run of the CLI with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR/PORT; the workers are started directly, without torchrun's extra agent
    process, to keep the test cheap): each rank takes half the prompts, rank 0 writes merged results."""
    out = tmp_path / "dp"
    port = str(_free_port())
    cmd = [sys.executable, "-m", "hf_ddtree.cli", "bench",
           "--target", str(saved_pair / "target"), "--drafter", str(saved_pair / "drafter"),
           "--dataset", str(saved_pair / "prompts.jsonl"), "--methods", "ar,ddtree:4", "--max-new-tokens", "6",
           "--warmup", "0", "--no-plots", "--no-progress", "--dtype", "fp32", "--out", str(out)]
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=85)
            results.append((p.returncode, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rc, err in results:
        assert rc == 0, err[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["world_size"] == 2 and [r["rank"] for r in data["config"]["ranks"]] == [0, 1]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert data["config"]["threads"] == max(1, cores // 2)  # 2 local ranks split the cores
    rows = data["rows"]
    assert [(r["prompt_index"], r["method"], r["rank"]) for r in rows] == [
        (0, "ar", 0), (0, "ddtree:4", 0), (1, "ar", 1), (1, "ddtree:4", 1)]
    assert all(r["identical_to_ar"] for r in rows)


def test_compile_option_schema(saved_pair, tmp_path, capsys):
    """--compile BACKEND: our methods run compiled, AR is measured twice (stock as it comes: 'ar'; stock with a
    static cache and the same compile setting: 'ar-static'), speedups are against the faster, named in ar_baseline."""
    from hf_ddtree.bench.cli import bench_main
    from hf_ddtree.bench.report import fastest_ar

    torch._dynamo.reset()
    out = tmp_path / "run"
    argv = ["--target", str(saved_pair / "target"), "--drafter", str(saved_pair / "drafter"),
            "--dataset", str(saved_pair / "prompts.jsonl"), "--methods", "ddtree:4", "--limit", "1",
            "--max-new-tokens", "8", "--temperature", "0", "--threads", "1", "--dtype", "fp32", "--no-progress", "--no-plots",
            "--compile", "eager", "--out", str(out)]
    assert bench_main(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["compile"] == "eager" and data["config"]["methods"] == ["ar", "ar-static", "ddtree:4"]
    assert [r["method"] for r in data["rows"]] == ["ar", "ar-static", "ddtree:4"]
    assert all(r["status"] == "ok" and r["identical_to_ar"] for r in data["rows"])
    summary = {s["method"]: s for s in data["summary"] if s["dataset"] == "all"}
    base = fastest_ar(data["rows"], 0.0)
    assert base in ("ar", "ar-static") and all(s["ar_baseline"] == base for s in summary.values())
    assert summary[base]["speedup_vs_ar"] == 1.0
    times = {r["method"]: r["time_s"] for r in data["rows"]}
    assert summary["ddtree:4"]["speedup_vs_ar"] == pytest.approx(times[base] / times["ddtree:4"])
    assert times[base] <= times["ar" if base == "ar-static" else "ar-static"]
    assert f"Speedups are against `{base}`" in printed
    with open(out / "results.csv") as f:
        assert "ar_baseline" in next(csv.reader(f))


def test_fastest_ar_picks_the_faster_baseline():
    from hf_ddtree.bench.report import fastest_ar

    def row(kind, i, t, status="ok"):
        return {"kind": kind, "prompt_index": i, "time_s": t, "status": status, "temperature": 0.0}

    assert fastest_ar([row("ar", 0, 2.0), row("ar", 1, 2.0)], 0.0) == "ar"
    assert fastest_ar([row("ar", 0, 2.0), row("ar-static", 0, 1.0), row("ar", 1, 2.0), row("ar-static", 1, 1.5)],
                      0.0) == "ar-static"
    # compared over the prompts both ran: ar-static failed on prompt 1
    assert fastest_ar([row("ar", 0, 1.0), row("ar-static", 0, 1.5), row("ar", 1, 9.0),
                       row("ar-static", 1, 0.1, "error")], 0.0) == "ar"


def test_dtype_auto_is_bf16_where_the_cpu_has_it(monkeypatch, capsys):
    from hf_ddtree import device as dev
    from hf_ddtree.bench.cli import build_parser, resolve_dtype_arg

    for flags, want in (({"avx2", "avx512_bf16", "avx512_vnni"}, "bf16"), ({"avx2", "fma"}, "fp32"),
                        ({"fp", "asimd", "bf16"}, "bf16"), (set(), "fp32")):
        monkeypatch.setattr(dev, "cpu_flags", lambda flags=flags: flags)
        dtype, why = dev.resolve_dtype("auto", "cpu")
        assert dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[want] and why.startswith(want), (flags, why)
        args = build_parser().parse_args(["--out", "x"])  # auto is the default
        lines = []
        resolve_dtype_arg(args, torch.device("cpu"), lines.append)
        assert (args.dtype, args.dtype_requested) == (want, "auto") and lines == [f"dtype: {why}"]
    assert dev.resolve_dtype("fp32", "cpu")[0] == torch.float32 and dev.resolve_dtype("bf16", "cpu")[0] == torch.bfloat16
    with pytest.raises(ValueError, match="--dtype 'fp16': use one of auto, fp32, bf16"):
        dev.resolve_dtype("fp16", "cpu")

