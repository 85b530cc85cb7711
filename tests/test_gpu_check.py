"""benchmarks/gpu_check.py, rehearsed on CPU at tiny shapes (issue 19, item 8): the oracle drafter sets the
tokens per round, every run is identical to stock AR, and the report has one row per (mode, acceptance, budget)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_rehearsal_on_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert set(gpu_check.SHAPES) == {"real", "tiny", "hybrid", "hybrid-tiny"}
    real = gpu_check.SHAPES["real"]["target"]  # Qwen3-8B's shape
    assert (real["hidden_size"], real["num_hidden_layers"], real["vocab_size"]) == (4096, 36, 151936)
    rc = gpu_check.main(["--shape", "tiny", "--device", "cpu", "--dtype", "fp32", "--modes", "eager",
                         "--budgets", "8,32", "--accept", "1,3,6", "--new", "61", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = data["rows"]
    assert [(r["accept"], r["budget"]) for r in rows] == [(a, b) for a in (1, 3, 6) for b in (8, 32)]
    for r in rows:
        assert r["identical"], r
        # the oracle commits `accept` tokens per round (the last round may be cut by max_new_tokens; a random
        # wrong branch can add one by luck on a 256-token vocabulary)
        assert r["accept"] - 0.5 <= r["tau"] <= r["accept"] + 0.5, r
        assert r["round_ar_steps"] > 0 and r["speed_vs_ar"] > 0
    assert "| mode | tokens per round |" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_hybrid_rehearsal_on_cpu(tmp_path):
    """The hybrid case (issue 22): a Qwen3.5-shaped target, every run identical to stock AR."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    from transformers import Qwen3_5TextConfig

    real = Qwen3_5TextConfig(**gpu_check.SHAPES["hybrid"]["target"])
    assert real.layer_types.count("linear_attention") == 48 and real.layer_types.count("full_attention") == 16
    rc = gpu_check.main(["--shape", "hybrid-tiny", "--device", "cpu", "--dtype", "fp32", "--modes", "eager",
                         "--budgets", "8", "--accept", "1,4", "--new", "40", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert [r["accept"] for r in rows] == [1, 4] and all(r["identical"] for r in rows)
    assert 3.5 <= rows[1]["tau"] <= 4.5
