"""Summaries, results.json / results.csv / summary.md, and plots, from the rows `run_benchmark` returns."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from .runner import AR_KINDS, SPLIT_FIELDS

SCHEMA_VERSION = 1
ALL = "all"  # the pseudo-dataset of overall summaries

SUMMARY_FIELDS = (
    "dataset", "method", "kind", "tree_budget", "temperature", "status", "reason", "note",
    "n_prompts", "n_skipped", "new_tokens", "time_s", "tokens_per_s", "rounds", "mean_acceptance_length",
    "speedup_vs_ar", "ar_baseline", "ar_time_s", "ar_tokens_per_s", "identity_vs_ar", "n_mismatches", "mismatches",
    "max_mismatch_margin", *SPLIT_FIELDS, "other_s", "mean_tree_size",
)


def _ordered_unique(xs):
    out = []
    for x in xs:
        if x not in out:
            out.append(x)
    return out


def _sum(xs):
    xs = [x for x in xs if x is not None]
    return float(sum(xs)) if xs else None


def _summary(rows: list[dict], dataset: str, method: str, temperature: float, ar_by_key: dict,
             ar_kind: str = "ar") -> dict:
    first = rows[0]
    ok = [r for r in rows if r["status"] == "ok"]
    bad = [r for r in rows if r["status"] != "ok"]
    s: dict[str, Any] = {k: None for k in SUMMARY_FIELDS}
    s.update(dataset=dataset, method=method, kind=first["kind"], tree_budget=first["tree_budget"],
             temperature=temperature, n_prompts=len(ok), n_skipped=len(bad), mismatches=[])
    notes = _ordered_unique([r["note"] for r in ok if r.get("note")])
    s["note"] = notes[0] if notes else None
    if not ok:
        s["status"] = bad[0]["status"] if bad else "empty"
        s["reason"] = bad[0]["reason"] if bad else None
        return s
    s["status"] = "ok" if not bad else "partial"
    s["reason"] = bad[0]["reason"] if bad else None
    s["new_tokens"] = int(sum(r["new_tokens"] for r in ok))
    s["time_s"] = float(sum(r["time_s"] for r in ok))
    s["tokens_per_s"] = s["new_tokens"] / s["time_s"] if s["time_s"] > 0 else None
    # acceptance: pooled over all verify rounds (tokens committed per target forward after prefill)
    rounds = sum(r["rounds"] or 0 for r in ok)
    committed = sum(sum(r["acceptance_lengths"]) if r["acceptance_lengths"] is not None
                    else (r["mean_acceptance_length"] or 0) * (r["rounds"] or 0) for r in ok)
    s["rounds"] = int(rounds)
    s["mean_acceptance_length"] = committed / rounds if rounds else None
    # speedup: AR's total time / this method's total time, over the prompts both ran
    pairs = [(ar_by_key[(r["prompt_index"], r["temperature"])], r) for r in ok
             if (r["prompt_index"], r["temperature"]) in ar_by_key]
    if pairs:
        t_ar = sum(a["time_s"] for a, _ in pairs)
        t_m = sum(r["time_s"] for _, r in pairs)
        n_ar = sum(a["new_tokens"] for a, _ in pairs)
        s["ar_time_s"] = float(t_ar)
        s["ar_tokens_per_s"] = n_ar / t_ar if t_ar > 0 else None
        s["speedup_vs_ar"] = 1.0 if first["kind"] == ar_kind else (t_ar / t_m if t_m > 0 else None)
        s["ar_baseline"] = ar_kind
    if temperature == 0:
        checked = [r for r in ok if r["identical_to_ar"] is not None]
        if checked:
            same = sum(bool(r["identical_to_ar"]) for r in checked)
            s["identity_vs_ar"] = same / len(checked)
            differ = [r for r in checked if not r["identical_to_ar"]]
            s["mismatches"] = [f"{r['dataset']}/{r['prompt_id']}@{r['first_mismatch']}"
                               + (f" (margin {r['mismatch_margin']:.3g})" if r.get("mismatch_margin") is not None else "")
                               for r in differ]
            s["n_mismatches"] = len(s["mismatches"])
            margins = [r["mismatch_margin"] for r in differ if r.get("mismatch_margin") is not None]
            s["max_mismatch_margin"] = max(margins) if margins else None
    for k in SPLIT_FIELDS:
        s[k] = _sum(r[k] for r in ok)
    if s["prefill_s"] is not None:
        s["other_s"] = s["time_s"] - sum(s[k] or 0.0 for k in SPLIT_FIELDS)
    sizes = [x for r in ok for x in (r["tree_sizes"] or [])]
    s["mean_tree_size"] = sum(sizes) / len(sizes) if sizes else None
    return s


def summarize(rows: Sequence[dict], method_order: Sequence[str] | None = None) -> list[dict]:
    """One summary per (dataset, method, temperature), then dataset "all" per (method, temperature).

    Speedup = sum of AR times / sum of the method's times over the same prompts (and temperature),
    both measured in this run. Acceptance length is pooled over rounds; AR is 1.0 by construction.
    With two AR baselines (a compiled run: "ar" = stock generate() as it comes, "ar-static" = stock with a
    static cache and the run's compile setting) the faster one per temperature (total time over the
    prompts both ran) is the baseline of every speedup; `ar_baseline` names it.
    """
    rows = list(rows)
    methods = _ordered_unique(list(method_order or []) + [r["method"] for r in rows])
    methods = [m for m in methods if any(r["method"] == m for r in rows)]
    datasets = _ordered_unique(r["dataset"] for r in rows)
    temps = sorted(_ordered_unique(r["temperature"] for r in rows))
    ar_kind = {t: fastest_ar(rows, t) for t in temps}
    ar_by_key = {(r["prompt_index"], r["temperature"]): r for r in rows
                 if r["kind"] == ar_kind[r["temperature"]] and r["status"] == "ok"}
    out = []
    for ds in datasets + [ALL]:
        for t in temps:
            for m in methods:
                sel = [r for r in rows if r["method"] == m and r["temperature"] == t and (ds == ALL or r["dataset"] == ds)]
                if sel:
                    out.append(_summary(sel, ds, m, t, ar_by_key, ar_kind[t]))
    return out


def fastest_ar(rows: Sequence[dict], temperature: float) -> str:
    """The AR kind ("ar" or "ar-static") with the smaller total time over the prompts where both ran ok
    at this temperature; "ar" when there is only one."""
    times = {k: {r["prompt_index"]: r["time_s"] for r in rows if r["kind"] == k and r["status"] == "ok"
                 and r["temperature"] == temperature} for k in AR_KINDS}
    common = set(times["ar"]) & set(times[AR_KINDS[1]])
    if not common:
        return "ar" if times["ar"] or not times[AR_KINDS[1]] else AR_KINDS[1]
    return min(AR_KINDS, key=lambda k: (sum(times[k][i] for i in common), k != "ar"))


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------

def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, list):
        return ";".join(str(x) for x in v)
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def write_csv(summaries: Sequence[dict], path: str | os.PathLike) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(SUMMARY_FIELDS))
        w.writeheader()
        for s in summaries:
            w.writerow({k: _csv_value(s.get(k)) for k in SUMMARY_FIELDS})


def _json_safe(o):
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {str(k): _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    return o


def dumps_results(res: dict) -> str:
    """results.json text: config and summaries indented, one row per line (rows carry token lists)."""
    res = _json_safe(res)
    parts = []
    for k, v in res.items():
        if k == "rows":
            body = ",\n".join("  " + json.dumps(r) for r in v)
            parts.append(f' "rows": [\n{body}\n ]' if v else ' "rows": []')
        elif k == "summary":
            body = ",\n".join("  " + json.dumps(r) for r in v)
            parts.append(f' "summary": [\n{body}\n ]' if v else ' "summary": []')
        else:
            parts.append(f" {json.dumps(k)}: " + json.dumps(v, indent=1).replace("\n", "\n "))
    return "{\n" + ",\n".join(parts) + "\n}\n"


def build_results(config: dict, rows: Sequence[dict], summaries: Sequence[dict]) -> dict:
    skipped = {}
    for s in summaries:
        if s["status"] in ("skipped", "error") and s["method"] not in skipped:
            skipped[s["method"]] = {"status": s["status"], "reason": s["reason"]}
    return {"schema_version": SCHEMA_VERSION, "config": config, "skipped": skipped,
            "summary": list(summaries), "rows": list(rows)}


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------

def _f(v, fmt="{:.2f}", none="–"):
    return none if v is None else fmt.format(v)


def _ranks(config: dict) -> str:
    """' x N ranks (tensor parallel)' / ' x N ranks (data parallel)' / '' for one process."""
    world = config.get("world_size", 1) or 1
    if world <= 1:
        return ""
    how = "target tensor-parallel" if (config.get("tensor_parallel") or 1) > 1 else "prompts split"
    return f" x {world} ranks ({how})"


def format_markdown(summaries: Sequence[dict], config: dict | None = None) -> str:
    """Per temperature: an overall table (acceptance, tok/s, speedup, identity, time split) and a
    per-dataset table (acceptance length / speedup), ready for docs/benchmarks.md."""
    lines: list[str] = []
    if config:
        bits = [f"target `{config.get('target')}`", f"drafter `{config.get('drafter')}`", f"{config.get('dtype')}",
                f"{config.get('max_new_tokens')} new tokens", f"{config.get('device')}",
                f"{config.get('threads')} threads" + _ranks(config),
                f"torch {config.get('torch')}", f"transformers {config.get('transformers')}"]
        lines.append("Setup: " + ", ".join(bits) + ".")
        if config.get("command"):
            lines.append(f"Command: `{config['command']}`")
        lines.append("")
    temps = sorted(_ordered_unique(s["temperature"] for s in summaries))
    datasets = [d for d in _ordered_unique(s["dataset"] for s in summaries) if d != ALL]
    methods = _ordered_unique(s["method"] for s in summaries)
    by = {(s["dataset"], s["method"], s["temperature"]): s for s in summaries}
    for t in temps:
        lines.append(f"#### Temperature {t:g}{' (greedy)' if t == 0 else ''}, all datasets")
        lines.append("")
        if any(s["kind"] == AR_KINDS[1] and s["temperature"] == t for s in summaries):
            base = next((s["ar_baseline"] for s in summaries if s["temperature"] == t and s["ar_baseline"]), "ar")
            lines.append(f"Speedups are against `{base}`, the faster of `ar` (stock generate() as it comes) and "
                         f"`{AR_KINDS[1]}` (stock generate() with a static cache and the same compile setting).")
            lines.append("")
        head = "| method | acceptance length | tok/s | speedup vs AR |"
        sep = "|---|---:|---:|---:|"
        if t == 0:
            head += " identical to AR |"
            sep += "---:|"
        head += " prefill / draft / tree / verify / commit / other (% of time) |"
        sep += "---|"
        lines += [head, sep]
        for m in methods:
            s = by.get((ALL, m, t))
            if s is None:
                continue
            if s["status"] in ("skipped", "error"):
                cells = [f"{m}", f"{s['status']}: {s['reason']}", "", ""] + ([""] if t == 0 else []) + [""]
                lines.append("| " + " | ".join(cells) + " |")
                continue
            split = "–"
            if s["prefill_s"] is not None and s["time_s"]:
                parts = [s[k] or 0.0 for k in SPLIT_FIELDS] + [max(0.0, s["other_s"] or 0.0)]
                split = " / ".join(f"{100 * p / s['time_s']:.0f}" for p in parts)
            cells = [m, _f(s["mean_acceptance_length"]), _f(s["tokens_per_s"], "{:.1f}"),
                     _f(s["speedup_vs_ar"], "{:.2f}x")]
            if t == 0:
                ident = _f(s["identity_vs_ar"], "{:.2f}")
                if s["n_mismatches"]:
                    ident += f" ({s['n_mismatches']} differ"
                    if s.get("max_mismatch_margin") is not None:
                        ident += f"; top-2 margin there <= {s['max_mismatch_margin']:.3g}"
                    ident += ")"
                cells.append(ident)
            cells.append(split)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if datasets:
            lines.append(f"#### Temperature {t:g}, per dataset: acceptance length / speedup vs AR")
            lines.append("")
            lines.append("| method | " + " | ".join(datasets) + " |")
            lines.append("|---|" + "---:|" * len(datasets))
            for m in methods:
                cells = [m]
                for d in datasets:
                    s = by.get((d, m, t))
                    if s is None or s["status"] in ("skipped", "error"):
                        cells.append("–" if s is None else s["status"])
                    else:
                        cells.append(f"{_f(s['mean_acceptance_length'])} / {_f(s['speedup_vs_ar'], '{:.2f}x')}")
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    notes = _ordered_unique(f"{s['method']}: {s['note']}" for s in summaries if s.get("note"))
    for n in notes:
        lines.append(f"Note: {n}")
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API + Agg canvas: no pyplot state, no display needed)
# ------------------------------------------------------------------------------------------------

def _figure(w, h):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


# kinds drawn as speedup-vs-budget series, with their matplotlib format strings
BUDGET_SERIES = {"ddtree": "o-", "ddtree-lookup": "D-", "d2sd": "s-.", "d2sd-tree": "^--"}


def plot_speedup_vs_budget(summaries: Sequence[dict], path: str | os.PathLike) -> str | None:
    """Speedup vs tree budget: per dataset, one line over the ddtree:N points (log2 x, circles) and one
    each over the d2sd:N (squares, dash-dot) and d2sd-tree:N (triangles, dashed) points, dashed
    horizontal lines for dflash and dotted for caddtree in the same colour; one panel per temperature."""
    ok = [s for s in summaries if s["status"] in ("ok", "partial") and s["speedup_vs_ar"] is not None]
    temps = sorted(_ordered_unique(s["temperature"] for s in ok))
    if not temps or not any(s["kind"] in ("ddtree", "dflash", "caddtree", *BUDGET_SERIES) for s in ok):
        return None
    datasets = _ordered_unique(s["dataset"] for s in ok)
    if len([d for d in datasets if d != ALL]) == 1:
        datasets = [ALL]  # one dataset: its lines would coincide with the overall ones
    fig = _figure(5.2 * len(temps), 4.2)
    axes = fig.subplots(1, len(temps), squeeze=False)[0]
    colors = {d: ("k" if d == ALL else f"C{i}") for i, d in enumerate(datasets)}
    for ax, t in zip(axes, temps):
        budgets = sorted({s["tree_budget"] for s in ok if s["kind"] in BUDGET_SERIES and s["temperature"] == t})
        for d in datasets:
            c = colors[d]
            lw = 2.4 if d == ALL else 1.4
            for kind, style in BUDGET_SERIES.items():
                pts = sorted((s["tree_budget"], s["speedup_vs_ar"]) for s in ok
                             if s["kind"] == kind and s["dataset"] == d and s["temperature"] == t)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=c, lw=lw, label=f"{d}: {kind}")
            for kind, ls in (("dflash", "--"), ("caddtree", ":")):
                for s in ok:
                    if s["kind"] == kind and s["dataset"] == d and s["temperature"] == t:
                        ax.axhline(s["speedup_vs_ar"], color=c, ls=ls, lw=lw, label=f"{d}: {kind}")
        ax.axhline(1.0, color="0.5", lw=0.8)
        if budgets:
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets)
            ax.set_xticklabels([str(b) for b in budgets])
        ax.set_xlabel("tree budget (nodes)")
        ax.set_ylabel("speedup vs AR")
        ax.set_title(f"temperature {t:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=1 if len(datasets) < 4 else 2)
    fig.tight_layout()
    fig.savefig(path)
    return str(path)


def plot_acceptance_hist(rows: Sequence[dict], path: str | os.PathLike, method_order: Sequence[str] | None = None) -> str | None:
    """Histogram of per-round acceptance lengths (tokens per target forward), one panel per method
    (rows = temperatures). AR (always 1) is left out."""
    ok = [r for r in rows if r["status"] == "ok" and r["acceptance_lengths"] and r["kind"] != "ar"]
    if not ok:
        return None
    methods = _ordered_unique(list(method_order or []) + [r["method"] for r in ok])
    methods = [m for m in methods if any(r["method"] == m for r in ok)]
    temps = sorted(_ordered_unique(r["temperature"] for r in ok))
    hi = max(a for r in ok for a in r["acceptance_lengths"])
    fig = _figure(2.6 * len(methods) + 0.6, 2.3 * len(temps) + 0.6)
    axes = fig.subplots(len(temps), len(methods), squeeze=False, sharex=True)
    bins = [b - 0.5 for b in range(1, hi + 2)]
    for i, t in enumerate(temps):
        for j, m in enumerate(methods):
            ax = axes[i][j]
            vals = [a for r in ok if r["method"] == m and r["temperature"] == t for a in r["acceptance_lengths"]]
            if vals:
                ax.hist(vals, bins=bins, color=f"C{j}", density=True)
                ax.set_title(f"{m}, T={t:g}: mean {sum(vals) / len(vals):.2f}", fontsize=8)
            else:
                ax.set_title(f"{m}, T={t:g}: –", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == len(temps) - 1:
                ax.set_xlabel("tokens per target forward", fontsize=8)
            if j == 0:
                ax.set_ylabel("fraction of rounds", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return str(path)


# ------------------------------------------------------------------------------------------------
# Everything at once
# ------------------------------------------------------------------------------------------------

def write_results(out_dir: str | os.PathLike, config: dict, rows: Sequence[dict],
                  method_order: Sequence[str] | None = None, plots: bool = True) -> dict:
    """Write results.json, results.csv, summary.md and the plots into out_dir.

    Returns {"summary": [...], "markdown": str, "files": {name: path}}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = summarize(rows, method_order)
    files = {}
    res = build_results(config, rows, summaries)
    p = out / "results.json"
    tmp = out / "results.json.tmp"
    tmp.write_text(dumps_results(res))
    os.replace(tmp, p)
    files["results.json"] = str(p)
    write_csv(summaries, out / "results.csv")
    files["results.csv"] = str(out / "results.csv")
    md = format_markdown(summaries, config)
    (out / "summary.md").write_text(md)
    files["summary.md"] = str(out / "summary.md")
    if plots:
        f = plot_speedup_vs_budget(summaries, out / "speedup_vs_budget.png")
        if f:
            files["speedup_vs_budget.png"] = f
        f = plot_acceptance_hist(rows, out / "acceptance_hist.png", method_order)
        if f:
            files["acceptance_hist.png"] = f
    return {"summary": summaries, "markdown": md, "files": files}
