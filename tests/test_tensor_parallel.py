"""DDTree on a tensor-parallel target (transformers tp_plan="auto" under torchrun, 2 gloo ranks on CPU).

The 2-rank test is opt-in (HF_DDTREE_TEST_DIST=1, like tests/test_bench.py's 2-process test): torchrun
starts tests/tp_worker.py twice; each rank writes what it generated, and this process compares both
ranks with each other and with the same runs on the unsharded model here. The rest runs always.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_ddtree
from hf_ddtree import distributed
from hf_ddtree.compat import tensor_parallel_process_group, tensor_parallel_size, tp_style_shards_output

from conftest import build_drafter, build_target

sys.path.insert(0, str(Path(__file__).parent))
import tp_worker  # noqa: E402


# ---- always: ordinary targets are untouched, refusals that need no process group ---------------------

def test_ordinary_target_is_not_tensor_parallel():
    t = build_target()
    assert tensor_parallel_size(t) == 1 and tensor_parallel_process_group(t) is None
    assert distributed.tensor_parallel_group(t) is None and not distributed.is_tensor_parallel(t)
    d = build_drafter(t)
    gc = t.generation_config
    gc.max_length = 20
    assert distributed.check_tensor_parallel(t, torch.tensor([[1, 2]]), gc, (d, None), 4, "ddtree") is None
    # the leader helpers are the plain computation without a group
    assert distributed.leader_token(None, lambda: 7) == 7
    assert distributed.leader_walk(None, lambda: ([0, 2], 5), 4) == ([0, 2], 5)
    tree = object()
    assert distributed.leader_tree(None, tree) is tree


def test_sharded_drafter_is_refused_before_any_forward():
    t = build_target()
    d = build_drafter(t)
    d._tp_size = 2  # what from_pretrained(tp_plan=...) leaves on a sharded model
    calls = []
    t.register_forward_hook(lambda *a: calls.append(1))
    hf_ddtree.enable(t)
    with pytest.raises(ValueError, match="drafter is itself sharded"):
        t.generate(torch.tensor([[1, 2, 3]]), assistant_model=d, tree_budget=4, max_new_tokens=4)
    assert calls == []


def test_tp_style_output_sharding():
    assert tp_style_shards_output("colwise") is True
    assert tp_style_shards_output("colwise_gather_output") is False
    assert tp_style_shards_output("rowwise") is False
    assert tp_style_shards_output("no-such-style") is None


def test_calibrate_of_an_ordinary_target_is_plain_calibrate(monkeypatch):
    from hf_ddtree import budget, calibrate

    seen = []

    def fake(target, drafter=None, max_nodes=256, **kw):
        seen.append(max_nodes)
        return budget.LatencyModel.from_points([0, max_nodes], [1e-3, 2e-3], t_draft=1e-3)

    monkeypatch.setattr(calibrate, "calibrate", fake)
    t = build_target()
    policy = distributed.caddtree_policy(t, build_drafter(t), max_nodes=8)
    assert isinstance(policy, budget.CaDDTreePolicy) and seen == [8]


# ---- opt-in: 2 gloo ranks under torchrun -----------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp_models")
    target = build_target("qwen3", "sdpa", logit_scale=4.0)  # 4 heads, 2 KV heads: one KV head per rank
    build_drafter(target).save_pretrained(d / "drafter")
    target.save_pretrained(d / "target")
    return d


@pytest.mark.skipif(os.environ.get("HF_DDTREE_TEST_DIST") != "1",
                    reason="torchrun with 2 gloo ranks (~20-60 s of imports on a shared CPU); set HF_DDTREE_TEST_DIST=1")
@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                    reason="transformers' tp_plan needs accelerate: pip install 'hf_ddtree[tp]'")
def test_two_tensor_parallel_ranks_match_each_other_and_one_process(saved_models, tmp_path, monkeypatch):
    """DDTree, the DFlash chain, CaDDTree (twice: calibrating, then from the leader's disk cache) and D^2SD, static
    and dynamic caches, greedy and seeded sampling: both ranks produce the same tokens, trees and acceptance,
    equal to the same calls on the unsharded model in this process (and to plain AR); the refusals fire on
    both ranks before any forward."""
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           str(Path(__file__).parent / "tp_worker.py"), str(saved_models), str(out)]
    src = str(Path(hf_ddtree.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        o, e = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (o + e)[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    # the model really is sharded: each rank holds one of the two KV heads (its cache too)
    for r in ranks:
        assert r["tp_size"] == 2 and r["k_proj_rows"] == 16

    # one process, unsharded, same calls (its own calibration cache)
    monkeypatch.setenv("HF_DDTREE_CACHE", str(tmp_path / "cache-single"))
    target, drafter = tp_worker.load_pair(saved_models, tp=False)
    with torch.inference_mode():
        single = tp_worker.run_cases(target, drafter)

    a, b = ranks[0]["cases"], ranks[1]["cases"]
    assert a.keys() == b.keys() == single.keys()
    assert len(a) == 2 * (1 + len(tp_worker.CACHES) * (len(tp_worker.METHODS) + 1))
    for case in a:
        assert a[case] == b[case], case  # same tokens, same tree sizes, same acceptance on both ranks
        mode = case.split("/")[-2] if case.count("/") > 1 else case.split("/")[-1]
        # CaDDTree's budgets follow measured latencies (another process, other trees) and a sampled round draws
        # once per node, so only there do the sampled tokens differ from the single process
        if not (mode == "sample" and case.startswith("caddtree")):
            assert a[case]["tokens"] == single[case]["tokens"], case
        if mode == "greedy":  # lossless: AR's tokens (sampled: the same law, not AR's draws: all nodes draw at once)
            assert a[case]["tokens"] == single[f"ar/{mode}"]["tokens"], case
        if not case.startswith(("caddtree", "ar")):  # fixed trees: same rounds as the single process
            assert a[case]["tree_sizes"] == single[case]["tree_sizes"], case
    assert a["ar/greedy"]["tokens"] != a["ar/sample"]["tokens"]  # sampling really sampled

    # CaDDTree's latency model: calibrated once per cache kind the calls use, written by the leader only; the
    # second run read it
    assert len(ranks[0]["cache_files"]) == len(tp_worker.CACHES) and ranks[1]["cache_files"] == []

    assert ranks[0]["refusals"]["one_rank_refuses"].startswith("Rank 1 of the tensor-parallel target refused")
    for r in ranks:
        ref = r["refusals"]
        assert "same generate() call" in ref["different_prompts"] and "prompt" in ref["different_prompts"]
        assert "max_time" in ref["max_time"]
        assert "batch size 2" in ref["batch"] and "once per prompt" in ref["batch"]
        assert "drafter is on meta" in ref["one_rank_refuses"] and "drafter.to(target.device)" in ref["one_rank_refuses"]
        assert "itself sharded" in ref["sharded_drafter"]
        assert "'colwise'" in ref["vocab_split_logits"] and "colwise_gather_output" in ref["vocab_split_logits"]


# ---- hf-ddtree bench --tp N ------------------------------------------------------------------------

def test_bench_tp_needs_as_many_ranks(capsys, monkeypatch):
    from hf_ddtree.bench.cli import bench_main

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit) as e:
        bench_main(["--tp", "2", "--out", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--tp 2 needs exactly 2 ranks" in err and "torchrun --nproc-per-node 2" in err


def test_bench_tp_divergence_names_the_rows():
    from hf_ddtree.bench.cli import tp_divergence

    row = {"prompt_index": 0, "method": "ddtree:4", "temperature": 0.0, "output_ids": [1, 2]}
    assert tp_divergence([[row], [dict(row)]]) == []
    assert tp_divergence([[row], [{**row, "output_ids": [1, 3]}]]) == [
        "prompt 0 ddtree:4 T=0: rank 1 differs from rank 0"]


@pytest.mark.skipif(os.environ.get("HF_DDTREE_TEST_DIST") != "1",
                    reason="torchrun with 2 gloo ranks (~20-60 s of imports on a shared CPU); set HF_DDTREE_TEST_DIST=1")
@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                    reason="transformers' tp_plan needs accelerate: pip install 'hf_ddtree[tp]'")
def test_bench_tp_two_ranks(saved_models, tmp_path):
    """`torchrun --nproc-per-node 2 -m hf_ddtree.cli bench --tp 2`: every rank decodes every prompt, rank 0
    writes the usual tables; greedy rows identical to AR, both ranks agreed on every row."""
    prompts = saved_models / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "input_ids": p}) + "\n"
                               for i, p in enumerate([tp_worker.PROMPT, tp_worker.SECOND_PROMPT])))
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "hf_ddtree.cli", "bench",
           "--tp", "2", "--target", str(saved_models / "target"), "--drafter", str(saved_models / "drafter"),
           "--dataset", str(prompts), "--methods", "ar,ddtree:4,caddtree", "--max-tree-budget", "8",
           "--max-new-tokens", "6", "--temperature", "0,1", "--warmup", "0", "--no-plots", "--no-progress",
           "--dtype", "fp32", "--out", str(out)]
    src = str(Path(hf_ddtree.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_DDTREE_CACHE": str(tmp_path / "c"),
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "| caddtree |" in proc.stdout and "target tensor-parallel" in proc.stdout
    data = json.loads((out / "results.json").read_text())
    cfg = data["config"]
    assert cfg["tensor_parallel"] == 2 and cfg["world_size"] == 2 and cfg["tp_ranks_identical"] is True
    assert cfg["rank_errors"] == [] and [r["prompts"] for r in cfg["ranks"]] == [2, 2]  # no prompt split
    rows = data["rows"]
    assert len(rows) == 2 * 2 * 3 and {r["rank"] for r in rows} == {0}
    assert all(r["status"] == "ok" for r in rows)
    assert all(r["identical_to_ar"] for r in rows if r["temperature"] == 0)
