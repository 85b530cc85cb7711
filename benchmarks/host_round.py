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


def worker(budget: int, new_tokens: int, prompts: int, compiled: bool = False) -> dict:
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
    if compiled:  # generate()'s compile convention on any device: a static cache + CompileConfig._compile_all_devices
        from transformers import CompileConfig

        cc = CompileConfig(fullgraph=False)
        cc._compile_all_devices = True
        kw.update(cache_implementation="static", compile_config=cc)
    # the time spent inside the two forwards (the target's verify and prefill, the drafter's), booked by wrapping the
    # callables the loop runs them through: eager, the modules' forward; compiled, what torch.compile returns for the
    # modules' __call__ (transformers' get_compiled_call and the loop's drafter compile both go through it). On a CPU
    # a forward is synchronous, so round time - forward time is the loop's own time: what a GPU would wait for.
    in_forwards = [0.0]

    def timed(fn):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                in_forwards[0] += time.perf_counter() - t0
        return call

    if compiled:
        compile_ = torch.compile

        def compile_timed(fn=None, **options):
            out = compile_(fn, **options)
            return timed(out) if getattr(fn, "__self__", None) in (target, drafter) else out

        torch.compile = compile_timed
    else:
        target.forward, drafter.forward = timed(target.forward), timed(drafter.forward)
    t0 = time.perf_counter()
    for x in ids:  # warm-up (and, compiled, every graph these decodes need)
        target.generate(x, **kw)
    warm = time.perf_counter() - t0
    rounds, t = 0, 0.0
    in_forwards[0] = 0.0
    for x in ids:
        t0 = time.perf_counter()
        out = target.generate(x, **kw)
        t += time.perf_counter() - t0
        rounds += len(out.acceptance_lengths)
    forwards = in_forwards[0]
    import importlib.util  # this checkout's counter, also for an older revision that has none

    spec = importlib.util.spec_from_file_location("_host_reads", ROOT / "src/hf_ddtree/bench/host_reads.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_host_reads"] = mod  # (dynamo imports the mode's module by name when it meets it in a compiled call)
    spec.loader.exec_module(mod)
    with mod.HostReads() as r:
        out = target.generate(ids[0], **kw)
    reads = r.total / len(out.acceptance_lengths)
    return {"ms_per_round": 1e3 * t / rounds, "forward_ms_per_round": 1e3 * forwards / rounds,
            "loop_ms_per_round": 1e3 * (t - forwards) / rounds, "rounds": rounds, "reads_per_round": reads,
            "package": hf_ddtree.__file__, "warm_s": warm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", action="append", required=True,
                    help="a source dir holding hf_ddtree/ (repeat); DIR:device runs it with HF_DDTREE_DEVICE_ROUND=1 "
                         "(the device round, what an accelerator runs), DIR:host with 0")
    ap.add_argument("--budgets", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="per source, the median or the minimum over repeats (min: on a loaded machine, noise only adds)")
    ap.add_argument("--compile", action="store_true",
                    help="every source with compiled forwards (generate()'s convention: static cache + CompileConfig "
                         "with _compile_all_devices; inductor on this CPU)")
    ap.add_argument("--json", default=None, help="also write every run's numbers here")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.new_tokens, args.prompts, args.compile)))
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
                                      "--new-tokens", str(args.new_tokens), "--prompts", str(args.prompts)]
                                     + (["--compile"] if args.compile else []),
                                     env=env, capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                if not r["package"].startswith(str(Path(src).resolve())):
                    raise SystemExit(f"{src}: imported {r['package']} instead (an editable install shadows PYTHONPATH)")
                results.setdefault((budget, label), []).append(r)
                print(f"rep {rep} budget {budget} {label}: {r['ms_per_round']:.3f} ms/round", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps([{"budget": b, "source": src, "runs": rs} for (b, src), rs in results.items()],
                                              indent=1))
    how = "compiled forwards" if args.compile else "eager"
    stat = statistics.median if args.stat == "median" else min
    print(f"{how}; {args.stat} of {args.repeats}; loop = round - forwards (the loop's own time, what a GPU waits for)\n")
    print("loop / fwd = the loop's own time per ms of forward time in the same run: the forwards are the same model code "
          "for every source, so this ratio cancels the machine's speed drifting between runs (read its last column)\n")
    print(f"| budget | source | ms / round | vs {args.src[0]} | forwards ms | loop ms | loop vs {args.src[0]} "
          f"| loop / fwd | vs {args.src[0]} | reads / round | rounds |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for budget in args.budgets:
        for rs in (results[(budget, src)] for src in args.src):
            for r in rs:
                r["loop_per_forward"] = r["loop_ms_per_round"] / r["forward_ms_per_round"]
        med = {src: {k: stat(r[k] for r in results[(budget, src)])
                     for k in ("ms_per_round", "forward_ms_per_round", "loop_ms_per_round", "loop_per_forward")}
               for src in args.src}
        base = med[args.src[0]]
        for src in args.src:
            rs, m = results[(budget, src)], med[src]
            print(f"| {budget} | `{src}` | {m['ms_per_round']:.3f} | {m['ms_per_round'] / base['ms_per_round']:.2f}x | "
                  f"{m['forward_ms_per_round']:.3f} | {m['loop_ms_per_round']:.3f} | "
                  f"{m['loop_ms_per_round'] / base['loop_ms_per_round']:.2f}x | {m['loop_per_forward']:.3f} | "
                  f"{m['loop_per_forward'] / base['loop_per_forward']:.2f}x | {rs[0]['reads_per_round']:.1f} | "
                  f"{rs[0]['rounds']} |")


if __name__ == "__main__":
    main()
