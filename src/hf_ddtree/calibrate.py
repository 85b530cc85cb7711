"""CaDDTree calibration: time the loop's OWN round pieces on this machine, fit the latency model
(`budget.LatencyModel`), cache it on disk, and build the policy generate(tree_budget="auto") uses.

What is timed is exactly what `generate.speculative_decoding` calls each round, through the same
functions (no copy of the round here):

  * draft  = `proposer.draft(round)` + `proposer.build(round, drafted)` of the proposer
    `propose.make_proposer` gives the loop (the drafter forward over a few new context tokens +
    block, lm_head, log_softmax, top-k and the tree at the cap; for D2SD both drafters and the merge);
  * verify = `verify.verify_tree` (target forward over the first n nodes of a best-first tree over
    `past_len` cached tokens, processors, accept walk) + `cache.compact`, at sizes `ns`.

Medians of `reps` after `warmup`, interleaved across sizes. The result is cached as JSON under
`$HF_DDTREE_CACHE/latency/` (default `~/.cache/hf_ddtree/latency/`), keyed by `calibration_key`:
model configs, device, dtype, torch and hf_ddtree versions, `CALIBRATION_FORMAT`, cap, method.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch

from . import cache as _cache
from . import propose as _propose
from . import verify as _verify
from .budget import CaDDTreePolicy, LatencyModel
from .compat import cache_kwargs, compiled_call, gather_features, hidden_states_request
from .tree import Tree, build_tree, topk_per_position

logger = logging.getLogger(__name__)

# Bump when what is timed or how changes: a cached calibration of another format is not reused.
CALIBRATION_FORMAT = 3  # 3: the key says whether the forwards are compiled
DEFAULT_PAST_LEN = 256
DEFAULT_MAX_TREE_BUDGET = _propose.DEFAULT_MAX_TREE_BUDGET


def _code_version() -> str:
    from ._version import __version__

    return f"{__version__}+calibration{CALIBRATION_FORMAT}"


def default_sizes(max_nodes: int) -> list[int]:
    """0, 1, 2, 4, ..., powers of two below the cap, and the cap."""
    ns, k = [0], 1
    while k < max_nodes:
        ns.append(k)
        k *= 2
    if max_nodes > 0:
        ns.append(int(max_nodes))
    return ns


def cache_dir() -> Path:
    root = os.environ.get("HF_DDTREE_CACHE")
    if root:
        return Path(root).expanduser() / "latency"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hf_ddtree" / "latency"


def _config_hash(model) -> str:
    if model is None:
        return ""
    config = getattr(model, "config", None)
    if config is None:
        return ""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    for k in ("_name_or_path", "transformers_version", "_commit_hash"):
        d.pop(k, None)
    blob = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cpu_name() -> str:
    """The CPU model ("model name" in /proc/cpuinfo, else what `platform` knows)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{cpu_name()} x{torch.get_num_threads()} threads"
    return device.type


def _param_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def calibration_key(target, drafter, max_nodes: int, past_len: int = DEFAULT_PAST_LEN,
                    cache_implementation: str | None = None, method: str = "auto", drafter2=None,
                    compile_config=None) -> dict:
    """What a cached calibration is valid for (its JSON file is named by this dict's hash).
    compile_config: the CompileConfig the loop compiles its forwards with (None: eager), see `compile_tag`."""
    device, dtype = _param_device_dtype(target)
    cache_implementation = _cache.loop_cache_kind(cache_implementation, compile_config is not None)
    key = {
        "format": CALIBRATION_FORMAT,
        "hf_ddtree": _code_version(),
        "method": method,
        "drafter2_config": _config_hash(drafter2),
        "target": str(getattr(target.config, "_name_or_path", "") or type(target).__name__),
        "target_config": _config_hash(target),
        "attn_implementation": str(getattr(target.config, "_attn_implementation", None)),
        "drafter": "" if drafter is None else str(getattr(drafter.config, "_name_or_path", "") or type(drafter).__name__),
        "drafter_config": _config_hash(drafter),
        "device_type": device.type,
        "device_name": _device_name(device),
        "dtype": str(dtype),
        "drafter_dtype": "" if drafter is None else str(_param_device_dtype(drafter)[1]),
        "torch": torch.__version__,
        "max_nodes": int(max_nodes),
        "past_len": int(past_len),
        "cache_implementation": cache_implementation,
        "compiled": compile_tag(compile_config),
    }
    return key


def compile_tag(compile_config) -> str:
    """"" for eager forwards, else the compile options (backend, mode, dynamic, fullgraph, options) as text."""
    if compile_config is None:
        return ""
    opts = compile_config.to_dict()
    backend = opts.get("backend")
    if callable(backend):
        opts["backend"] = getattr(backend, "__qualname__", type(backend).__name__)
    return repr(sorted((k, repr(v)) for k, v in opts.items()))


def _key_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / f"{digest}.json"


def load_cached(key: dict) -> LatencyModel | None:
    path = _key_path(key)
    try:
        with open(path) as f:
            blob = json.load(f)
        if blob.get("key") != key:
            return None
        return LatencyModel.from_dict(blob["model"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("hf_ddtree: ignoring unreadable latency cache %s (%s); recalibrating.", path, e)
        return None


def save_cached(key: dict, model: LatencyModel) -> Path | None:
    path = _key_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump({"key": key, "model": model.to_dict(), "created": time.time()}, f, indent=1)
        os.replace(tmp, path)
        return path
    except OSError as e:
        logger.warning("hf_ddtree: could not write latency cache %s (%s); it will be recalibrated next time.", path, e)
        return None


def _synthetic_tree(max_nodes: int, depth: int, vocab: int, seed: int = 0) -> Tree:
    """A realistic best-first tree: random peaked per-depth distributions, `max_nodes` nodes."""
    g = torch.Generator().manual_seed(seed)
    width = max(1, min(max_nodes, vocab))
    logits = torch.randn(max(1, depth), vocab, generator=g) * 4.0
    top_lp, top_ids = topk_per_position(torch.log_softmax(logits, dim=-1), width)
    return build_tree(int(torch.randint(vocab, (1,), generator=g)), top_lp, top_ids, max_nodes)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_latency(target, drafter, max_nodes: int, *, ns: Sequence[int] | None = None,
                    past_len: int = DEFAULT_PAST_LEN, reps: int = 5, warmup: int = 1,
                    cache_implementation: str | None = None, progress: bool | None = None,
                    method: str = "auto", drafter2=None, compile_config=None) -> dict:
    """Time the loop's verify (`verify.verify_tree` + `cache.compact`) at sizes `ns` and its draft
    (`proposer.draft` + `proposer.build` of `make_proposer(..., method, max_nodes)`).
    compile_config: time the calls the loop makes when it compiles (`decoding.compile_forwards`): the
    target's compiled call on trees padded to max_nodes + 1 rows with the mask buffer, and the compiled
    drafter (the warmup repetitions absorb the compilation; use warmup >= 1).
    Returns {"ns", "times", "t_draft", "seconds"}.
    """
    from .drafter import validate_pair

    t_start = time.perf_counter()
    ns = sorted({int(n) for n in (default_sizes(max_nodes) if ns is None else ns) if 0 <= int(n) <= max_nodes})
    if not ns:
        raise ValueError(f"no calibration sizes within [0, {max_nodes}].")
    cache_implementation = _cache.loop_cache_kind(cache_implementation, compile_config is not None)
    if compile_config is not None and cache_implementation != "static":
        raise ValueError(f"compile_config needs cache_implementation='static' (the loop compiles only with a static "
                         f"cache), got {cache_implementation!r}.")
    spec = validate_pair(target, drafter) if drafter is not None else None
    spec2 = validate_pair(target, drafter2) if drafter2 is not None else None
    hidden_idx = spec.hidden_state_indices if spec is not None else None
    depth = (spec.block_size - 1) if spec is not None else 15
    device = target.device
    config = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    vocab = target.get_input_embeddings().weight.shape[0]
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos:
        past_len = max(1, min(past_len, int(max_pos) - depth - 2))
    tree = _synthetic_tree(max(ns), depth, vocab)
    trees = {n: tree.truncate(min(n, tree.num_nodes)) for n in ns}

    rows = max_nodes + 1 if compile_config is not None else max(ns) + 1  # the loop pads when it compiles
    kv = _cache.make_cache(target, cache_implementation, past_len + rows)
    forward, mask_out = None, None
    if compile_config is not None:
        forward = compiled_call(target, compile_config)
        trees = {n: t.pad_to(rows) for n, t in trees.items()}
        mask_out = torch.empty(1, 1, rows, _cache.mask_width(kv, 0, rows), dtype=target.dtype, device=device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(vocab, (1, past_len + 1), generator=g).to(device)  # prompt + root
    out = target(input_ids=ids[:, :past_len], position_ids=torch.arange(past_len, device=device)[None],
                 **cache_kwargs(target, kv), use_cache=True, output_hidden_states=hidden_states_request(hidden_idx),
                 logits_to_keep=1)
    empty = torch.zeros(0, dtype=torch.long, device=device)

    def verify_once(n: int) -> float:
        t = trees[n]
        _sync(device)
        t0 = time.perf_counter()
        v = _verify.verify_tree(target, t, kv, past_len, hidden_idx, None, ids, False, mask_out, forward=forward)
        _cache.move_paths(kv, _cache.CacheRows.single(past_len), v.paths)  # the loop's compaction
        _cache.set_lengths(kv, _cache.CacheRows.single(past_len), v.packed[:, 0].tolist())
        _sync(device)
        dt = time.perf_counter() - t0
        _cache.compact(kv, past_len, empty)  # back to exactly past_len cached tokens
        return dt

    draft_once = None
    if drafter is not None:
        feats = gather_features(out, hidden_idx)  # (1, past_len, F)
        new_ctx = min(4, past_len - 1)  # tokens a round typically adds to the drafter's context
        seen = past_len - new_ctx
        primer = _propose.Round(ids[:, :seen + 1], feats[:, :seen], torch.tensor([seen]), depth)
        timed = _propose.Round(ids, feats[:, seen:], torch.tensor([past_len]), depth)

        def _draft_once() -> float:
            proposer = _propose.make_proposer(target, drafter, spec, method, max_nodes, drafter2=drafter2,
                                              spec2=spec2, compile_config=compile_config)
            proposer.draft(primer)  # untimed: the drafter cache holds the context up to `seen`
            ddevice = next(drafter.parameters()).device
            _sync(ddevice)
            t0 = time.perf_counter()
            proposer.build(timed, proposer.draft(timed))
            _sync(ddevice)
            return time.perf_counter() - t0

        draft_once = _draft_once

    bar = None
    total = (warmup + reps) * (len(ns) + (draft_once is not None))
    if progress is not False:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="hf_ddtree: calibrating verify latency", leave=False,
                       disable=None if progress is None else not progress)
        except ImportError:
            bar = None
    samples: dict[int, list[float]] = {n: [] for n in ns}
    draft_samples: list[float] = []
    for rep in range(warmup + reps):
        for n in ns:  # interleaved, so slow drift affects every size alike
            dt = verify_once(n)
            if rep >= warmup:
                samples[n].append(dt)
            if bar is not None:
                bar.update(1)
        if draft_once is not None:
            dt = draft_once()
            if rep >= warmup:
                draft_samples.append(dt)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return {
        "ns": ns,
        "times": [statistics.median(samples[n]) for n in ns],
        "t_draft": statistics.median(draft_samples) if draft_samples else 0.0,
        "seconds": time.perf_counter() - t_start,
    }


_MEMO: dict[str, LatencyModel] = {}


def calibrate(target, drafter=None, max_nodes: int = _propose.DEFAULT_MAX_TREE_BUDGET, *,
              past_len: int = DEFAULT_PAST_LEN, ns: Sequence[int] | None = None, reps: int = 5, warmup: int = 1,
              cache_implementation: str | None = None, use_cache: bool = True, progress: bool | None = None,
              method: str = "auto", drafter2=None, compile_config=None) -> LatencyModel:
    """The LatencyModel of (target, drafter[, drafter2]) on this machine: from memory, the disk cache,
    or timing (`measure_latency`). compile_config: the loop's compiled forwards (None: eager).

    The disk cache key is `calibration_key(...)` (models' configs, device, dtype, torch and
    hf_ddtree versions, cap, past_len, cache kind, method); ns/reps/warmup only affect a fresh
    calibration. use_cache=False always re-times (and overwrites the cache entry).
    """
    if max_nodes < 0:
        raise ValueError(f"max_nodes must be >= 0, got {max_nodes}.")
    key = calibration_key(target, drafter, max_nodes, past_len, cache_implementation, method, drafter2,
                          compile_config)
    tag = json.dumps(key, sort_keys=True) + str(cache_dir())
    if use_cache:
        model = _MEMO.get(tag) or load_cached(key)
        if model is not None:
            _MEMO[tag] = model
            return model
    logger.info("hf_ddtree: calibrating CaDDTree latency model (one-time per model/device; cached in %s)", cache_dir())
    m = measure_latency(target, drafter, max_nodes, ns=ns, past_len=past_len, reps=reps, warmup=warmup,
                        cache_implementation=cache_implementation, progress=progress, method=method,
                        drafter2=drafter2, compile_config=compile_config)
    model = LatencyModel.from_points(m["ns"], m["times"], m["t_draft"], calibration_s=m["seconds"],
                                     reps=reps, warmup=warmup)
    save_cached(key, model)
    _MEMO[tag] = model
    return model


def clear_memory_cache() -> None:
    """Forget in-process calibrations (the disk cache stays)."""
    _MEMO.clear()


def caddtree_policy(target, drafter, max_nodes: int = _propose.DEFAULT_MAX_TREE_BUDGET,
                    latency: LatencyModel | None = None, online: bool = False, calibrate_acceptance: bool = True,
                    **calibrate_kwargs) -> CaDDTreePolicy:
    """The CaDDTree budget policy for generate(tree_budget="auto"): calibrates (or loads the cached
    calibration) unless `latency` is given. Extra kwargs go to `calibrate`."""
    if latency is None:
        latency = calibrate(target, drafter, max_nodes, **calibrate_kwargs)
    return CaDDTreePolicy(latency, max_nodes, online=online, calibrate_acceptance=calibrate_acceptance)
