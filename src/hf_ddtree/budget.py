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

This module is the maths and the runtime policy only. The latency model's numbers come from
`calibrate.py` (timing the loop's own draft and verify calls, cached on disk), which also builds
the policy generate(tree_budget="auto") uses (`calibrate.caddtree_policy`).
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .tree import Tree


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
# The policy generate() uses
# ------------------------------------------------------------------------------------------------

class CaDDTreePolicy:
    """`policy(tree) -> n`: how many of the tree's nodes (pop order) to verify this round.

    budgets: the n chosen each round (also in DecodeStats.tree_sizes).

    Acceptance calibration (on by default): the drafter's path probabilities are a surrogate, and
    a drafter that is over-confident (a young one usually is) makes E(n) = 1 + sum p_i promise more
    than rounds deliver, so the rule verifies trees that are too big. The decoding loop reports each
    round's accepted draft tokens (`observe`), and the policy keeps the ratio
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
                 decay: float = 0.95, prior_rounds: float = 2.0, min_scale: float = 0.02, max_scale: float = 2.0,
                 explore_every: int = 8, rate_decay: float = 0.8):
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
        # round kinds (`plan`): the realised rate of drafted rounds, as discounted sums of committed tokens and
        # modelled seconds; `explore_every`: draft at least once in that many rounds, so the rate stays current
        self.explore_every, self.rate_decay = int(explore_every), float(rate_decay)
        self._draft_tokens = self._draft_time = 0.0
        self._pending_time: float | None = None  # modelled time of the drafted round awaiting `observe`
        self._since_draft = 0
        self._interval = self.explore_every  # rounds between exploratory drafts (grows while drafting loses)
        self.kinds: list[str] = []  # the kind of every planned round ("draft", "lookup", "root")

    @property
    def acceptance_scale(self) -> float:
        """r: observed accepted drafts per unit of promised path probability (1.0 when not calibrating)."""
        if not self.calibrate_acceptance:
            return 1.0
        return min(self.max_scale, max(self.min_scale, self._accepted / max(self._promised, 1e-9)))

    def __call__(self, tree: Tree | Sequence[Tree]) -> int:
        """n for one tree, or ONE n for a batch's trees (each row's tree is cut to its first n nodes).

        For B rows the round verifies B * (n + 1) tokens in one forward and drafts B rows, so the model is
        T_B(n) = B * t_draft + t_verify(B * (n + 1) - 1) (the calibrated single-row curve at the same number
        of tokens, extrapolated with its last slope) and E_B(n) = B + r * sum_b sum_{i<=n} p_{b,i}: still
        concave over convex, so the same stopping rule finds the best n."""
        trees = [tree] if isinstance(tree, Tree) else list(tree)
        if self.online:
            now = self.clock()
            if self._last is not None and self.budgets:
                self._observe(self.budgets[-1], now - self._last)
            self._last = now
        if len(trees) == 1:
            n, mass = _choose_from_scores(trees[0].scores, self._base, min(trees[0].num_nodes, self.max_nodes),
                                          self.latency.t_overhead, self.acceptance_scale)
        else:
            n, mass = self._choose_batch(trees)
        self.budgets.append(n)
        self._last_mass = mass
        if len(trees) == 1:
            self._pending_time = self._base[n] + self.latency.t_overhead
        return n

    @property
    def draft_rate(self) -> float | None:
        """Tokens per modelled second that drafted rounds have delivered lately (None before the first)."""
        return self._draft_tokens / self._draft_time if self._draft_time > 0 else None

    def plan(self, lookup: Tree | None) -> tuple[str, int]:
        """This round's kind, by expected tokens per second (one row), decided before the drafter runs:

          * "draft": the drafter's tree (plus lookup), budget chosen later by `__call__`; its rate is
            the one drafted rounds have delivered lately (`draft_rate`: committed tokens / T(n));
          * "lookup": the lookup candidates alone, no drafter forward: E = 1 + sum of their calibrated
            acceptance probabilities over the best n nodes, T = t_verify(n) (the stopping rule on that
            curve picks n);
          * "root": the root alone (an autoregressive step), E = 1, T = t_verify(0).
        Returns (kind, n) with n the lookup nodes to verify (0 otherwise). Drafts when nothing is known
        yet, and otherwise at least once every `explore_every` rounds, an interval that doubles (up to 8x)
        each time an exploratory draft finds drafting still behind, and resets once it is ahead."""
        lat = self.latency
        c = lat.t_overhead
        options = {"root": (1.0 / (lat.verify_time(0) + c), 0)}
        if lookup is not None and lookup.num_nodes:
            T = [lat.verify_time(n) for n in range(min(lookup.num_nodes, self.max_nodes) + 1)]
            n, mass = _choose_from_scores(lookup.scores, T, len(T) - 1, c)
            options["lookup"] = ((1.0 + mass) / (T[n] + c), n)
        rate = self.draft_rate
        best = max(options, key=lambda k: options[k][0])
        if rate is None or rate >= options[best][0]:
            kind = "draft"
            self._interval = self.explore_every  # drafting pays: explore at the base interval again
        elif self._since_draft + 1 >= self._interval:
            kind = "draft"  # explore; while drafting keeps losing, explore half as often each time (up to 8x)
            self._interval = min(8 * self.explore_every, 2 * self._interval)
        else:
            kind = best
        self._since_draft = 0 if kind == "draft" else self._since_draft + 1
        if kind != "draft":
            self._last = None  # `online`: the next gap between calls would span more than one round
        self.kinds.append(kind)
        return kind, (options[kind][1] if kind != "draft" else 0)

    def _choose_batch(self, trees: Sequence[Tree]) -> tuple[int, float]:
        B = len(trees)
        n_max = min(max(t.num_nodes for t in trees), self.max_nodes)
        probs = [0.0] * n_max  # p_i summed over rows (a row with fewer nodes adds nothing past its end)
        for t in trees:
            for i, s in enumerate(t.scores[1:n_max + 1]):
                probs[i] += math.exp(s)
        lat = self.latency
        T = [B * lat.t_draft + lat.verify_time(B * (n + 1) - 1) + lat.t_overhead for n in range(n_max + 1)]
        r = self.acceptance_scale
        e, mass = float(B), 0.0
        for n in range(n_max):
            e_next = e + r * probs[n]
            if e_next * T[n] <= e * T[n + 1]:
                return n, mass
            e, mass = e_next, mass + probs[n]
        return n_max, mass

    def observe(self, accepted: Sequence[float]) -> None:
        """Called by the decoding loop after each round: draft tokens accepted, one entry per row."""
        if self._pending_time is not None and len(accepted) == 1:
            d = self.rate_decay  # recent drafted rounds count most: the text's kind changes within an answer
            self._draft_tokens = d * self._draft_tokens + 1.0 + float(accepted[0])
            self._draft_time = d * self._draft_time + self._pending_time
        self._pending_time = None
        if self._last_mass is None:
            return
        self._accepted = self.decay * self._accepted + float(sum(accepted))
        self._promised = self.decay * self._promised + self._last_mass
        self._last_mass = None

    def _observe(self, n: int, seconds: float) -> None:
        lat = self.latency
        base = self._base[n]
        if not 0.2 * (base + lat.t_overhead) < seconds < 10 * (base + lat.t_overhead):
            return
        new = (1 - self.ema) * lat.t_overhead + self.ema * (seconds - base)
        lat.set_overhead(max(new, -0.5 * self._base[0]))  # keeps T(0) > 0
