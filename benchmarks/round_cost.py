"""A DDTree round's cost in AR steps, per tree budget and cache kind, on the embedded pair (issue 10's table).

    PYTHONPATH=src python benchmarks/round_cost.py --threads 2 --budgets 4,8,16,32,64 --prompts 3 --new 64 \
        --out results/round-cost

One process, one machine state: the AR step (stock generate(), eager, its default dynamic cache) is measured
as (t(N new tokens) - t(1 new token)) / (N - 1) on the same prompts, interleaved with the DDTree runs. A
round's time is (total - prefill) / rounds from generate(collect_timing=True), split into draft / tree /
verify / commit. Reported per (cache, budget): mean round time in AR steps, the split, mean acceptance and
tokens/s against AR. Runs are interleaved over `--reps` passes (the order rotates) and medians are taken (speed = median seconds per new token), so
background load shifts every variant alike. Writes round_cost.json, round_cost.md and round_cost.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budgets", default="4,8,16,32,64")
    ap.add_argument("--caches", default="dynamic,static")
    ap.add_argument("--method", default="ddtree", choices=["ddtree", "ddtree-lookup"])
    ap.add_argument("--prompts", type=int, default=3, help="prompts per dataset (humaneval, gsm8k, mt-bench)")
    ap.add_argument("--new", type=int, default=64, help="new tokens per generation")
    ap.add_argument("--reps", type=int, default=2, help="interleaved passes (medians over them)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                    help="auto: bf16 where this CPU computes it natively (hf_ddtree.device.resolve_dtype), else fp32")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import hf_ddtree
    from hf_ddtree.bench.cli import describe_device, load_bench_prompts
    from hf_ddtree.models import load_default_drafter, load_target
    from transformers import GenerationMixin

    from hf_ddtree.device import resolve_dtype

    dtype, dtype_name = resolve_dtype(args.dtype)
    print(f"dtype: {dtype_name}", file=sys.stderr)
    target, tok = load_target("smollm2-135m", dtype=dtype, attn_implementation="sdpa")
    drafter = load_default_drafter(target)
    hf_ddtree.enable(target)
    prompts = load_bench_prompts("humaneval,gsm8k,mt-bench", tok, args.prompts)
    budgets = [int(b) for b in args.budgets.split(",")]
    caches = [c for c in args.caches.split(",") if c]
    eos = target.generation_config.eos_token_id
    base = dict(do_sample=False, pad_token_id=eos if isinstance(eos, int) else None)

    def ar(ids, n):  # (seconds, new tokens)
        t0 = time.perf_counter()
        out = GenerationMixin.generate(target, ids, max_new_tokens=n, **base)
        return time.perf_counter() - t0, out.shape[1] - ids.shape[1]

    def spec(ids, cache, budget):
        kw = dict(tree_budget=budget) if args.method == "ddtree" else dict(method="ddtree-lookup", tree_budget=budget)
        t0 = time.perf_counter()
        out = target.generate(ids, assistant_model=drafter, max_new_tokens=args.new, cache_implementation=cache, return_dict_in_generate=True, collect_timing=True, **kw, **base)
        return time.perf_counter() - t0, out

    variants = [("ar", None, None)] + [("spec", c, b) for c in caches for b in budgets]
    samples: dict = {v: [] for v in variants}
    with torch.inference_mode():
        ids0 = torch.tensor([prompts[0].input_ids])
        ar(ids0, 4)
        for c in caches:
            spec(ids0, c, budgets[0])  # warm-up
        for rep in range(args.reps):
            for i, p in enumerate(prompts):
                ids = torch.tensor([p.input_ids])
                order = variants[(rep + i) % len(variants):] + variants[:(rep + i) % len(variants)]
                for v in order:
                    if v[0] == "ar":
                        t_one, _ = ar(ids, 1)
                        t_all, n = ar(ids, args.new)
                        samples[v].append(dict(step=(t_all - t_one) / max(1, n - 1), total=t_all / n))
                    else:
                        dt, out = spec(ids, v[1], v[2])
                        st = out.stats
                        rounds = len(out.acceptance_lengths)
                        n = out.sequences.shape[1] - ids.shape[1]
                        samples[v].append(dict(
                            total=dt / n, round=(dt - st.prefill_s) / rounds, acceptance=st.mean_acceptance_length,
                            draft=st.draft_s / rounds, tree=st.tree_s / rounds, verify=st.verify_s / rounds,
                            commit=st.commit_s / rounds, size=sum(st.tree_sizes) / rounds))
                print(f"pass {rep + 1}/{args.reps} prompt {i + 1}/{len(prompts)}", flush=True)

    med = lambda xs: statistics.median(xs)  # noqa: E731
    ar_step = med([s["step"] for s in samples["ar", None, None]])
    ar_total = med([s["total"] for s in samples["ar", None, None]])
    table = []
    for v in variants[1:]:
        ss = samples[v]
        row = dict(cache=v[1], budget=v[2], round_ms=1e3 * med([s["round"] for s in ss]))
        row["round_ar_steps"] = row["round_ms"] / (1e3 * ar_step)
        for k in ("draft", "tree", "verify", "commit"):
            row[k + "_ar_steps"] = med([s[k] for s in ss]) / ar_step
        row["acceptance"] = med([s["acceptance"] for s in ss])
        row["mean_tree_size"] = med([s["size"] for s in ss])
        row["speed_vs_ar"] = ar_total / med([s["total"] for s in ss])
        table.append(row)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=describe_device(torch.device("cpu")), dtype="bf16" if dtype == torch.bfloat16 else "fp32",
                threads=args.threads, method=args.method,
                prompts=len(prompts), new_tokens=args.new, reps=args.reps, ar_step_ms=1e3 * ar_step,
                torch=torch.__version__, hf_ddtree=hf_ddtree.__version__)
    (out / "round_cost.json").write_text(json.dumps(dict(meta=meta, table=table), indent=1))
    lines = [f"{meta['device']}, {meta['dtype']}, {args.threads} threads, {len(prompts)} prompts x {args.new} new tokens, "
             f"{args.reps} interleaved passes, medians; AR step (stock, eager, dynamic cache) = {meta['ar_step_ms']:.1f} ms", "",
             f"| cache | {args.method} budget | round (AR steps) | draft | tree | verify | commit | acceptance | speed vs AR |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        lines.append(f"| {r['cache']} | {r['budget']} | {r['round_ar_steps']:.2f} | {r['draft_ar_steps']:.2f} | "
                     f"{r['tree_ar_steps']:.2f} | {r['verify_ar_steps']:.2f} | {r['commit_ar_steps']:.2f} | "
                     f"{r['acceptance']:.2f} | {r['speed_vs_ar']:.2f}x |")
    md = "\n".join(lines) + "\n"
    (out / "round_cost.md").write_text(md)
    print(md)
    plot(table, caches, budgets, args.method, args.threads, out / "round_cost.png")
    return 0


def plot(table, caches, budgets, method, threads, path) -> None:
    """AR steps per round (and the verify alone) against the budget, one line per cache kind."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in caches:
        rs = [r for r in table if r["cache"] == c]
        ax.plot([r["budget"] for r in rs], [r["round_ar_steps"] for r in rs], marker="o", label=f"round, {c} cache")
        ax.plot([r["budget"] for r in rs], [r["verify_ar_steps"] for r in rs], ls=":", marker=".", label=f"verify only, {c}")
    ax.scatter([8, 16], [1.5, 1.8], marker="x", color="red", zorder=5, label="issue 10 targets")
    ax.set(xscale="log", xlabel="tree budget (nodes)", ylabel="AR steps per round",
           title=f"{method} round cost, embedded pair, {threads} threads")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(json_path: str) -> None:
    """Redraw round_cost.png from a round_cost.json."""
    d = json.loads(Path(json_path).read_text())
    table = d["table"]
    caches = list(dict.fromkeys(r["cache"] for r in table))
    budgets = sorted({r["budget"] for r in table})
    plot(table, caches, budgets, d["meta"]["method"], d["meta"]["threads"], Path(json_path).with_name("round_cost.png"))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--replot":
        replot(sys.argv[2])
        raise SystemExit(0)
    raise SystemExit(main())
