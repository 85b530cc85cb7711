"""`hf-ddtree bench --batch-size B[,B...]`: throughput of batched generate() against stock batched AR.

For each batch size B the prompts are cut into consecutive groups of B, each group left-padded (as a tokenizer
with padding_side="left" gives it), and every method decodes the same group in the same run, AR (stock
batched generate()) first. Throughput is generated tokens per second over the batch: the tokens each row
produced up to and including its EOS (stock's padding after it is not counted), summed over rows, divided by
the wall time of the call. Greedy outputs are checked row by row against AR.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import torch

from .runner import BenchPrompt, Method, _short, _sync, method_kwargs, progress_bar

_SPLIT = ("prefill_s", "draft_s", "tree_s", "verify_s", "commit_s")  # DecodeStats time split (collect_timing)
# our methods that take a batch, and how generate() is called for each
_BATCH_KINDS = ("ar", "dflash", "ddtree", "ddtree-lookup", "caddtree", "caddtree-lookup", "d2sd", "d2sd-tree")


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) ids and attention mask, left-padded with pad_id."""
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), int(pad_id), dtype=torch.long)
    mask = torch.zeros(len(rows), P, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, P - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[b, P - len(r):] = 1
    return ids.to(device), mask.to(device)


def row_tokens(seq: torch.Tensor, prompt_len: int, eos: set[int]) -> list[list[int]]:
    """Per row, the generated tokens up to and including the first EOS (stock pads after it)."""
    out = []
    for row in seq[:, prompt_len:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        out.append(row[:end])
    return out


def run_batch_benchmark(target, drafter, prompts: Sequence[BenchPrompt], methods: Sequence[Method],
                        batch_sizes: Sequence[int], *, max_new_tokens: int = 128, pad_token_id: int | None = None,
                        eos_token_ids: Sequence[int] = (), drafter2=None, max_tree_budget: int = 256, warmup: int = 1,
                        progress: bool = True, log: Callable[[str], None] | None = None) -> list[dict]:
    """One row per (batch size, group, method): time, generated tokens, throughput, acceptance per row,
    and (greedy) whether every row equals AR's. Methods that cannot take a batch (pld, hf-dflash: stock's
    assisted generation is batch-1 only) get one "skipped" row per batch size with the reason."""
    import hf_ddtree

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if not hf_ddtree.is_enabled(target):
        hf_ddtree.enable(target)
    device = next(target.parameters()).device
    if pad_token_id is None:
        pad_token_id = next(iter(eos_token_ids), 0)
    eos = {int(e) for e in eos_token_ids}
    methods = [m for m in methods if m.kind == "ar"] + [m for m in methods if m.kind != "ar"]
    rows: list[dict] = []
    for B in batch_sizes:
        if B < 1 or B > len(prompts):
            raise ValueError(f"--batch-size {B}: needs 1 <= B <= the number of prompts ({len(prompts)}); "
                             "raise --limit or pass fewer rows per batch.")
    groups = {B: [prompts[i:i + B] for i in range(0, len(prompts) - B + 1, B)] for B in batch_sizes}
    bar = progress_bar(progress, sum(len(g) for g in groups.values()) * len(methods), "bench (batched)")

    def call(method: Method, ids, mask, n_new):
        kw = dict(attention_mask=mask, do_sample=False, max_new_tokens=n_new, pad_token_id=pad_token_id)
        if method.kind == "ar":
            return target.generate(ids, **kw), (None, None)
        out = target.generate(ids, **kw, **method_kwargs(method, drafter, drafter2, max_tree_budget),
                              return_dict_in_generate=True, collect_timing=target.device.type == "cpu")  # no syncs on a GPU
        return out.sequences, (out.acceptance_lengths, out.stats)

    skipped = {m.name: f"{m.kind} does not take a batch (stock assisted generation is batch-1 only)"
               for m in methods if m.kind not in _BATCH_KINDS}
    for B, chunks in groups.items():
        if warmup and chunks:  # allocation, kernel choice, lazy imports: not timed
            ids, mask = left_pad([p.input_ids for p in chunks[0]], pad_token_id, device)
            for m in methods:
                if m.name in skipped:
                    continue
                for _ in range(int(warmup)):
                    try:
                        with torch.inference_mode():
                            call(m, ids, mask, min(16, max_new_tokens))
                    except Exception as e:
                        skipped[m.name] = f"warm-up at B={B}: {type(e).__name__}: {_short(e)}"
                        log(f"[bench] {m.name} skipped ({skipped[m.name]})")
                        break
        for g, chunk in enumerate(chunks):
            ids, mask = left_pad([p.input_ids for p in chunk], pad_token_id, device)
            P = ids.shape[1]
            ar_tokens = None
            for m in methods:
                row = dict(batch_size=B, group=g, prompt_ids=[p.id for p in chunk], datasets=[p.dataset for p in chunk],
                           method=m.name, kind=m.kind, status="ok", reason=None, time_s=None, new_tokens=None,
                           tokens_per_s=None, row_new_tokens=None, row_acceptance=None, mean_acceptance_length=None,
                           identical_to_ar=None, rounds=None, **{k: None for k in _SPLIT})
                if m.name in skipped:
                    row.update(status="skipped", reason=skipped[m.name])
                else:
                    try:
                        with torch.inference_mode():
                            torch.manual_seed(0)
                            _sync(device)
                            t0 = time.perf_counter()
                            seq, (acc, stats) = call(m, ids, mask, max_new_tokens)
                            _sync(device)
                            dt = time.perf_counter() - t0
                    except Exception as e:
                        row.update(status="error", reason=f"{type(e).__name__}: {_short(e)}")
                        log(f"[bench] {m.name} B={B} group {g}: {row['reason']}")
                    else:
                        toks = row_tokens(seq, P, eos)
                        n = sum(len(t) for t in toks)
                        row.update(time_s=dt, new_tokens=n, tokens_per_s=n / dt if dt > 0 else None,
                                   row_new_tokens=[len(t) for t in toks])
                        if stats is not None:
                            row.update({k: float(getattr(stats, k)) for k in _SPLIT})
                        if acc is not None:
                            per_row = acc if B > 1 else [acc]
                            row["rounds"] = max(len(a) for a in per_row)
                            row["row_acceptance"] = [sum(a) / len(a) if a else None for a in per_row]
                            flat = [x for a in per_row for x in a]
                            row["mean_acceptance_length"] = sum(flat) / len(flat) if flat else None
                        if m.kind == "ar":
                            ar_tokens = toks
                            row["identical_to_ar"] = True
                        elif ar_tokens is not None:
                            row["identical_to_ar"] = toks == ar_tokens
                rows.append(row)
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    return rows


def summarize_batches(rows: Sequence[dict]) -> list[dict]:
    """Per (batch size, method): tokens / seconds over its groups, speedup vs AR's throughput at the same B
    (same groups, same run), mean acceptance (over rows x rounds), and whether every row equalled AR."""
    acc: dict = defaultdict(lambda: dict(time_s=0.0, new_tokens=0, n=0, accept=[], identical=True, status=set(),
                                         reason=None, split=defaultdict(float)))
    order = []
    for r in rows:
        key = (r["batch_size"], r["method"])
        if key not in acc:
            order.append(key)
        a = acc[key]
        a["status"].add(r["status"])
        a["kind"] = r["kind"]
        if r["status"] != "ok":
            a["reason"] = r["reason"]
            continue
        a["time_s"] += r["time_s"]
        a["new_tokens"] += r["new_tokens"]
        for k in _SPLIT:
            if r.get(k) is not None:
                a["split"][k] += r[k]
        a["n"] += 1
        if r["mean_acceptance_length"] is not None:
            a["accept"].append(r["mean_acceptance_length"])
        if r["identical_to_ar"] is False:
            a["identical"] = False
    out = []
    for B, name in order:
        a = acc[B, name]
        tps = a["new_tokens"] / a["time_s"] if a["time_s"] > 0 else None
        ar = acc.get((B, "ar"))
        ar_tps = ar["new_tokens"] / ar["time_s"] if ar and ar["time_s"] > 0 else None
        out.append(dict(batch_size=B, method=name, kind=a["kind"], groups=a["n"], new_tokens=a["new_tokens"],
                        time_s=a["time_s"], tokens_per_s=tps,
                        speedup_vs_ar=tps / ar_tps if tps and ar_tps else None,
                        mean_acceptance_length=sum(a["accept"]) / len(a["accept"]) if a["accept"] else None,
                        identical_to_ar=a["identical"] if a["n"] else None,
                        split_share={k: a["split"][k] / a["time_s"] for k in _SPLIT} if a["split"] and a["time_s"] else None,
                        status="ok" if a["status"] == {"ok"} else ",".join(sorted(a["status"])), reason=a["reason"]))
    return out


def format_batch_markdown(summary: Sequence[dict], config: dict) -> str:
    lines = [f"Batched generate(): {config.get('device', '?')}, {config.get('dtype', '?')}, "
             f"{config.get('threads', '?')} threads, {config.get('max_new_tokens', '?')} new tokens, greedy; "
             "throughput = generated tokens (to EOS) per second over the batch; speedup vs stock batched AR at the "
             "same B, same groups, same run.", "",
             "| B | method | groups | tok/s | vs AR | acceptance | draft / verify / commit share | identical to AR |",
             "|---:|---|---:|---:|---:|---:|---|---|"]
    for s in summary:
        if s["status"] != "ok" and not s["groups"]:
            lines.append(f"| {s['batch_size']} | {s['method']} | 0 | – | – | – | – | {s['status']}: {s['reason']} |")
            continue
        f = lambda v, fmt="{:.2f}": "–" if v is None else fmt.format(v)  # noqa: E731
        ident = "–" if s["identical_to_ar"] is None else ("yes" if s["identical_to_ar"] else "**NO**")
        sh = s.get("split_share")
        share = "–" if not sh else " / ".join(f"{100 * sh[k]:.0f}%" for k in ("draft_s", "verify_s", "commit_s"))
        lines.append(f"| {s['batch_size']} | {s['method']} | {s['groups']} | {f(s['tokens_per_s'], '{:.1f}')} | "
                     f"{f(s['speedup_vs_ar'])}x | {f(s['mean_acceptance_length'])} | {share} | {ident} |")
    return "\n".join(lines) + "\n"


def plot_batch_throughput(summary: Sequence[dict], path: str | os.PathLike) -> str | None:
    """Throughput vs batch size per method (left) and speedup vs stock batched AR (right)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    methods = list(dict.fromkeys(s["method"] for s in summary if s["tokens_per_s"] is not None))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    sizes = sorted({s["batch_size"] for s in summary})
    for i, m in enumerate(methods):
        color = f"C{i}"  # one colour per method in both panels
        pts = sorted((s["batch_size"], s["tokens_per_s"], s["speedup_vs_ar"]) for s in summary
                     if s["method"] == m and s["tokens_per_s"] is not None)
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=m)
        if m != "ar":
            ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", color=color, label=m)
    ax1.set(xlabel="batch size", ylabel="generated tokens / s (batch)", title="throughput")
    ax2.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax2.set(xlabel="batch size", ylabel="x stock batched AR", title="speedup vs AR (same B)")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def write_batch_results(out_dir: str | os.PathLike, config: dict, rows: Sequence[dict], plots: bool = True) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize_batches(rows)
    md = format_batch_markdown(summary, config)
    files = {"json": str(out / "batch_results.json"), "markdown": str(out / "batch_summary.md")}
    with open(files["json"], "w") as f:
        json.dump({"config": config, "summary": summary, "rows": list(rows)}, f, indent=1)
    with open(files["markdown"], "w") as f:
        f.write(md)
    if plots:
        p = plot_batch_throughput(summary, out / "batch_throughput.png")
        if p:
            files["plot"] = p
    return {"summary": summary, "markdown": md, "files": files}
