"""One rank of the tensor-parallel test (tests/test_tensor_parallel.py), and the same runs in one process.

Started with torchrun's environment (RANK, WORLD_SIZE, ...; gloo on CPU):
    python tests/tp_worker.py <model dir> <out dir>
loads the target with tp_plan="auto" (each rank holds half of its attention heads and MLP), runs
`run_cases`, checks the refusals, and writes <out dir>/rank<r>.json. The test calls `run_cases` on the
unsharded model in its own process for the single-process reference.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

PROMPT = [5, 17, 3, 42, 8, 11, 29]
SECOND_PROMPT = [7, 1, 22, 9]
NEW = 12
SEED = 1234
# (name, generate kwargs); "auto" runs twice: calibrating, then from the leader's disk cache
METHODS = (("ddtree:4", dict(tree_budget=4)), ("dflash", dict()),
           ("caddtree", dict(tree_budget="auto", max_tree_budget=16)),
           ("d2sd-tree:8", dict(method="d2sd-tree", tree_budget=8)))  # drafter twice: D^2SD's second drafter
CACHES = ("static", "dynamic")


def load_pair(model_dir: Path, tp: bool):
    from transformers import AutoModelForCausalLM

    from hf_ddtree import DFlashDraftModel

    kw = dict(tp_plan="auto") if tp else {}
    target = AutoModelForCausalLM.from_pretrained(model_dir / "target", dtype=torch.float32, **kw).eval()
    drafter = DFlashDraftModel.from_pretrained(model_dir / "drafter", dtype=torch.float32).eval()
    return target, drafter


def _forget_calibrations() -> None:
    from hf_ddtree import calibrate, distributed

    calibrate.clear_memory_cache()
    distributed._MEMO.clear()


def run_cases(target, drafter) -> dict:
    """{case: {"tokens", "tree_sizes", "acceptance"}} for AR and every method x cache x (greedy, seeded sampling)."""
    import hf_ddtree

    hf_ddtree.enable(target)
    ids = torch.tensor([PROMPT])
    out = {}
    for sample in (False, True):
        mode = "sample" if sample else "greedy"
        gen = dict(max_new_tokens=NEW, do_sample=sample)
        if sample:
            gen.update(temperature=1.0)
        torch.manual_seed(SEED)
        ar = target.generate(ids, **gen)
        out[f"ar/{mode}"] = {"tokens": ar[0].tolist()}
        for cache in CACHES:
            for name, kw in METHODS:
                for attempt in ((0, 1) if name == "caddtree" else (0,)):
                    if name == "caddtree" and attempt == 1:
                        _forget_calibrations()  # the second run reads the leader's disk cache
                    torch.manual_seed(SEED)
                    assistant = (drafter, drafter) if name.startswith("d2sd") else drafter
                    res = target.generate(ids, assistant_model=assistant, cache_implementation=cache,
                                          return_dict_in_generate=True, **gen, **kw)
                    out[f"{name}/{cache}/{mode}/{attempt}"] = {
                        "tokens": res.sequences[0].tolist(), "tree_sizes": list(res.stats.tree_sizes),
                        "acceptance": list(res.acceptance_lengths)}
    return out


def _refusal(fn) -> str | None:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def run_refusals(model_dir: Path, target, drafter, rank: int) -> dict:
    """The messages of what must be refused before any forward (None where nothing was raised)."""
    from transformers import AutoModelForCausalLM

    from hf_ddtree import DFlashDraftModel

    ids = torch.tensor([PROMPT])
    res = {}
    # every rank must make the same call: rank 1 with another prompt is refused on both ranks
    other = torch.tensor([SECOND_PROMPT]) if rank == 1 else ids
    res["different_prompts"] = _refusal(lambda: target.generate(other, assistant_model=drafter, tree_budget=4,
                                                                 max_new_tokens=4, do_sample=False))
    # a refusal on one rank only (rank 1's drafter is not next to its shard) reaches every rank
    import copy

    misplaced = copy.deepcopy(drafter).to("meta") if rank == 1 else drafter
    res["one_rank_refuses"] = _refusal(lambda: target.generate(ids, assistant_model=misplaced, tree_budget=4,
                                                               max_new_tokens=4, do_sample=False))
    res["max_time"] = _refusal(lambda: target.generate(ids, assistant_model=drafter, tree_budget=4, max_new_tokens=4,
                                                       do_sample=False, max_time=60.0))
    res["batch"] = _refusal(lambda: target.generate(ids.repeat(2, 1), assistant_model=drafter, tree_budget=4,
                                                    max_new_tokens=4, do_sample=False))
    sharded_drafter = DFlashDraftModel.from_pretrained(model_dir / "drafter", dtype=torch.float32, tp_plan="auto")
    res["sharded_drafter"] = _refusal(lambda: target.generate(ids, assistant_model=sharded_drafter, tree_budget=4,
                                                              max_new_tokens=4, do_sample=False))
    plan = dict(target._tp_plan)
    plan["lm_head"] = "colwise"  # logits left split over the vocabulary
    split = AutoModelForCausalLM.from_pretrained(model_dir / "target", dtype=torch.float32, tp_plan=plan).eval()
    import hf_ddtree

    hf_ddtree.enable(split)
    res["vocab_split_logits"] = _refusal(lambda: split.generate(ids, assistant_model=drafter, tree_budget=4,
                                                                max_new_tokens=4, do_sample=False))
    return res


def main(argv) -> int:
    model_dir, out_dir = Path(argv[0]), Path(argv[1])
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    # each rank its own latency cache: only the leader's may be read (the other one stays empty)
    os.environ["HF_DDTREE_CACHE"] = str(out_dir / f"cache-rank{rank}")
    target, drafter = load_pair(model_dir, tp=True)
    info = {"rank": rank, "tp_size": target._tp_size,
            "k_proj_rows": int(target.model.layers[0].self_attn.k_proj.weight.to_local().shape[0])
            if hasattr(target.model.layers[0].self_attn.k_proj.weight, "to_local")
            else int(target.model.layers[0].self_attn.k_proj.weight.shape[0])}
    with torch.inference_mode():
        info["cases"] = run_cases(target, drafter)
    info["refusals"] = run_refusals(model_dir, target, drafter, rank)
    info["cache_files"] = sorted(p.name for p in (out_dir / f"cache-rank{rank}").rglob("*.json"))
    (out_dir / f"rank{rank}.json").write_text(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
