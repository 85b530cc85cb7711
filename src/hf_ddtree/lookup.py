"""Lookup candidates (prompt lookup / suffix matching) for DDTree trees. Knows nothing of models.

Small targets repeat themselves and their prompts (code, lists, quoted text). `LookupIndex`
keeps every n-gram (n_min <= n <= n_max) of the committed token ids (prompt + generated) with the
positions where it ended, updated incrementally (O(n_max) per new token, no rescan). For the
current suffix it returns a few continuations: the longest matching n first, and within one n the
most recent occurrence first; distinct continuations only, each up to `depth_limit` tokens. That
is what prompt lookup decoding (longest n-gram, most recent match) and SuffixDecoding find.

`LookupCalibrator` turns a candidate into log-probability increments comparable to the
drafter's: it learns online, per (match length n, candidate rank 0 / >0, first token / later
token), the probability that a candidate token is the target's token given that the tokens
before it on the candidate were (the committed text of the next round tells, for every
candidate, how far it was right, whether or not it was verified). `lookup_tree` merges the
drafter's best-first DDTree and the candidates into one prefix-closed tree of `budget` nodes,
scoring a candidate token t at depth d by log max(q_d(t), c): the drafter's marginal q_d(t) or the
calibrated lookup acceptance c, whichever is higher. So exp(score) stays a (surrogate)
probability of reaching the node, and CaDDTree's E(n) = 1 + sum p_i counts lookup nodes too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .tree import Tree, build_tree, merge_paths, tree_paths

DEFAULT_MAX_NGRAM = 4
DEFAULT_MIN_NGRAM = 1
DEFAULT_NUM_CANDIDATES = 4
_SCAN_FACTOR = 8  # occurrences looked at per wanted candidate and n (bounds a query on very repetitive text)


@dataclass(frozen=True)
class Candidate:
    """One lookup continuation: `tokens` would follow the current text (depth 1 first).
    match_len: n of the n-gram suffix that matched; rank: its index among this round's candidates."""

    tokens: tuple[int, ...]
    match_len: int
    rank: int


class LookupIndex:
    """Incremental n-gram index over a growing token sequence.

    `extend(new_ids)` appends tokens; `candidates(depth_limit)` looks up the current suffix.
    ends[n][gram] lists (ascending) every position i such that text[i-n+1 : i+1] == gram.
    """

    def __init__(self, max_ngram: int = DEFAULT_MAX_NGRAM, min_ngram: int = DEFAULT_MIN_NGRAM,
                 num_candidates: int = DEFAULT_NUM_CANDIDATES):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"lookup n-gram sizes need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}.")
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}.")
        self.max_ngram, self.min_ngram, self.num_candidates = int(max_ngram), int(min_ngram), int(num_candidates)
        self.text: list[int] = []
        self.ends: dict[int, dict[tuple[int, ...], list[int]]] = {n: {} for n in range(self.min_ngram, self.max_ngram + 1)}

    def __len__(self) -> int:
        return len(self.text)

    def extend(self, new_ids: Sequence[int]) -> None:
        """Append tokens and index the n-grams ending at each of them."""
        text = self.text
        for tok in new_ids:
            text.append(int(tok))
            i = len(text) - 1
            for n in range(self.min_ngram, min(self.max_ngram, i + 1) + 1):
                self.ends[n].setdefault(tuple(text[i - n + 1:i + 1]), []).append(i)

    def sync(self, ids: Sequence[int]) -> None:
        """Make the index hold exactly `ids`, which must extend what it holds (a new sequence resets it)."""
        n = len(self.text)
        if len(ids) < n or (n and (int(ids[n - 1]) != self.text[-1] or int(ids[0]) != self.text[0])):
            self.__init__(self.max_ngram, self.min_ngram, self.num_candidates)
            n = 0
        self.extend(ids[n:])

    def candidates(self, depth_limit: int, num_candidates: int | None = None) -> list[Candidate]:
        """Up to `num_candidates` distinct continuations of the current text, each 1..depth_limit tokens.

        Longest matching suffix n-gram first; within one n, the most recent earlier occurrence first.
        A continuation is text[i+1 : i+1+depth_limit] for an earlier end position i of the suffix
        n-gram (it may run into the suffix itself, as in periodic text). A continuation equal to, or
        a prefix of, one already taken is skipped (it adds no node); one that extends a taken one
        (which was cut short by the end of the text) replaces it in place.
        """
        k = self.num_candidates if num_candidates is None else int(num_candidates)
        text, L = self.text, len(self.text)
        out: list[Candidate] = []
        if depth_limit <= 0 or k <= 0 or L < 2:
            return out
        taken: list[tuple[int, ...]] = []
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            ends = self.ends[n].get(tuple(text[L - n:]))
            if not ends:
                continue
            scanned = 0
            for i in reversed(ends):
                if i >= L - 1:  # the suffix itself: nothing follows it yet
                    continue
                scanned += 1
                cont = tuple(text[i + 1:i + 1 + depth_limit])
                if any(t[:len(cont)] == cont for t in taken):
                    pass  # nothing new: equal to, or a prefix of, a continuation already taken
                elif any(cont[:len(t)] == t for t in taken):  # extends one (it was cut by the text's end)
                    j = next(j for j, t in enumerate(taken) if cont[:len(t)] == t)
                    taken[j] = cont
                    out[j] = Candidate(cont, out[j].match_len, j)
                else:
                    taken.append(cont)
                    out.append(Candidate(cont, n, len(out)))
                    if len(out) >= k:
                        return out
                if scanned >= _SCAN_FACTOR * k:
                    break
        return out


class LookupCalibrator:
    """Online probability that a lookup token is accepted, given the candidate was right so far.

    Cells: (n, rank > 0, token is the candidate's first) with n = match length (clipped to
    [1, max_ngram]). Each cell keeps discounted counts (accepted, proposed), starting from
    `prior(n, ...)` worth `prior_weight` observations, and forgetting with `decay` per observation.
    `observe(candidates, committed)` scores every candidate of a round against the tokens the
    round committed (accepted drafts + the target's bonus token): token d counts as proposed if
    tokens 1..d-1 were right and d <= len(committed), and as accepted if it equals committed[d-1].
    """

    def __init__(self, max_ngram: int = DEFAULT_MAX_NGRAM, prior_weight: float = 4.0, decay: float = 0.99,
                 floor: float = 1e-3, ceil: float = 0.995):
        self.max_ngram, self.prior_weight, self.decay = int(max_ngram), float(prior_weight), float(decay)
        self.floor, self.ceil = float(floor), float(ceil)
        self.acc: dict[tuple[int, bool, bool], float] = {}
        self.prop: dict[tuple[int, bool, bool], float] = {}

    @staticmethod
    def prior(n: int, later_rank: bool, first: bool) -> float:
        """Prior acceptance: a first token is likelier right after a longer match; a token after a
        right one is likely right (the text keeps repeating); runner-up candidates less so."""
        p = min(0.1 * n, 0.4) if first else 0.6
        return p / 2 if later_rank else p

    def _key(self, c: Candidate, first: bool) -> tuple[int, bool, bool]:
        return (max(1, min(c.match_len, self.max_ngram)), c.rank > 0, first)

    def rate(self, c: Candidate, first: bool) -> float:
        key = self._key(c, first)
        p0 = self.prior(*key)
        a = self.acc.get(key, p0 * self.prior_weight)
        n = self.prop.get(key, self.prior_weight)
        return min(self.ceil, max(self.floor, a / max(n, 1e-9)))

    def token_logprobs(self, c: Candidate) -> list[float]:
        """log c_d for each token of the candidate (d = 1..len)."""
        first, later = math.log(self.rate(c, True)), math.log(self.rate(c, False))
        return [first] + [later] * (len(c.tokens) - 1)

    def observe(self, candidates: Sequence[Candidate], committed: Sequence[int]) -> None:
        for c in candidates:
            for d, tok in enumerate(c.tokens):
                if d >= len(committed):
                    break
                key = self._key(c, d == 0)
                p0 = self.prior(*key)
                hit = float(int(tok) == int(committed[d]))
                self.acc[key] = self.decay * self.acc.get(key, p0 * self.prior_weight) + hit
                self.prop[key] = self.decay * self.prop.get(key, self.prior_weight) + 1.0
                if not hit:
                    break


def candidate_paths(candidates: Sequence[Candidate], drafter_logq: Sequence[Sequence[float]],
                    lookup_logc: Sequence[Sequence[float]]) -> list[tuple[list[int], list[float]]]:
    """(tokens, increments) per candidate for `merge_paths`: increment d = max(log q_d(t), log c_d).

    drafter_logq[i][d]: the drafter's log-prob of candidate i's token d at depth d + 1
    (-inf where there is no drafter); lookup_logc[i][d]: the calibrated lookup log-acceptance."""
    return [(list(c.tokens), [max(float(q), float(l)) for q, l in zip(lq, lc)])
            for c, lq, lc in zip(candidates, drafter_logq, lookup_logc)]


def lookup_tree(root_token: int, top_logprobs: torch.Tensor, top_ids: torch.Tensor,
                paths: Sequence[tuple[list[int], list[float]]], budget: int) -> Tree:
    """The DDTree of the drafter's top-k (D, K) per depth, plus the lookup `paths`, cut to `budget`.

    Both kinds share the node budget and one score scale (log surrogate path probability); a node
    on both keeps the higher score. The result is prefix-closed, in non-increasing score order
    (see `tree.merge_paths`), so `tree.truncate(k)` (CaDDTree) keeps the k best nodes.
    With no lookup paths this is exactly `build_tree(root, top_logprobs, top_ids, budget)`.
    """
    base = build_tree(root_token, top_logprobs, top_ids, budget)
    paths = [p for p in paths if p[0]]
    if not paths or budget == 0:
        return base
    return merge_paths(root_token, tree_paths(base) + list(paths), budget)
