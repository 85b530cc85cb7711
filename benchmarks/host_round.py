"""Host time per round: the loop's own cost, on a pair whose forwards are nearly free.

A tiny seeded pair (tests/conftest.py: Qwen3 target, 4 layers, hidden 64, vocab 64; a random DFlash
drafter), fp32, 1 thread: a round's wall time is almost all host work (Python, small kernels, host
reads), which is what a GPU would wait for between two forwards. Each source tree (the package of
an older revision, e.g. a `git worktree` of main, and this one) runs in its own interpreter; the
runs are interleaved, repeated, and the median time per round reported with the ratio to the first
source, plus the host reads per round (`bench.host_reads`).

    git worktree add /tmp/old <rev>
    python benchmarks/host_round.py --src /tmp/old/src --src src --budgets 16 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(budget: int, new_tokens: int, prompts: int) -> dict:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "tests"))
    mode = os.environ.get("HF_DDTREE_DEVICE_ROUND")
    from conftest import build_drafter, build_target  # (it sets HF_DDTREE_DEVICE_ROUND for the test suite)

    if mode is None:  # generate()'s own default, as a user gets it
        os.environ.pop("HF_DDTREE_DEVICE_ROUND", None)

    import hf_ddtree

    target = build_target("qwen3", "sdpa", layers=4)
    drafter = build_drafter(target)
    hf_ddtree.enable(target)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 60, (1, 24), generator=g) for _ in range(prompts)]
    kw = dict(assistant_model=drafter, tree_budget=budget, max_new_tokens=new_tokens, return_dict_in_generate=True)
    target.generate(ids[0], **kw)  # warm-up
    rounds, t = 0, 0.0
    for x in ids:
        t0 = time.perf_counter()
        out = target.generate(x, **kw)
        t += time.perf_counter() - t0
        rounds += len(out.acceptance_lengths)
    import importlib.util  # this checkout's counter, also for an older revision that has none

    spec = importlib.util.spec_from_file_location("_host_reads", ROOT / "src/hf_ddtree/bench/host_reads.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with mod.HostReads() as r:
        out = target.generate(ids[0], **kw)
    reads = r.total / len(out.acceptance_lengths)
    return {"ms_per_round": 1e3 * t / rounds, "rounds": rounds, "reads_per_round": reads,
            "package": hf_ddtree.__file__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", action="append", required=True,
                    help="a source dir holding hf_ddtree/ (repeat); DIR:device runs it with HF_DDTREE_DEVICE_ROUND=1 "
                         "(the device round, what an accelerator runs), DIR:host with 0")
    ap.add_argument("--budgets", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.new_tokens, args.prompts)))
        return
    results: dict = {}
    for rep in range(args.repeats):
        for budget in args.budgets:
            for label in args.src:
                src, _, mode = label.partition(":")
                env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()), OMP_NUM_THREADS="1")
                env.pop("HF_DDTREE_DEVICE_ROUND", None)
                if mode:
                    env["HF_DDTREE_DEVICE_ROUND"] = "1" if mode == "device" else "0"
                out = subprocess.run([sys.executable, __file__, "--src", src, "--worker", str(budget),
                                      "--new-tokens", str(args.new_tokens), "--prompts", str(args.prompts)],
                                     env=env, capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                if not r["package"].startswith(str(Path(src).resolve())):
                    raise SystemExit(f"{src}: imported {r['package']} instead (an editable install shadows PYTHONPATH)")
                results.setdefault((budget, label), []).append(r)
                print(f"rep {rep} budget {budget} {label}: {r['ms_per_round']:.3f} ms/round", file=sys.stderr)
    print(f"| budget | source | host ms / round (median of {args.repeats}) | vs {args.src[0]} | reads / round | rounds |")
    print("|---:|---|---:|---:|---:|---:|")
    for budget in args.budgets:
        base = statistics.median(r["ms_per_round"] for r in results[(budget, args.src[0])])
        for src in args.src:
            rs = results[(budget, src)]
            ms = statistics.median(r["ms_per_round"] for r in rs)
            reads = rs[0]["reads_per_round"]
            print(f"| {budget} | `{src}` | {ms:.3f} | {ms / base:.2f}x | {reads:.1f} | "
                  f"{rs[0]['rounds']} |")


if __name__ == "__main__":
    main()
