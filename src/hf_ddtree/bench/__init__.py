"""Benchmarks: AR vs DFlash vs DDTree vs CaDDTree vs D^2SD (plus transformers' PLD and DFlash) on the same prompts.

    hf-ddtree bench --target smollm2-135m --drafter default --dataset humaneval,gsm8k,mt-bench \\
        --methods ar,dflash,ddtree:16,ddtree:64,ddtree:256,caddtree --max-new-tokens 256 \\
        --temperature 0,1 --limit 10 --out results/run1
    hf-ddtree bench ... --methods ar,ddtree:64,d2sd:64,d2sd-tree:64 --drafter2 default --d2sd-boundaries 4 ...
    torchrun --nproc_per_node 2 -m hf_ddtree.cli bench ...     # data parallel: prompts sharded over ranks
    torchrun --no-python --nproc_per_node 2 hf-ddtree bench ...  # the same through the console script

From Python: `run_benchmark(target, tokenizer, drafter, prompts, "ar,dflash,ddtree:64", temperatures=[0])`
returns rows (D^2SD methods also take `drafter2=<variable-prefix drafter>, d2sd_boundaries=4`);
`write_results(out_dir, config, rows)` writes everything below.

How it measures
---------------
* Every method runs on the same prompts in the same process, prompt-major (for each prompt, for each
  temperature, every method, AR first), so machine-load drift hits all methods alike.
* `torch.manual_seed(seed + prompt_index)` before every generation; `--warmup` untimed generations per
  method first; CaDDTree's latency calibration happens before any timing.
* Methods: `ar` (stock generate, the baseline), `dflash` (tree_budget=None), `ddtree:N` (tree_budget=N),
  `caddtree` (tree_budget="auto", max_tree_budget=--max-tree-budget), `ddtree-lookup:N` / `caddtree-lookup`
  (method="ddtree-lookup": the DDTree heap plus n-gram lookup continuations of the prompt and the output,
  tree_budget=N / "auto"), `d2sd:N` / `d2sd-tree:N` (D^2SD:
  assistant_model=(drafter, drafter2), method="d2sd" / "d2sd-tree", tree_budget=N,
  d2sd_boundaries=--d2sd-boundaries; drafter2 = --drafter2, by default the variable-prefix drafter shipped
  for the target, `models.load_default_drafter(target, variant="prefix")`; if it cannot be loaded, or
  does not fit drafter 1 (target layers, block size), these methods are "skipped" with the reason and
  the run goes on; a drafter2 without dflash_config["variable_prefix"] runs, noted; draft_s holds both
  drafters' forwards), `pld` (transformers prompt lookup, prompt_lookup_num_tokens=10), `hf-dflash`
  (transformers' built-in DFlash: generate(assistant_model=drafter, speculation_type="dflash"); if the
  drafter does not speak that interface natively it is driven through `runner.HFDFlashAdapter`, noted
  in the rows). A method that raises is not retried: its rows get status "skipped" (pld, hf-dflash)
  or "error" (ours, d2sd included), with the reason; the run goes on.
* Acceptance length = tokens committed per target forward, prefill excluded (mean of per-round
  acceptance lengths; AR = 1.0). For stock generate() methods the rounds are read from the KV length
  at each target forward (`runner.ForwardRecorder`).
* Speedup = (sum of AR times) / (sum of the method's times) over the same prompts and temperature.

results.json
------------
{
  "schema_version": 1,
  "config": {command, argv, process_argv, target, drafter, drafter2 (null when no d2sd method),
             d2sd_boundaries, datasets, n_prompts, methods, temperatures,
             max_new_tokens, limit, dtype, attn_implementation, device (CPU model or GPU name),
             device_type, threads (rank 0), world_size, ranks: [{rank, device, threads, prompts, wall_s,
             loadavg_start, loadavg_end (1/5/15-min load: other work on the machine), error}], wall_s,
             rank_errors [str], seed, warmup, max_tree_budget, pld_tokens, generation_config {top_k,
             top_p, min_p, repetition_penalty, eos_token_id}, drafter_block_size, hf_ddtree, torch,
             transformers, python, finished},
  "skipped": {method: {status, reason}},           # methods that never ran
  "summary": [summary, ...],                        # as results.csv, lists kept as lists
  "rows": [row, ...]                                # one per line in the file
}

row (one per prompt x temperature x method):
  prompt_id str, dataset str, prompt_index int (global), prompt_tokens int, method str ("ddtree:64"),
  kind str (ar|dflash|ddtree|caddtree|ddtree-lookup|caddtree-lookup|d2sd|d2sd-tree|pld|hf-dflash), tree_budget
  int (ddtree/ddtree-lookup/d2sd/d2sd-tree)|"auto" (caddtree, caddtree-lookup)|null, temperature float,
  seed int, rank int, status "ok"|"skipped"|"error", reason str|null, note str|null,
  new_tokens int, time_s float, tokens_per_s float, target_forwards int (prefill included),
  rounds int (verify forwards), acceptance_lengths [int] (per round; null if unknown),
  mean_acceptance_length float|null, tree_sizes [int]|null (our methods),
  prefill_s, draft_s, tree_s, verify_s, commit_s float|null (our methods, collect_timing=True),
  identical_to_ar bool|null (temperature 0 only), first_mismatch int|null (index into new tokens),
  mismatch_margin float|null (the target's top-1 minus top-2 logit at first_mismatch, from a plain
  forward over the shared prefix: a near-tie is rounding, bf16's above all; a wide margin is a bug),
  mismatch_gap float|null (logit of AR's token minus logit of this method's token there),
  output_ids [int] (generated tokens)
  (fields of a skipped/error row other than the identity ones are null / 0)

summary (results.csv: one row per dataset x method x temperature, then dataset "all" rows pooling
every dataset; same columns):
  dataset, method, kind, tree_budget, temperature, status ("ok"|"partial"|"skipped"|"error"), reason,
  note, n_prompts (ok), n_skipped, new_tokens, time_s, tokens_per_s, rounds, mean_acceptance_length,
  speedup_vs_ar, ar_baseline ("ar", or "ar-static" when that was faster: see --compile), ar_time_s,
  ar_tokens_per_s, identity_vs_ar (fraction, temperature 0 only),
  n_mismatches, mismatches ("dataset/prompt_id@first_mismatch (margin m)"; ";"-joined in the CSV),
  max_mismatch_margin (the widest top-2 margin among them),
  prefill_s, draft_s, tree_s, verify_s, commit_s (sums), other_s (time not in the split: generate()
  set-up, Python), mean_tree_size

Other files: summary.md (the markdown tables printed at the end), speedup_vs_budget.png (speedup vs
tree budget per dataset: ddtree:N circles, d2sd:N squares, d2sd-tree:N triangles as their own lines,
dflash dashed / caddtree dotted horizontals, one panel per temperature),
acceptance_hist.png (per-round acceptance lengths, one panel per method and temperature).
With --compile [BACKEND] (run_benchmark(compile_config=...)): our methods run with a static cache
and generate()'s compile convention, and a row "ar-static" (kind "ar-static": stock generate() with a
static cache and the same compile setting) follows every "ar" row; speedups are against the faster of
the two per temperature (ar_baseline). ar-static mismatches are reported, not fatal (it is stock's).
Exit status: 1 if one of our methods errored or (fp32) differed from AR at temperature 0.
"""

from .report import format_markdown, summarize, write_results
from .runner import (
    BenchPrompt,
    Method,
    VALID_METHODS,
    merge_rows,
    parse_methods,
    prepare_prompts,
    run_benchmark,
    shard_prompts,
)

__all__ = [
    "BenchPrompt",
    "Method",
    "VALID_METHODS",
    "format_markdown",
    "merge_rows",
    "parse_methods",
    "prepare_prompts",
    "run_benchmark",
    "shard_prompts",
    "summarize",
    "write_results",
]
