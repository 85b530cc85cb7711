"""CaDDTree: pick each round's tree budget to maximise tokens per second, not tokens per round.

Acceptance length only grows with the budget, so a fixed large tree wastes verification time
once the extra nodes are unlikely to be accepted. CaDDTree trades the two off explicitly:

  * E(n) = 1 + sum_{i<=n} p_i, the expected tokens committed by a round that verifies the first n
    nodes of the best-first tree (p_i = exp(score_i), the drafter's surrogate path probability;
    non-increasing in pop order, so E is concave and non-decreasing in n);
  * T(n) = t_draft + t_verify(n), the round's latency, with t_verify a convex non-decreasing
    piecewise-linear fit to timings of the real target's tree-verify forward;
  * F(n) = E(n) / T(n), the round's throughput.

The policy also rescales the surrogate online, E(n) = 1 + r * sum p_i, with r the observed ratio of
accepted draft tokens to promised path probability (see `CaDDTreePolicy`): drafters are rarely calibrated.

With E concave and T convex and positive, F is unimodal (its superlevel sets {E - a T >= 0} are
intervals, and it has no flat step before a rise), so growing n while F(n+1) > F(n) and stopping at
the first non-increase finds the global maximum: `choose_budget`. `exhaustive_best_budget` is the
reference argmax.

Calibration (`calibrate`) times `verify.run_tree` (+ walk + compact) on a synthetic best-first tree
at a few sizes and the drafter's round (forward + lm_head + top-k + tree build at the cap), fits the
convex curve, and caches the result as JSON under `$HF_DDTREE_CACHE/latency/` (default
`~/.cache/hf_ddtree/latency/`), keyed by model configs, device, dtype, torch version and cap.
`caddtree_policy` wraps it all into the `policy(tree) -> n` that generate(tree_budget="auto") uses.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .compat import cache_kwargs, gather_features, hidden_states_request
from .tree import Tree, build_tree, topk_per_position

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
DEFAULT_PAST_LEN = 256


# ------------------------------------------------------------------------------------------------
# Convex fit
# ------------------------------------------------------------------------------------------------

def fit_convex_nondecreasing(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    """Fit a convex, non-decreasing piecewise-linear function to points (xs, ys).

    Duplicate xs are averaged. The segment slopes are made non-decreasing with weighted
    pool-adjacent-violators (weights = segment lengths, so pooling a run of segments replaces it by
    the chord between its end points), negative slopes are clipped to 0, and the curve is then
    shifted vertically by the least-squares offset. Input that is already convex and non-decreasing
    is returned unchanged. Returns (knots_x, knots_y), xs sorted ascending.
    """
    if len(xs) != len(ys) or not xs:
        raise ValueError("fit_convex_nondecreasing needs as many ys as xs, and at least one point.")
    groups: dict[float, list[float]] = {}
    for x, y in zip(xs, ys):
        x, y = float(x), float(y)
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"non-finite latency point ({x}, {y}).")
        groups.setdefault(x, []).append(y)
    kx = sorted(groups)
    ky = [sum(groups[x]) / len(groups[x]) for x in kx]
    cnt = [len(groups[x]) for x in kx]
    if len(kx) == 1:
        return kx, ky
    dx = [b - a for a, b in zip(kx, kx[1:])]
    # PAVA on slopes: blocks of [weighted slope sum, weight, number of segments]
    blocks: list[list[float]] = []
    for i, w in enumerate(dx):
        blocks.append([ky[i + 1] - ky[i], w, 1])  # slope * weight, weight, count
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, w2, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += w2
            blocks[-1][2] += c
    slopes: list[float] = []
    for s, w, c in blocks:
        slopes.extend([max(0.0, s / w)] * int(c))
    cum = [0.0]
    for s, w in zip(slopes, dx):
        cum.append(cum[-1] + s * w)
    total = sum(cnt)
    offset = sum(c * (y - f) for c, y, f in zip(cnt, ky, cum)) / total
    return kx, [offset + f for f in cum]


def _is_convex_nondecreasing(xs: Sequence[float], ys: Sequence[float], tol: float = 1e-9) -> bool:
    slopes = [(ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) for i in range(len(xs) - 1)]
    scale = max((abs(y) for y in ys), default=1.0) or 1.0
    return all(s >= -tol * scale for s in slopes) and all(b >= a - tol * scale for a, b in zip(slopes, slopes[1:]))


# ------------------------------------------------------------------------------------------------
# Latency model
# ------------------------------------------------------------------------------------------------

@dataclass
class LatencyModel:
    """T(n) = t_draft + t_overhead + t_verify(n) seconds for a round that verifies n tree nodes.

    t_verify is piecewise linear through (knots_n, knots_t), convex and non-decreasing, and
    extrapolated linearly with its last slope beyond the last knot (flat below the first).
    t_overhead is a per-round constant that the online refinement learns (0 after calibration).
    """

    knots_n: list[float]
    knots_t: list[float]
    t_draft: float = 0.0
    t_overhead: float = 0.0
    raw_n: list[float] = field(default_factory=list)
    raw_t: list[float] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    _totals: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if len(self.knots_n) != len(self.knots_t) or not self.knots_n:
            raise ValueError("LatencyModel needs matching, non-empty knots_n and knots_t.")
        if not _is_convex_nondecreasing(self.knots_n, self.knots_t, tol=1e-7):
            raise ValueError("LatencyModel knots must be convex and non-decreasing: build it with from_points().")
        if not self.total_time(0) > 0:
            raise ValueError(f"round latency T(0) must be > 0, got {self.total_time(0)}: pass positive times "
                             "(or a positive t_draft).")

    @classmethod
    def from_points(cls, ns: Sequence[float], times: Sequence[float], t_draft: float = 0.0, **meta) -> "LatencyModel":
        """Fit the convex non-decreasing verify curve to measured (n, seconds) points."""
        kx, ky = fit_convex_nondecreasing(ns, times)
        return cls(kx, ky, float(t_draft), 0.0, [float(n) for n in ns], [float(t) for t in times], dict(meta))

    def verify_time(self, n: float) -> float:
        xs, ys = self.knots_n, self.knots_t
        if len(xs) == 1 or n <= xs[0]:
            return ys[0]
        j = min(bisect.bisect_right(xs, n), len(xs) - 1)  # segment [j-1, j]; last segment extrapolates
        x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
        return y0 + (y1 - y0) * (n - x0) / (x1 - x0)

    def total_time(self, n: float) -> float:
        return self.t_draft + self.t_overhead + self.verify_time(n)

    __call__ = total_time

    def base_totals(self, max_nodes: int) -> list[float]:
        """[T(n) - t_overhead for n = 0..max_nodes] (memoised; do not mutate)."""
        t = self._totals.get(max_nodes)
        if t is None:
            t = [self.t_draft + self.verify_time(n) for n in range(max_nodes + 1)]
            self._totals[max_nodes] = t
        return t

    def totals(self, max_nodes: int) -> list[float]:
        """[T(0), T(1), ..., T(max_nodes)]."""
        base = self.base_totals(max_nodes)
        c = self.t_overhead
        return [b + c for b in base] if c else base

    def set_overhead(self, seconds: float) -> None:
        self.t_overhead = float(seconds)

    def to_dict(self) -> dict:
        return {"knots_n": self.knots_n, "knots_t": self.knots_t, "t_draft": self.t_draft,
                "raw_n": self.raw_n, "raw_t": self.raw_t, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyModel":
        return cls([float(x) for x in d["knots_n"]], [float(x) for x in d["knots_t"]], float(d.get("t_draft", 0.0)),
                   0.0, list(d.get("raw_n", [])), list(d.get("raw_t", [])), dict(d.get("meta", {})))


# ------------------------------------------------------------------------------------------------
# Stopping rule
# ------------------------------------------------------------------------------------------------

def _as_list(x) -> list[float]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def _totals_for(latency, n_max: int) -> Sequence[float]:
    if isinstance(latency, LatencyModel):
        return latency.totals(n_max)
    if callable(latency):
        return [float(latency(n)) for n in range(n_max + 1)]
    t = _as_list(latency)  # a sequence T(0..)
    if len(t) < n_max + 1:
        raise ValueError(f"latency table has {len(t)} entries, need T(0..{n_max}).")
    return t


def choose_budget(path_probs, latency, max_nodes: int | None = None) -> int:
    """Greedy CaDDTree stopping rule.

    path_probs: p_1 >= p_2 >= ... (node path probabilities in pop order; list or tensor).
    latency: a LatencyModel, a callable n -> T(n), or a table [T(0), T(1), ...].
    Grows n from 0 while F(n+1) = E(n+1)/T(n+1) > F(n) and returns the first n where it stops
    growing (capped at min(max_nodes, len(path_probs))). Exact argmax of F when T is convex and
    positive and the p_i are non-increasing.
    """
    probs = _as_list(path_probs)
    n_max = len(probs) if max_nodes is None else max(0, min(int(max_nodes), len(probs)))
    if n_max == 0:
        return 0
    T = _totals_for(latency, n_max)
    e = 1.0
    for n in range(n_max):
        e_next = e + probs[n]
        if e_next * T[n] <= e * T[n + 1]:  # F(n+1) <= F(n), without divisions
            return n
        e = e_next
    return n_max


def _choose_from_scores(scores: Sequence[float], T: Sequence[float], n_max: int, c: float = 0.0,
                       scale: float = 1.0) -> tuple[int, float]:
    """choose_budget on log-scores [0, s_1, s_2, ...] (a Tree's scores), latencies T[n] + c and
    E(n) = 1 + scale * sum_{i<=n} p_i, exp-ing lazily (the loop stops at the chosen n).
    Returns (n, sum_{i<=n} p_i)."""
    e, mass = 1.0, 0.0
    exp = math.exp
    t = T[0] + c
    for n in range(n_max):
        p = exp(scores[n + 1])
        e_next = e + scale * p
        t_next = T[n + 1] + c
        if e_next * t <= e * t_next:
            return n, mass
        e, t, mass = e_next, t_next, mass + p
    return n_max, mass


def throughput_curve(path_probs, latency, max_nodes: int | None = None) -> list[float]:
    """[F(0), ..., F(n_max)] with F(n) = (1 + sum_{i<=n} p_i) / T(n)."""
    probs = _as_list(path_probs)
    n_max = len(probs) if max_nodes is None else max(0, min(int(max_nodes), len(probs)))
    T = _totals_for(latency, n_max)
    out, e = [1.0 / T[0]], 1.0
    for n in range(n_max):
        e += probs[n]
        out.append(e / T[n + 1])
    return out


def exhaustive_best_budget(path_probs, latency, max_nodes: int | None = None) -> int:
    """The smallest n maximising F(n) over 0..min(max_nodes, len(path_probs)) (reference for tests)."""
    f = throughput_curve(path_probs, latency, max_nodes)
    return max(range(len(f)), key=lambda n: (f[n], -n))


# ------------------------------------------------------------------------------------------------
# Calibration
# ------------------------------------------------------------------------------------------------

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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        return f"{name} x{torch.get_num_threads()} threads"
    return device.type


def _param_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def calibration_key(target, drafter, max_nodes: int, past_len: int = DEFAULT_PAST_LEN,
                    cache_implementation: str = "static") -> dict:
    """What a cached calibration is valid for (its JSON file is named by this dict's hash)."""
    device, dtype = _param_device_dtype(target)
    key = {
        "format": CACHE_FORMAT,
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
    }
    return key


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
                    cache_implementation: str = "static", progress: bool | None = None) -> dict:
    """Time the target's tree verification at sizes `ns` and one drafter round.

    Verify = `run_tree` on the first n nodes of a synthetic best-first tree over `past_len` cached
    tokens, plus `walk` and `compact` (the rest of a round's per-node work). Draft = the drafter
    forward over a few new context tokens + block, lm_head, log_softmax, top-k and `build_tree` at
    the cap (the tree is always built at the cap in "auto" mode). Median of `reps` after `warmup`.
    Returns {"ns", "times", "t_draft", "seconds"}.
    """
    from .cache import compact, make_cache
    from .drafter import validate_pair
    from .verify import run_tree, walk

    t_start = time.perf_counter()
    ns = sorted({int(n) for n in (default_sizes(max_nodes) if ns is None else ns) if 0 <= int(n) <= max_nodes})
    if not ns:
        raise ValueError(f"no calibration sizes within [0, {max_nodes}].")
    spec = validate_pair(target, drafter) if drafter is not None else None
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

    cache = make_cache(target, cache_implementation, past_len + 1 + max(ns))
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(vocab, (1, past_len), generator=g).to(device)
    out = target(input_ids=prompt, position_ids=torch.arange(past_len, device=device)[None],
                 **cache_kwargs(target, cache), use_cache=True, output_hidden_states=hidden_states_request(hidden_idx), logits_to_keep=1)
    empty = torch.zeros(0, dtype=torch.long, device=device)

    def verify_once(n: int) -> float:
        t = trees[n]
        _sync(device)
        t0 = time.perf_counter()
        raw, _ = run_tree(target, t, cache, past_len, hidden_idx)
        path, _ = walk(t, raw.float(), False)
        compact(cache, past_len, torch.tensor(path, dtype=torch.long, device=device))
        _sync(device)
        dt = time.perf_counter() - t0
        compact(cache, past_len, empty)  # back to exactly past_len cached tokens
        return dt

    draft_once = None
    if drafter is not None:
        from transformers.cache_utils import DynamicCache

        ddevice = next(drafter.parameters()).device
        embed, lm_head = target.get_input_embeddings(), target.get_output_embeddings()
        feats = gather_features(out, hidden_idx)[0]  # (past_len, F)
        new_ctx = min(4, past_len)  # tokens a round typically adds to the drafter's context
        dcache = DynamicCache()
        q = spec.block_size
        if past_len > new_ctx:
            drafter(position_ids=torch.arange(past_len - new_ctx + q, device=ddevice)[None],
                    noise_embedding=embed(torch.full((1, q), spec.mask_token_id, device=device)).to(ddevice),
                    target_hidden=feats[None, :past_len - new_ctx].to(ddevice),
                    **cache_kwargs(drafter, dcache), use_cache=True, is_causal=False)
            dcache.crop(-q)
        noise = torch.full((1, q), spec.mask_token_id, dtype=torch.long, device=device)
        noise[0, 0] = int(prompt[0, -1])
        pos = torch.arange(past_len - new_ctx, past_len + q, device=ddevice)[None]
        ctx = feats[None, past_len - new_ctx:].to(ddevice)
        root = int(prompt[0, -1])

        def draft_once() -> float:
            _sync(ddevice)
            t0 = time.perf_counter()
            hidden = drafter(position_ids=pos, noise_embedding=embed(noise).to(ddevice), target_hidden=ctx,
                             **cache_kwargs(drafter, dcache), use_cache=True, is_causal=False)
            dcache.crop(-q)
            logits = lm_head(hidden[0, 1:1 + depth].to(lm_head.weight.dtype))
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            top_lp, top_ids = topk_per_position(logprobs, max_nodes)
            build_tree(root, top_lp.cpu(), top_ids.cpu(), max_nodes)
            _sync(ddevice)
            dt = time.perf_counter() - t0
            dcache.crop(-new_ctx)  # forget this round's context so every rep sees the same state
            return dt

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


def calibrate(target, drafter=None, max_nodes: int = 256, *, past_len: int = DEFAULT_PAST_LEN,
              ns: Sequence[int] | None = None, reps: int = 5, warmup: int = 1,
              cache_implementation: str = "static", use_cache: bool = True, progress: bool | None = None) -> LatencyModel:
    """The LatencyModel of (target, drafter) on this machine: from memory, the disk cache, or timing.

    The disk cache key is `calibration_key(...)` (models' configs, device, dtype, torch version,
    cap, past_len, cache kind); ns/reps/warmup only affect a fresh calibration.
    use_cache=False always re-times (and overwrites the cache entry).
    """
    if max_nodes < 0:
        raise ValueError(f"max_nodes must be >= 0, got {max_nodes}.")
    key = calibration_key(target, drafter, max_nodes, past_len, cache_implementation)
    tag = json.dumps(key, sort_keys=True) + str(cache_dir())
    if use_cache:
        model = _MEMO.get(tag) or load_cached(key)
        if model is not None:
            _MEMO[tag] = model
            return model
    logger.info("hf_ddtree: calibrating CaDDTree latency model (one-time per model/device; cached in %s)", cache_dir())
    m = measure_latency(target, drafter, max_nodes, ns=ns, past_len=past_len, reps=reps, warmup=warmup,
                        cache_implementation=cache_implementation, progress=progress)
    model = LatencyModel.from_points(m["ns"], m["times"], m["t_draft"], calibration_s=m["seconds"],
                                     reps=reps, warmup=warmup)
    save_cached(key, model)
    _MEMO[tag] = model
    return model


def clear_memory_cache() -> None:
    """Forget in-process calibrations (the disk cache stays)."""
    _MEMO.clear()


# ------------------------------------------------------------------------------------------------
# The policy generate() uses
# ------------------------------------------------------------------------------------------------

class CaDDTreePolicy:
    """`policy(tree) -> n`: how many of the tree's nodes (pop order) to verify this round.

    budgets: the n chosen each round (also in DecodeStats.tree_sizes).

    Acceptance calibration (on by default): the drafter's path probabilities are a surrogate, and
    a drafter that is over-confident (a young one usually is) makes E(n) = 1 + sum p_i promise more
    than rounds deliver, so the rule verifies trees that are too big. The decoding loop reports each
    round's accepted draft tokens (`observe_acceptance`), and the policy keeps the ratio
    r = (discounted sum of accepted drafts) / (discounted sum of sum_{i<=n} p_i over the same rounds)
    and uses E(n) = 1 + r * sum_{i<=n} p_i. Scaling keeps E concave, so the stopping rule stays exact.
    The estimate starts at r = 1 with the weight of `prior_rounds` rounds and forgets with `decay`
    per round; r is kept in [`min_scale`, `max_scale`].

    online (off by default): refine the model's per-round overhead `latency.t_overhead` (EMA) from
    the wall time between consecutive calls. There is one call per round, right after the tree is built, so the
    gap is one full round at the previous budget (verify + accept/commit + next draft + tree),
    which calibration does not see in full (Python loop overhead, stopping criteria, streamer).
    The correction is a constant added to T(n), so T stays convex and the rule stays exact.
    Gaps outside [0.2, 10] x the predicted T are ignored (not one round: a skipped call, a pause).
    Off by default: on a loaded machine the gaps also carry CPU contention, which is multiplicative,
    and an additive correction then inflates budgets. The learned overhead lives on the (in-process
    shared) LatencyModel and is not written to the disk cache.
    """

    def __init__(self, latency: LatencyModel, max_nodes: int, online: bool = False, ema: float = 0.1,
                 clock: Callable[[], float] = time.perf_counter, calibrate_acceptance: bool = True,
                 decay: float = 0.95, prior_rounds: float = 2.0, min_scale: float = 0.02, max_scale: float = 2.0):
        self.latency = latency
        self.max_nodes = int(max_nodes)
        self.online = online
        self.ema = float(ema)
        self.clock = clock
        self.calibrate_acceptance = calibrate_acceptance
        self.decay, self.min_scale, self.max_scale = float(decay), float(min_scale), float(max_scale)
        self._accepted = self._promised = float(prior_rounds)  # r = 1 to start, worth `prior_rounds` rounds of mass 1
        self.budgets: list[int] = []
        self._base = latency.base_totals(self.max_nodes)
        self._last: float | None = None
        self._last_mass: float | None = None

    @property
    def acceptance_scale(self) -> float:
        """r: observed accepted drafts per unit of promised path probability (1.0 when not calibrating)."""
        if not self.calibrate_acceptance:
            return 1.0
        return min(self.max_scale, max(self.min_scale, self._accepted / max(self._promised, 1e-9)))

    def __call__(self, tree: Tree) -> int:
        if self.online:
            now = self.clock()
            if self._last is not None and self.budgets:
                self._observe(self.budgets[-1], now - self._last)
            self._last = now
        n, mass = _choose_from_scores(tree.scores, self._base, min(tree.num_nodes, self.max_nodes),
                                      self.latency.t_overhead, self.acceptance_scale)
        self.budgets.append(n)
        self._last_mass = mass
        return n

    def observe_acceptance(self, accepted_drafts: int) -> None:
        """Called by the decoding loop after each round with the number of draft tokens accepted."""
        if self._last_mass is None:
            return
        self._accepted = self.decay * self._accepted + float(accepted_drafts)
        self._promised = self.decay * self._promised + self._last_mass
        self._last_mass = None

    def _observe(self, n: int, seconds: float) -> None:
        lat = self.latency
        base = self._base[n]
        if not 0.2 * (base + lat.t_overhead) < seconds < 10 * (base + lat.t_overhead):
            return
        new = (1 - self.ema) * lat.t_overhead + self.ema * (seconds - base)
        lat.set_overhead(max(new, -0.5 * self._base[0]))  # keeps T(0) > 0


def caddtree_policy(target, drafter, max_nodes: int = 256, latency: LatencyModel | None = None,
                    online: bool = False, calibrate_acceptance: bool = True, **calibrate_kwargs) -> CaDDTreePolicy:
    """The CaDDTree budget policy for generate(tree_budget="auto"): calibrates (or loads the cached
    calibration) unless `latency` is given. Extra kwargs go to `calibrate`."""
    if latency is None:
        latency = calibrate(target, drafter, max_nodes, **calibrate_kwargs)
    return CaDDTreePolicy(latency, max_nodes, online=online, calibrate_acceptance=calibrate_acceptance)
