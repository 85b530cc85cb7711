"""`hf-ddtree bench`: argument parsing, model and prompt loading, data-parallel sharding, output."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_ddtree.device import BF16_CPU_FLAGS, DTYPE_CHOICES, cpu_flags, resolve_dtype
from hf_ddtree.propose import D2SD_BOUNDARIES, D2SD_MAX_BRANCHES, DEFAULT_MAX_TREE_BUDGET, MAX_TREE_BUDGET

from .runner import (AR_STATIC, BenchPrompt, Method, make_compile_config, merge_rows, parse_methods, prepare_prompts,
                     run_benchmark, shard_prompts)

KNOWN_DATASETS = ("humaneval", "gsm8k", "mt-bench")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hf-ddtree bench",
        description=(
            "Benchmark AR / DFlash / DDTree / CaDDTree / D^2SD (and transformers' PLD and DFlash) on the same prompts in "
            "one process, methods interleaved per prompt. Writes results.json, results.csv, summary.md and plots. "
            "Data parallel under torchrun: prompts are sharded across ranks and merged on rank 0. "
            "Tensor parallel with --tp N under torchrun --nproc-per-node N: the target is sharded over the N ranks "
            "(transformers tp_plan='auto'), every rank decodes every prompt, rank 0 reports."),
        epilog=(
            "example: hf-ddtree bench --target smollm2-135m --drafter default --dataset humaneval,gsm8k,mt-bench "
            "--methods ar,dflash,ddtree:16,ddtree:64,ddtree:256,caddtree --max-new-tokens 256 --temperature 0,1 "
            "--limit 10 --out results/run1"))
    p.add_argument("--target", default="smollm2-135m",
                   help="'smollm2-135m' (embedded, offline) or a local model directory / Hub repo id")
    p.add_argument("--drafter", default="default",
                   help="'default' (the drafter shipped for the target) or a local directory / Hub repo id of a DFlash drafter")
    p.add_argument("--dataset", default="humaneval,gsm8k,mt-bench",
                   help=f"comma list of {', '.join(KNOWN_DATASETS)}, or .jsonl files with one {{'text'|'input_ids', 'id'?}} per line")
    p.add_argument("--drafter2", default="default",
                   help="second, variable-prefix drafter for d2sd:N / d2sd-tree:N: 'default' (the one shipped for the "
                        "target, assets/drafters/<target>-prefix) or a local directory / Hub repo id. If it cannot be "
                        "loaded, the d2sd methods are reported as skipped with the reason")
    p.add_argument("--d2sd-boundaries", type=int, default=D2SD_BOUNDARIES,
                   help=f"D^2SD: rejection depths per round at which drafter 2 re-anchors (1..{D2SD_MAX_BRANCHES})")
    p.add_argument("--methods", default="ar,dflash,ddtree:16,ddtree:64,ddtree:256,caddtree",
                   help="comma list of ar, dflash, ddtree:N, caddtree, ddtree-lookup:N, caddtree-lookup, d2sd:N, d2sd-tree:N, pld, hf-dflash "
                        "(N = tree budget; ar is always added: it is the baseline)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", default="0", help="comma list; 0 = greedy (checked for identity with AR)")
    p.add_argument("--limit", type=int, default=None, help="prompts per dataset (default: all)")
    p.add_argument("--dtype", default="auto", choices=list(DTYPE_CHOICES),
                   help="auto (default): bf16 where the device computes bf16 natively (CUDA, CPUs with avx512_bf16 / "
                        "amx_bf16), else fp32; every method, AR and prompt lookup included, runs in it. Greedy output "
                        "is checked token for token against AR in fp32; in bf16 differences are reported with the "
                        "target's top-2 margin where they start")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="target attn_implementation")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process (default: torch's, divided among local ranks under torchrun)")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed(seed + prompt_index) before every generation")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up generations per method before timing")
    p.add_argument("--max-tree-budget", type=int, default=DEFAULT_MAX_TREE_BUDGET,
                   help="node cap for caddtree (tree_budget='auto')")
    p.add_argument("--pld-tokens", type=int, default=10, help="prompt_lookup_num_tokens for the pld baseline")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel degree: shard the target over N ranks with transformers' tp_plan='auto' "
                        "(run under torchrun --nproc-per-node N, N = the world size; needs accelerate: "
                        "pip install 'hf_ddtree[tp]'). 1 (default): under torchrun, ranks split the prompts instead")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="run under a compile setting (torch.compile backend, default inductor): our methods use a static "
                        "cache and generate()'s compile convention (compiled verify and drafter forwards), and AR is "
                        "measured twice, stock generate() as it comes ('ar') and with a static cache and the same "
                        "compile setting ('ar-static'); speedups are against the faster of the two")
    p.add_argument("--batch-size", default=None, metavar="B[,B...]",
                   help="batched mode: cut the prompts into left-padded groups of B and report throughput (generated "
                        "tokens per second over the batch) of each method against stock batched AR at the same B, in the "
                        "same run (batch_summary.md, batch_results.json, batch_throughput.png); e.g. 1,2,4,8. Greedy, "
                        "single process")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_temperatures(spec: str) -> list[float]:
    try:
        temps = [float(t) for t in spec.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--temperature must be a comma list of numbers >= 0, got {spec!r}") from None
    if not temps or any(t < 0 for t in temps):
        raise ValueError(f"--temperature must be a comma list of numbers >= 0, got {spec!r}")
    return list(dict.fromkeys(temps))


def _dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """--dtype as a torch dtype ("auto" for `device`; the CLI resolves it once up front, `resolve_dtype_arg`)."""
    return resolve_dtype(name, device)[0]


def resolve_dtype_arg(args, device: torch.device, log) -> None:
    """Turn `--dtype auto` into fp32 / bf16 for `device` (args.dtype_requested keeps what was asked), and say which."""
    args.dtype_requested = args.dtype
    dtype, why = resolve_dtype(args.dtype, device)
    args.dtype = "bf16" if dtype == torch.bfloat16 else "fp32"
    log(f"dtype: {why}")


# ------------------------------------------------------------------------------------------------
# Distributed (torchrun) helpers
# ------------------------------------------------------------------------------------------------

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env(env=None) -> DistInfo:
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", str(rank)))
    local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    return DistInfo(rank, world, local_rank, local_world)


def init_distributed(info: DistInfo, tensor_parallel: bool = False) -> DistInfo:
    if info.world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            # data parallel: object gathering only, models run per rank. Tensor parallel: the target's
            # collectives run on this group too (nccl for CUDA tensors, gloo for CPU ones).
            backend = "cpu:gloo,cuda:nccl" if tensor_parallel and torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
            info.initialized_here = True
    return info


def gather_to_main(obj, info: DistInfo) -> list | None:
    """[obj of rank 0, obj of rank 1, ...] on rank 0 (None elsewhere); [obj] when not distributed."""
    if info.world_size <= 1:
        return [obj]
    import torch.distributed as dist

    parts: list = [None] * info.world_size
    dist.all_gather_object(parts, obj)
    return parts if info.is_main else None


def default_threads(info: DistInfo) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, info.local_world_size))


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------

def resolve_device(spec: str, info: DistInfo) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{info.local_rank % torch.cuda.device_count()}") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cuda" and info.world_size > 1:
        return torch.device(f"cuda:{info.local_rank % torch.cuda.device_count()}")
    return torch.device(spec)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda)"
    from hf_ddtree.calibrate import cpu_name

    return f"{cpu_name()} (cpu, {os.cpu_count()} logical cores)"


def load_target_and_tokenizer(name: str, dtype: torch.dtype, attn: str, **from_pretrained_kwargs):
    """Known embedded targets via hf_ddtree.models.load_target; paths / Hub ids via transformers, with the
    tokenizer optional (pre-tokenized prompts need none). Extra kwargs (tp_plan) go to from_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    known = ()
    try:
        from hf_ddtree import models

        known = tuple(getattr(models, "TARGETS", ()))
    except ImportError:
        models = None
    if models is not None and (name in known or not (Path(name).expanduser().exists() or "/" in name)):
        return models.load_target(name, dtype=dtype, attn_implementation=attn, **from_pretrained_kwargs)
    path = str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn,
                                                 **from_pretrained_kwargs).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception:  # e.g. a bare model directory; fine for token-id prompts
        tokenizer = None
    return model, tokenizer


def load_drafter(spec: str, target, dtype: torch.dtype, variant: str = "dflash"):
    """'default' -> the drafter shipped for the target (`variant` "dflash", or "prefix" for D^2SD's second
    drafter); else a local directory or a Hub repo id. Moved to the target's device, validated."""
    from hf_ddtree.drafter import validate_pair

    device = next(target.parameters()).device
    if spec == "default":
        from hf_ddtree.models import load_default_drafter

        drafter = load_default_drafter(target, variant=variant)
    elif Path(spec).expanduser().is_dir():
        from hf_ddtree.drafter.vocab import attach_draft_vocab
        from hf_ddtree.drafter import DFlashDraftModel

        folder = Path(spec).expanduser()
        drafter = DFlashDraftModel.from_pretrained(str(folder), dtype=dtype)
        # a shortlist in the folder, as hub.load_drafter reads it (a plain attribute: .to() below leaves it)
        attach_draft_vocab(drafter, folder, target.get_output_embeddings().weight.shape[0])
    else:  # a Hub id: the same loader users call (safetensors only, the shortlist attached, fields checked)
        from hf_ddtree.hub import load_drafter as load_from_hub

        drafter = load_from_hub(spec, dtype=dtype)
    drafter = drafter.to(device=device, dtype=dtype).eval()
    validate_pair(target, drafter)
    return drafter


def load_drafter2(args, target, drafter) -> tuple[object | None, str | None]:
    """(drafter2, None), or (None, why) when a d2sd method is asked for but --drafter2 cannot be used;
    (None, None) when no method needs it. Never raises: the d2sd methods are then reported as skipped."""
    if not any(m.needs_drafter2 for m in parse_methods(args.methods)):
        return None, None
    try:
        d2 = load_drafter(args.drafter2, target, _dtype(args.dtype, next(target.parameters()).device), variant="prefix")
        if drafter is not None:
            from hf_ddtree.drafter import drafter_spec, validate_d2sd_pair

            validate_d2sd_pair(drafter_spec(drafter), drafter_spec(d2))
        return d2, None
    except Exception as e:
        return None, f"--drafter2 {args.drafter2!r}: {type(e).__name__}: {e}"


def load_pair(args, device: torch.device):
    """(target, tokenizer, drafter) on `device`; drafter is None when no method needs one. With --tp > 1
    the target is sharded by transformers (tp_plan="auto" places each rank's shard) and the drafter is
    a full copy next to it."""
    dtype = _dtype(args.dtype, device)
    if getattr(args, "tp", 1) > 1:
        target, tokenizer = load_target_and_tokenizer(args.target, dtype, args.attn, tp_plan="auto")
    else:
        target, tokenizer = load_target_and_tokenizer(args.target, dtype, args.attn)
        target = target.to(device).eval()
    methods = parse_methods(args.methods)
    drafter = None
    if any(m.kind not in ("ar", "pld") for m in methods):
        drafter = load_drafter(args.drafter, target, dtype)
    return target, tokenizer, drafter


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            if line.strip():
                d = json.loads(line)
                d.setdefault("id", str(i))
                out.append(d)
    return out


def load_bench_prompts(dataset_spec: str, tokenizer, limit: int | None) -> list[BenchPrompt]:
    """All datasets' prompts, tokenized, with global indices (identical on every rank)."""
    items: list = []
    for name in [d.strip() for d in dataset_spec.split(",") if d.strip()]:
        path = Path(name).expanduser()
        if path.suffix in (".jsonl", ".json") and path.is_file():
            recs = _read_jsonl(path)[: limit if limit else None]
            items += [{**r, "dataset": r.get("dataset", path.stem)} for r in recs]
        elif name in KNOWN_DATASETS:
            from hf_ddtree.data import load_prompts

            items += [{"id": str(p.id), "dataset": str(getattr(p, "dataset", name) or name), "text": p.text}
                      for p in load_prompts(name, limit=limit)]
        else:
            raise ValueError(f"unknown dataset {name!r}: use {', '.join(KNOWN_DATASETS)} or a .jsonl file path.")
    if not items:
        raise ValueError(f"no prompts in --dataset {dataset_spec!r}.")
    return prepare_prompts(items, tokenizer)


def _versions() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def build_config(args, argv, info: DistInfo, device: torch.device, methods: list[Method], temps, prompts,
                 target=None, drafter=None) -> dict:
    gc = getattr(target, "generation_config", None)
    gen = {k: getattr(gc, k, None) for k in ("top_k", "top_p", "min_p", "repetition_penalty", "eos_token_id")} if gc else {}
    try:
        import hf_ddtree

        version = hf_ddtree.__version__
    except Exception:
        version = None
    return {
        "command": shlex.join(["hf-ddtree", "bench", *argv]),
        "argv": list(argv),
        "process_argv": list(sys.argv),
        "target": args.target,
        "drafter": args.drafter,
        "drafter2": args.drafter2 if any(m.needs_drafter2 for m in methods) else None,
        "d2sd_boundaries": args.d2sd_boundaries,
        "datasets": list(dict.fromkeys(p.dataset for p in prompts)),
        "n_prompts": len(prompts),
        "methods": [m.name for m in methods],
        "temperatures": list(temps),
        "max_new_tokens": args.max_new_tokens,
        "limit": args.limit,
        "dtype": args.dtype,
        "dtype_requested": getattr(args, "dtype_requested", args.dtype),
        "cpu_flags_bf16": sorted(cpu_flags() & BF16_CPU_FLAGS) if device.type == "cpu" else None,
        "attn_implementation": args.attn,
        "device": describe_device(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "world_size": info.world_size,
        "tensor_parallel": getattr(args, "tp", 1),
        "seed": args.seed,
        "warmup": args.warmup,
        "max_tree_budget": args.max_tree_budget,
        "pld_tokens": args.pld_tokens,
        "compile": getattr(args, "compile", None),
        "generation_config": gen,
        "drafter_block_size": getattr(drafter, "block_size", None),
        "hf_ddtree": version,
        **_versions(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------

def exit_code(rows: list[dict], dtype: str) -> int:
    """1 if one of our methods errored, or (fp32) differed from AR at temperature 0; else 0."""
    core = [r for r in rows if r["kind"] not in ("pld", "hf-dflash", "ar-static")]  # ar-static is stock's, not ours
    if any(r["status"] == "error" for r in core):
        return 1
    if dtype == "fp32" and any(r["identical_to_ar"] is False for r in core):
        return 1
    return 0


def bench_main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        methods = parse_methods(args.methods)
        temps = parse_temperatures(args.temperature)
    except ValueError as e:
        parser.error(str(e))
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    if not 1 <= args.max_tree_budget <= MAX_TREE_BUDGET:
        parser.error(f"--max-tree-budget must be in 1..{MAX_TREE_BUDGET}")
    if not 1 <= args.d2sd_boundaries <= D2SD_MAX_BRANCHES:
        parser.error(f"--d2sd-boundaries must be in 1..{D2SD_MAX_BRANCHES}")
    info = dist_info_from_env()
    if args.tp < 1 or (args.tp > 1 and args.tp != info.world_size):
        parser.error(f"--tp {args.tp} needs exactly {args.tp} ranks: run it as torchrun --nproc-per-node {args.tp} "
                     f"-m hf_ddtree.cli bench ... --tp {args.tp} (this run has {info.world_size}); data parallel x "
                     "tensor parallel is not supported")
    if args.tp > 1 and importlib.util.find_spec("accelerate") is None:
        parser.error("--tp needs accelerate (transformers' tp_plan loading): pip install 'hf_ddtree[tp]'")

    if args.batch_size is not None:
        try:
            sizes = [int(b) for b in args.batch_size.split(",") if b.strip()]
        except ValueError:
            sizes = []
        if not sizes or min(sizes) < 1:
            parser.error(f"--batch-size must be a comma list of ints >= 1, got {args.batch_size!r}")
        if info.world_size > 1 or args.tp > 1 or args.compile or temps != [0.0]:
            parser.error("--batch-size runs greedy, eager, in one process: drop torchrun / --tp / --compile / --temperature")
        return _run_batched(args, argv, methods, sizes)
    if args.compile:  # the second AR baseline, right after ar (run_benchmark adds it the same way)
        methods = methods[:1] + [Method(AR_STATIC, AR_STATIC)] + methods[1:]
    info = init_distributed(info, tensor_parallel=args.tp > 1)
    try:
        return _run(args, argv, methods, temps, info)
    finally:
        if info.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(args, argv, methods, temps, info: DistInfo) -> int:
    def log(msg: str) -> None:
        print(msg if info.world_size == 1 else f"[rank {info.rank}] {msg}", file=sys.stderr, flush=True)

    device = resolve_device(args.device, info)
    resolve_dtype_arg(args, device, log if info.rank == 0 else (lambda m: None))
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu" and info.world_size > 1:
        torch.set_num_threads(default_threads(info))
    torch.manual_seed(args.seed)

    rows: list[dict] = []
    rank_info = {"rank": info.rank, "device": describe_device(device), "threads": torch.get_num_threads(),
                 "prompts": 0, "wall_s": 0.0, "loadavg_start": _loadavg(), "error": None}
    target = drafter = None
    prompts: list[BenchPrompt] = []
    try:
        log(f"loading target {args.target!r} and drafter {args.drafter!r} ({args.dtype}, {device}, "
            f"{torch.get_num_threads()} threads) ...")
        target, tokenizer, drafter = load_pair(args, device)
        drafter2, drafter2_error = load_drafter2(args, target, drafter)
        if drafter2_error:
            log(f"second drafter unavailable, d2sd methods will be skipped: {drafter2_error}")
        prompts = load_bench_prompts(args.dataset, tokenizer, args.limit)
        tp = args.tp > 1  # tensor parallel: every rank decodes every prompt (the target's forwards are collectives)
        mine = list(prompts) if tp else shard_prompts(prompts, info.rank, info.world_size)
        rank_info["prompts"] = len(mine)
        log(f"{len(mine)} of {len(prompts)} prompts x {len(temps)} temperature(s) x {len(methods)} methods")
        t0 = time.perf_counter()
        rows = run_benchmark(
            target, tokenizer, drafter, mine, methods, temperatures=temps, max_new_tokens=args.max_new_tokens,
            seed=args.seed, warmup=args.warmup, max_tree_budget=args.max_tree_budget, pld_tokens=args.pld_tokens,
            drafter2=drafter2, drafter2_error=drafter2_error, d2sd_boundaries=args.d2sd_boundaries,
            rank=info.rank, progress=not args.no_progress, log=log,
            compile_config=make_compile_config(args.compile) if args.compile else None)
        rank_info["wall_s"] = time.perf_counter() - t0
    except Exception as e:
        if info.world_size == 1:
            raise
        # keep the other ranks from waiting forever in the gather: report the failure through it
        import traceback

        rank_info["error"] = f"{type(e).__name__}: {e}"
        log("failed:\n" + traceback.format_exc())
    rank_info["loadavg_end"] = _loadavg()

    parts = gather_to_main((rows, rank_info), info)
    if parts is None:
        return 1 if rank_info["error"] else exit_code(rows, args.dtype)
    errors = [f"rank {p[1]['rank']}: {p[1]['error']}" for p in parts if p[1]["error"]]
    if errors and not any(p[0] for p in parts):
        for e in errors:
            log(f"ERROR {e}")
        return 1
    if args.tp > 1:
        # every rank decoded every prompt: report rank 0's rows and timings, check the others made the same tokens
        diverged = tp_divergence([p[0] for p in parts])
        errors += [f"tensor parallel: {d}" for d in diverged]
        all_rows = merge_rows([parts[0][0]], [m.name for m in methods])
    else:
        all_rows = merge_rows([p[0] for p in parts], [m.name for m in methods])
    config = build_config(args, argv, info, device, methods, temps, prompts, target, drafter)
    config["ranks"] = [p[1] for p in parts]
    config["wall_s"] = max(p[1]["wall_s"] for p in parts)
    config["rank_errors"] = errors
    if args.tp > 1:
        config["tp_ranks_identical"] = not any(e.startswith("tensor parallel:") for e in errors)

    from .report import write_results

    res = write_results(args.out, config, all_rows, [m.name for m in methods], plots=not args.no_plots)
    print(res["markdown"])
    for s in res["summary"]:
        if s["dataset"] == "all" and s["n_mismatches"]:
            log(f"WARNING: {s['method']} T={s['temperature']:g} differs from AR on {s['n_mismatches']} prompt(s): "
                f"{', '.join(s['mismatches'][:10])}")
    for e in errors:
        log(f"ERROR {e} (its prompts are missing from the results)")
    log("wrote " + ", ".join(sorted(res["files"].values())))
    return 1 if errors else exit_code(all_rows, args.dtype)


def _run_batched(args, argv, methods, sizes: list[int]) -> int:
    """`--batch-size`: every method on the same left-padded groups of B prompts, against stock batched AR."""
    from .batch import run_batch_benchmark, write_batch_results

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    device = resolve_device(args.device, DistInfo())
    resolve_dtype_arg(args, device, log)
    if args.threads:
        torch.set_num_threads(args.threads)
    log(f"loading target {args.target!r} and drafter {args.drafter!r} ({args.dtype}, {device}) ...")
    target, tokenizer, drafter = load_pair(args, device)
    drafter2, drafter2_error = load_drafter2(args, target, drafter)
    if drafter2_error:
        log(f"second drafter unavailable: {drafter2_error}")
    prompts = load_bench_prompts(args.dataset, tokenizer, args.limit)
    eos = getattr(target.generation_config, "eos_token_id", None)
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad = pad if pad is not None else getattr(target.generation_config, "pad_token_id", None)
    t0 = time.perf_counter()
    loadavg = _loadavg()
    rows = run_batch_benchmark(target, drafter, prompts, methods, sizes, max_new_tokens=args.max_new_tokens,
                               pad_token_id=pad, eos_token_ids=eos, drafter2=drafter2,
                               max_tree_budget=args.max_tree_budget, warmup=args.warmup,
                               progress=not args.no_progress, log=log)
    config = build_config(args, argv, DistInfo(), device, methods, [0.0], prompts, target, drafter)
    config.update(batch_sizes=sizes, wall_s=time.perf_counter() - t0, loadavg_start=loadavg, loadavg_end=_loadavg())
    res = write_batch_results(args.out, config, rows, plots=not args.no_plots)
    print(res["markdown"])
    log("wrote " + ", ".join(sorted(res["files"].values())))
    ours = [r for r in rows if r["kind"] not in ("ar", "pld", "hf-dflash")]
    bad = [r for r in ours if r["status"] == "error" or (args.dtype == "fp32" and r["identical_to_ar"] is False)]
    return 1 if bad else 0


def tp_divergence(rows_per_rank: list[list[dict]]) -> list[str]:
    """Under --tp every rank decodes every prompt: '<prompt> <method> T=<t>: rank r differs' for each row
    whose output tokens differ from rank 0's (hf_ddtree's methods must agree exactly; an empty list is success)."""
    def key(r):
        return (r["prompt_index"], r["method"], r["temperature"])

    ref = {key(r): r.get("output_ids") for r in rows_per_rank[0]}
    out = []
    for rank, rows in enumerate(rows_per_rank[1:], start=1):
        for r in rows:
            if key(r) in ref and r.get("output_ids") != ref[key(r)]:
                out.append(f"prompt {r['prompt_index']} {r['method']} T={r['temperature']:g}: rank {rank} differs from rank 0")
    return out


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine, to read timings against."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None
