"""Proposers: turn the drafter(s) into a draft tree for one round.

The decoding loop depends only on this small interface (like transformers' `CandidateGenerator`):

    drafted = proposer.draft(round)          the drafters' forwards, one for all rows (timed as draft_s)
    trees = proposer.build(round, drafted)   one tree per row (timed as tree_s, with the budget policy)
    proposer.observe(accepted)               after verification: accepted draft tokens per row
    proposer.select(rows)                    finished rows leave: keep only these
    proposer.propose(round) == proposer.build(round, proposer.draft(round))

`Round` carries what any proposer needs (a drafter, or a lookup over the committed text: `LookupProposer`): the
committed ids, the roots, the target features the drafter has not seen yet, the past lengths and
the depth limit, each with a leading row dimension B (a left-padded batch; rows are ragged). The loop,
not the proposer, applies the budget policy (CaDDTree) to whatever trees come back, pads it when asked
and books all time. A proposer owns its drafters' caches of projected context K/V.

The method names and their defaults live here too, so generate(), bench and budget share them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from .cache import CacheRows, compact_rows, select_rows
from .compat import cache_kwargs, compiled_function, compiled_module_call
from .device import host_tensor, to_device
from .drafter import DrafterSpec, validate_d2sd_pair
from .lookup import LookupCalibrator, LookupIndex, candidate_paths, lookup_tree
from .tree import (Tree, beam_tree_tensors, build_chain, build_chains, build_tree, build_trees, merge_paths,
                   topk_per_position, tree_paths)

METHODS = ("ddtree", "dflash", "auto", "ddtree-lookup", "d2sd", "d2sd-tree")
D2SD_METHODS = ("d2sd", "d2sd-tree")
MAX_TREE_BUDGET = 4096  # the largest tree_budget / max_tree_budget accepted
DEFAULT_TREE_BUDGET = 64  # tree_budget when a tree method is asked for without one
DEFAULT_MAX_TREE_BUDGET = 256  # CaDDTree's cap (max_tree_budget)
D2SD_BOUNDARIES = 4  # rejection depths drafter 2 re-anchors at
D2SD_ALTERNATIVES = 1  # alternative tokens per boundary
D2SD_MAX_BRANCHES = 64  # the largest d2sd_boundaries / d2sd_alternatives accepted
LOOKUP_MAX_DEPTH = 16  # ddtree-lookup: deepest lookup node (past the drafter's block; the budget decides)


@dataclass
class Round:
    """What a proposer sees of one round, for B rows (a batch; rows accept different numbers of
    tokens, so they are ragged).

    ids          (B, L) long on the device: committed ids, right-aligned: every row ends with its root
                 (not yet in the target cache), shorter rows are left-filled; row b's own tokens (its
                 text, prompt padding excluded) are ids[b, L - past[b] - 1:]
    context      (B, C, F): target features of committed tokens the drafter has not seen yet, row b's
                 at context[b, :context_lengths[b]] for positions past[b] - context_lengths[b] ..
                 past[b] - 1; F = len(target_layer_ids) * hidden_size
    past         B ints: the root's position in each row (= real tokens before it)
    depth_limit  deepest drafter node this round (block_size - 1, or fewer near max_length)
    context_lengths B ints, or None when every row has all C
    max_depth    deepest node any proposer may add (the tokens left before max_length, minus the bonus
                 token); lookup candidates may go past the drafter's block. None: depth_limit
    host_text    the loop's host copy of each row's committed ids (host ints, root last, prompt padding
                 possibly in front), or None: a proposer that works on the host (lookup) reads
                 `text_list(b)` from it instead of the device
    The host ints are what the loop knows without reading the device (tensors are accepted and
    converted).
    """

    ids: torch.Tensor
    context: torch.Tensor
    past: list[int]
    depth_limit: int
    context_lengths: list[int] | None = None
    max_depth: int | None = None
    host_text: list[list[int]] | None = None

    def __post_init__(self):
        self.past = _ints(self.past)
        if self.context_lengths is not None:
            self.context_lengths = _ints(self.context_lengths)

    @property
    def rows(self) -> int:
        return self.ids.shape[0]

    @property
    def roots(self) -> torch.Tensor:
        """(B,) long: the last committed token of each row."""
        return self.ids[:, -1]

    def text(self, row: int) -> torch.Tensor:
        """(past[row] + 1,) long: row `row`'s committed tokens, root last (no padding)."""
        return self.ids[row, self.ids.shape[1] - self.past[row] - 1:]

    def text_list(self, row: int) -> list[int]:
        """`text(row)` as host ints: the loop's copy when it gave one, else a read of the device."""
        if self.host_text is not None:
            ids = self.host_text[row]
            return ids[max(0, len(ids) - self.past[row] - 1):]
        return self.text(row).tolist()

    def root_list(self) -> list[int]:
        """B ints: the roots, from the host copy when there is one (else a read of the device)."""
        return [ids[-1] for ids in self.host_text] if self.host_text is not None else self.roots.tolist()

    def lengths(self) -> list[int]:
        """B ints: context entries per row."""
        if self.context_lengths is not None:
            return self.context_lengths
        return [0 if self.context is None else self.context.shape[1]] * self.rows


def _ints(x) -> list[int]:
    """B host ints from a list or a (host) tensor."""
    return [int(v) for v in (x.tolist() if isinstance(x, torch.Tensor) else x)]


class Proposer:
    """The interface (see the module docstring); `observe` does nothing unless a proposer learns."""

    def draft(self, round: Round) -> Any:
        raise NotImplementedError

    def build(self, round: Round, drafted: Any) -> Tree:
        raise NotImplementedError

    def propose(self, round: Round) -> Tree:
        return self.build(round, self.draft(round))

    def observe(self, accepted: list[int]) -> None:
        """Accepted draft tokens of the last round, one entry per row."""

    def select(self, rows: list[int]) -> None:
        """Keep only these rows (in this order): the others finished and leave the batch."""

    def states(self) -> list[DrafterState]:
        """The drafters' context caches this proposer owns (carried between generate() calls on a
        returned target cache, see `DrafterState.snapshot`); [] for a proposer without a drafter."""
        return []


class DrafterState:
    """One DFlash drafter plus its context cache, for B rows. `draft_rows()` runs one forward over
    every row's new context and blocks.

    The drafter cache holds, for row b, the projected K/V of positions [origin[b], origin[b] + seen[b])
    at slots [0, seen[b]) (rows are ragged: a shorter row's slots past its end are stale and masked).
    origin is 0 unless the drafter starts part-way into the text (a conversation continued from a target
    cache that carries no drafter state: the drafter sees only what comes after it, see `resume`).

    forward: the callable that runs the drafter (default the drafter itself; a compiled call when the
    loop compiles, see `make_proposer(compile_config=...)`)."""

    def __init__(self, drafter, spec: DrafterSpec, embed, lm_head, forward=None):
        self.drafter, self.spec, self.embed, self.lm_head = drafter, spec, embed, lm_head
        self.forward = forward or drafter
        self.cache = DynamicCache()
        self.seen: list[int] | None = None  # B ints: row b's cache holds seen[b] positions (None: no draft yet)
        self.origin: list[int] | None = None  # B ints: the position of row b's slot 0 (None: all 0)
        self.device = next(drafter.parameters()).device
        self.dtype = next(drafter.parameters()).dtype
        # drafting vocabulary shortlist (hf_ddtree.draft_vocab): the head's rows for those ids only
        ids = getattr(drafter, "draft_vocab_ids", None)
        self.vocab_ids = self.head_weight = self.head_bias = None
        if ids is not None:
            w, b = lm_head.weight, getattr(lm_head, "bias", None)
            # slicing 16k of 49k rows costs ~40 ms: keep the slice on the drafter across generate() calls
            key = (w.data_ptr(), w._version, w.device, w.dtype, ids.data_ptr(), ids._version, ids.numel())
            cached = getattr(drafter, "_hf_ddtree_draft_head", None)
            if cached is None or cached[0] != key:
                vids = ids.to(w.device)  # (S,) long
                cached = (key, vids, w.detach()[vids].contiguous(), None if b is None else b.detach()[vids])
                drafter._hf_ddtree_draft_head = cached
            self.vocab_ids, self.head_weight, self.head_bias = cached[1:]  # (S,), (S, H), (S,) or None

    def draft(self, blocks: torch.Tensor, context: torch.Tensor, past: int) -> torch.Tensor:
        """One row: blocks (K, bs) token ids, each starting at position `past`; context (1, C, F) for
        positions [seen, past). Returns log-probs (K, bs - 1, V) (see `draft_rows`)."""
        return self.draft_rows(blocks[None], context, [int(past)])[0]

    def draft_rows(self, blocks: torch.Tensor, context: torch.Tensor, past: torch.Tensor,
                   context_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """blocks: (B, K, bs) token ids, row b's starting at position past[b]; context: (B, C, F), row
        b's first context_lengths[b] entries (default all C) for positions [seen[b], past[b]).
        Returns log-probs (B, K, bs - 1, V): [b, k, j] predicts position past[b] + j + 1.
        With a shortlist (`drafter.draft_vocab_ids`, S ids) they are normalised over those S ids and
        -inf for every other id."""
        B, K, bs = blocks.shape
        C = context.shape[1]
        past = _ints(past)
        clen = [C] * B if context_lengths is None else _ints(context_lengths)
        if self.seen is None:
            self.seen = [0] * B
        origin = self.origin if self.origin is not None else [0] * B
        if len(self.seen) != B:
            raise ValueError(f"the drafter cache holds {len(self.seen)} rows, got {B}: select() rows first.")
        if any(o + s + c != p for o, s, c, p in zip(origin, self.seen, clen, past)):
            raise ValueError(f"drafter context out of step: origin {origin} + seen {self.seen} + new {clen} != past {past}.")
        T = self.cache.get_seq_length()  # slots in the drafter cache (= max seen)
        dev = self.device
        ragged = any(s != T for s in self.seen) or any(c != C for c in clen)
        if B == 1 and K == 1 and not ragged:  # one row, one block: context and block positions run on, no gap
            pos = torch.arange(past[0] - C, past[0] + bs, device=dev)[None]  # (1, C + bs)
        else:
            at = host_tensor([self.seen, past, clen, origin], dev)  # (4, B): one host-to-device copy
            seen_t, past_t, clen_t = at[0], at[1], at[2]
            ctx_pos = (at[3] + seen_t)[:, None] + torch.arange(C, device=dev)[None]  # (B, C); past clen[b]: padding
            blk_pos = (past_t[:, None] + torch.arange(bs, device=dev)[None]).repeat(1, K)  # (B, K*bs)
            pos = torch.cat([ctx_pos, blk_pos], dim=1)  # (B, C + K*bs)
        mask = None
        if K > 1 or ragged:  # row b's blocks see its cached and new context, each block only itself
            width = T + C + K * bs
            slot = torch.arange(width, device=dev)
            ctx_ok = (slot[None] < seen_t[:, None]) | ((slot[None] >= T) & (slot[None] < T + clen_t[:, None]))  # (B, W)
            q_blk = torch.arange(K * bs, device=dev) // bs  # (K*bs,) block of each query
            k_blk = (slot - T - C).div(bs, rounding_mode="floor")  # (W,) block of each key slot (< 0: context)
            blk_ok = (slot[None] >= T + C) & (k_blk[None] == q_blk[:, None])  # (K*bs, W)
            allowed = ctx_ok[:, None, :] | blk_ok[None]  # (B, K*bs, W)
            mask = torch.where(allowed, 0.0, torch.finfo(self.dtype).min).to(self.dtype)[:, None]
        noise = to_device(self.embed(to_device(blocks.reshape(B, -1), self.embed.weight.device)), dev)  # (B, K*bs, H)
        hidden = self.forward(
            position_ids=pos,
            attention_mask=mask,  # None or (B, 1, K*bs, T + C + K*bs)
            noise_embedding=noise,
            target_hidden=to_device(context, dev),  # (B, C, F)
            **cache_kwargs(self.drafter, self.cache),
            use_cache=True,
            is_causal=False,
        )  # (B, K*bs, H)
        self.cache.crop(-K * bs)  # keep the context, drop the blocks
        if ragged:  # row b's new context to slots [seen[b], seen[b] + clen[b]): rows stay left-aligned
            keep = [list(range(n)) for n in clen]
            compact_rows(self.cache, CacheRows([0] * B, list(self.seen)), keep)
        self.seen = [p - o for p, o in zip(past, origin)]
        hidden = hidden.reshape(B, K, bs, -1)[:, :, 1:]  # (B, K, bs-1, H)
        hidden = to_device(hidden, self.lm_head.weight.device).to(self.lm_head.weight.dtype)
        if self.vocab_ids is None:
            return torch.log_softmax(self.lm_head(hidden).float(), dim=-1)
        # shortlist: logits for S ids, renormalised over them; every other id gets -inf
        short = torch.log_softmax(F.linear(hidden, self.head_weight, self.head_bias).float(), dim=-1)  # (B, K, bs-1, S)
        out = short.new_full((*short.shape[:-1], self.lm_head.weight.shape[0]), float("-inf"))
        return out.index_copy_(-1, self.vocab_ids, short)  # (B, K, bs-1, V)

    def select(self, rows: list[int]) -> None:
        """Keep only these rows of the drafter cache."""
        if self.seen is None:  # nothing drafted yet
            return
        layout = select_rows(self.cache, rows, CacheRows([0] * len(self.seen), self.seen))
        self.seen = layout.length
        if self.origin is not None:
            self.origin = [self.origin[i] for i in rows]

    def snapshot(self) -> DrafterSnapshot:
        """This one-row state, to go on from in a later generate() call (`resume`)."""
        if self.seen is not None and len(self.seen) != 1:
            raise ValueError(f"a drafter snapshot holds one row, this state has {len(self.seen)}.")
        return DrafterSnapshot(self.drafter, self.cache, self.seen[0] if self.seen else 0,
                               self.origin[0] if self.origin else 0)

    def resume(self, snap: DrafterSnapshot | None = None, origin: int = 0) -> None:
        """Go on (one row) from `snap`'s cache, or start empty at position `origin` (a continued text whose
        earlier positions the drafter never saw: it drafts from what comes after them)."""
        if snap is not None:
            if snap.drafter is not self.drafter:
                raise ValueError("this drafter snapshot belongs to another drafter.")
            self.cache, self.seen, self.origin = snap.cache, [snap.seen], [snap.origin]
        else:
            self.cache, self.seen, self.origin = DynamicCache(), [0], [int(origin)]


@dataclass
class DrafterSnapshot:
    """One row of a drafter's context cache: positions [origin, origin + seen) are in `cache`."""

    drafter: Any
    cache: DynamicCache
    seen: int
    origin: int

    @property
    def end(self) -> int:
        """The first position the drafter has not seen."""
        return self.origin + self.seen


class DFlashProposer(Proposer):
    """DDTree (`method="ddtree"`/`"auto"`: the best-first tree of `max_nodes` nodes) or the DFlash
    chain (`method="dflash"`) from one drafter; one drafter forward for all rows, one tree per row."""

    def __init__(self, state: DrafterState, method: str, max_nodes: int, on_device: bool = True, compile_config=None):
        self.state, self.method, self.max_nodes = state, method, max_nodes
        self.on_device = on_device  # build trees on the device (`build_trees`); False: the host heap
        # the device tree build compiled (`compat.compiled_function`), when the loop compiles its round
        self.beam = compiled_function(beam_tree_tensors, compile_config if on_device else None)

    def draft(self, round: Round) -> torch.Tensor:
        """(B, D, V) log-probs, D = round.depth_limit: [b, d] predicts depth d + 1 of row b."""
        spec = self.state.spec
        if round.host_text is not None:  # the roots are host ints: one host-to-device copy of the blocks
            blocks = host_tensor([[[root] + [spec.mask_token_id] * (spec.block_size - 1)] for root in round.root_list()],
                                 round.ids.device)
        else:
            blocks = torch.full((round.rows, 1, spec.block_size), spec.mask_token_id, dtype=torch.long,
                                device=round.ids.device)
            blocks[:, 0, 0] = round.roots
        lp = self.state.draft_rows(blocks, round.context, round.past, round.context_lengths)  # (B, 1, bs-1, V)
        return lp[:, 0, :round.depth_limit]

    def build(self, round: Round, logprobs: torch.Tensor) -> list[Tree]:
        """One tree per row from (B, D, V) log-probs: built on their device with no host read
        (`on_device`), or by the host heap from one read of the top-k (where the device is the host,
        the cheaper way: a Python heap of n pops costs less than the beam's sorts)."""
        if self.method == "dflash":
            best = logprobs.max(-1)
            if self.on_device:
                return build_chains(round.roots, best.indices, best.values)
            host = torch.stack([best.indices.double(), best.values.double()]).tolist()  # one read
            return [build_chain(root, host[0][b], host[1][b]) for b, root in enumerate(round.root_list())]
        top_lp, top_ids = topk_per_position(logprobs, self.max_nodes)  # (B, D, k)
        if self.on_device:
            return build_trees(round.roots, top_lp, top_ids, self.max_nodes, core=self.beam)
        return self._host_trees(round, top_lp, top_ids)

    def _host_trees(self, round: Round, top_lp: torch.Tensor, top_ids: torch.Tensor) -> list[Tree]:
        """The heap's trees from ONE read of the (B, D, k) top-k."""
        h_lp, h_ids, _ = _read_topk(top_lp, top_ids)
        return [build_tree(root, h_lp[b], h_ids[b], self.max_nodes) for b, root in enumerate(round.root_list())]

    def select(self, rows: list[int]) -> None:
        self.state.select(rows)

    def states(self) -> list[DrafterState]:
        return [self.state]


def _read_topk(top_lp: torch.Tensor, top_ids: torch.Tensor, extra: torch.Tensor | None = None):
    """(B, D, k) top-k log-probs and ids, and an optional flat tensor, in ONE host read (float32
    log-probs and token ids are exact in float64). Returns nested lists lp[b][d], ids[b][d] (ints)
    and the extra values as a list ([] without)."""
    if top_lp.device.type == "cpu" and extra is None:  # on the host a read is free: no packing
        return top_lp.tolist(), top_ids.tolist(), []
    parts = [top_lp.double().flatten(), top_ids.double().flatten()] + ([] if extra is None else [extra.double()])
    host = torch.cat(parts).tolist()  # the read
    B, D, k = top_lp.shape
    m = top_lp.numel()
    lp = [[host[(b * D + d) * k:(b * D + d + 1) * k] for d in range(D)] for b in range(B)]
    ids = [[[int(x) for x in host[m + (b * D + d) * k:m + (b * D + d + 1) * k]] for d in range(D)] for b in range(B)]
    return lp, ids, host[2 * m:]


def rejection_boundaries(chain_logprobs: torch.Tensor, k: int) -> torch.Tensor:
    """Depth indices (0-based) where drafter 1's chain most likely meets its first rejection.

    chain_logprobs: (D,) log-probs of the chain tokens. With q_j = exp(chain_logprobs[j]) as the
    chance that depth j is accepted, P(first rejection at j) = prod_{i<j} q_i * (1 - q_j).
    Returns the top-k j by that probability, most likely first.
    """
    q = chain_logprobs.float().exp()
    reach = torch.cat([q.new_ones(1), torch.cumprod(q, 0)[:-1]])  # (D,) P(all before j accepted)
    p_first = reach * (1 - q)
    return torch.topk(p_first, min(k, q.numel())).indices


@dataclass
class D2SDDraft:
    """What D2SD's two drafter forwards give `D2SDProposer.build`."""

    lp1: torch.Tensor  # (D, V) drafter 1's log-probs
    chain_lp: torch.Tensor  # (D,) drafter 1's chain (argmax) log-probs
    chain_ids: torch.Tensor  # (D,) the chain tokens
    alt_lp: torch.Tensor  # (K, A) the alternatives' log-probs at each boundary
    alt_ids: torch.Tensor  # (K, A) the alternative tokens
    branches: list[tuple[int, int, int]]  # row b of lp2 = (boundary k, depth j, alternative a)
    lp2: torch.Tensor  # (K*A, bs2 - 1, V) drafter 2's log-probs: [b, m] predicts depth m + 1


class D2SDProposer(Proposer):
    """D^2SD: drafter 1 drafts a block; at the K likeliest rejection depths a second, variable-prefix
    drafter re-anchors on [chain prefix, alternative token] (all rows' K*A blocks in ONE batched
    forward) and proposes fresh continuations; everything is merged into one prefix tree of
    <= max_nodes per row.

    method "d2sd": drafter 1's chain plus the re-anchored branches.
    method "d2sd-tree" (hybrid): drafter 1's DDTree heap plus the branches, ranked by one surrogate
    (sum of log-probs: drafter 1's up to and including the alternative, drafter 2's after it).
    """

    def __init__(self, state1: DrafterState, state2: DrafterState, method: str, max_nodes: int,
                 boundaries: int = D2SD_BOUNDARIES, alternatives: int = D2SD_ALTERNATIVES):
        validate_d2sd_pair(state1.spec, state2.spec)
        self.s1, self.s2, self.method, self.max_nodes = state1, state2, method, max_nodes
        self.boundaries, self.alternatives = boundaries, alternatives

    def draft(self, round: Round) -> list[D2SDDraft]:
        """One `D2SDDraft` per row."""
        B, D, A = round.rows, round.depth_limit, self.alternatives
        roots = round.roots.cpu()
        block1 = torch.full((B, 1, self.s1.spec.block_size), self.s1.spec.mask_token_id, dtype=torch.long)
        block1[:, 0, 0] = roots
        lp1 = self.s1.draft_rows(block1, round.context, round.past, round.context_lengths)[:, 0, :D]  # (B, D, V)
        chain_lp, chain_ids = lp1.max(-1)  # (B, D), (B, D)
        per_row = []
        for b in range(B):
            js = rejection_boundaries(chain_lp[b], self.boundaries)  # (K,) depth indices
            alt_lp, alt_ids = torch.topk(lp1[b, js], A + 1, dim=-1)  # (K, A+1); rank 0 is the chain token
            per_row.append((js, alt_lp[:, 1:], alt_ids[:, 1:]))

        # drafter 2: one block per (row, boundary j, alternative): [root, chain[:j], alt, mask, ...]
        bs2 = self.s2.spec.block_size
        K = per_row[0][0].numel()  # the same for every row (min(boundaries, D))
        branches = [[(k, j, a) for k, j in enumerate(js.tolist()) for a in range(A)] for js, _, _ in per_row]
        blocks = torch.full((B, K * A, bs2), self.s2.spec.mask_token_id, dtype=torch.long)
        blocks[:, :, 0] = roots[:, None]
        cids = chain_ids.cpu()
        for b in range(B):
            for i, (k, j, a) in enumerate(branches[b]):
                blocks[b, i, 1:j + 1] = cids[b, :j]
                blocks[b, i, j + 1] = per_row[b][2][k, a]
        lp2 = self.s2.draft_rows(blocks, round.context, round.past, round.context_lengths)  # (B, K*A, bs2-1, V)
        return [D2SDDraft(lp1[b], chain_lp[b], chain_ids[b], per_row[b][1], per_row[b][2], branches[b], lp2[b])
                for b in range(B)]

    def build(self, round: Round, drafted: list[D2SDDraft]) -> list[Tree]:
        return [self._build_row(int(root), round.depth_limit, d) for root, d in zip(round.roots.tolist(), drafted)]

    def _build_row(self, root: int, D: int, d: D2SDDraft) -> Tree:
        cl = d.chain_ids.tolist()
        paths: list[tuple[list[int], list[float]]]
        if self.method == "d2sd-tree":
            top_lp, top_ids = topk_per_position(d.lp1, self.max_nodes)
            paths = tree_paths(build_tree(root, top_lp.cpu(), top_ids.cpu(), self.max_nodes))
        else:
            paths = [(cl, d.chain_lp.tolist())]
        cont_lp, cont_ids = d.lp2[:, :D].max(-1)  # (K*A, D)
        for b, (k, j, a) in enumerate(d.branches):
            toks = cl[:j] + [int(d.alt_ids[k, a])] + cont_ids[b, j + 1:D].tolist()
            lps = d.chain_lp[:j].tolist() + [float(d.alt_lp[k, a])] + cont_lp[b, j + 1:D].tolist()
            paths.append((toks, lps))
        return merge_paths(root, paths, self.max_nodes)

    def select(self, rows: list[int]) -> None:
        self.s1.select(rows)
        self.s2.select(rows)

    def states(self) -> list[DrafterState]:
        return [self.s1, self.s2]


class _LookupRow:
    """One row's lookup state: its index over the committed text and its acceptance calibration."""

    def __init__(self, like: LookupIndex | None = None):
        self.index = LookupIndex() if like is None else LookupIndex(like.max_ngram, like.min_ngram, like.num_candidates)
        self.calibrator = LookupCalibrator(self.index.max_ngram)
        self.pending: list = []  # last round's candidates, scored once the next round shows what was committed
        self.pending_at = 0  # text length when they were proposed
        self.planned: tuple | None = None  # (text length, depth, candidates) of the round asked last

    def sync(self, ids: list[int]) -> None:
        """ids: the committed tokens of the row (host ints)."""
        n, L = len(self.index), len(ids)
        if n and L >= n and ids[n - 1] == self.index.text[-1]:
            self.index.extend(ids[n:])  # O(new tokens)
        else:
            self.index.sync(ids)  # first call (or a different sequence): index it all


class LookupProposer(DFlashProposer):
    """DDTree plus lookup candidates (`method="ddtree-lookup"`): per row, the drafter's best-first heap
    and n-gram continuations of that row's committed text (`lookup.py`: prompt + generated so far)
    merged into one tree of `max_nodes` nodes, verified in the same target forward. Lookup nodes
    carry calibrated acceptance probabilities as scores, so a budget policy (CaDDTree, applied by
    the loop) counts them in its expected acceptance like drafter nodes.

    `build` reads `round.text(b)`: the tokens committed since the previous round calibrate the row's
    lookup acceptance rates (`LookupCalibrator`), then its index is extended with them (O(new tokens)).
    """

    def __init__(self, state: DrafterState, max_nodes: int, index: LookupIndex | None = None,
                 calibrator: LookupCalibrator | None = None, max_depth: int | None = None, on_device: bool = True,
                 compile_config=None):
        super().__init__(state, "ddtree", max_nodes, on_device, compile_config)
        self.max_depth = LOOKUP_MAX_DEPTH if max_depth is None else int(max_depth)  # deepest lookup node
        first = _LookupRow()
        if index is not None:
            first.index = index
        first.calibrator = LookupCalibrator(first.index.max_ngram) if calibrator is None else calibrator
        self.rows = [first]
        self.proposed = 0  # lookup candidates offered so far

    @property
    def index(self) -> LookupIndex:
        """Row 0's index (the only one for B = 1)."""
        return self.rows[0].index

    @property
    def calibrator(self) -> LookupCalibrator:
        return self.rows[0].calibrator

    def build(self, round: Round, logprobs: torch.Tensor) -> list[Tree]:
        """logprobs: (B, D, V) from `draft`. Per row, the merged tree of drafter and lookup paths.

        The candidates come from the host text (`round.text_list`); when no row has one, the trees
        are the drafter's, built on the device. Otherwise the drafter's top-k and its log-probs of
        every candidate token are read in ONE transfer and merged on the host."""
        while len(self.rows) < round.rows:  # first round of a batch
            self.rows.append(_LookupRow(self.rows[0].index))
        D = logprobs.shape[1]
        depth = self._lookup_depth(round, D)
        texts = [round.text_list(b) for b in range(round.rows)]
        cands = [self._candidates(self.rows[b], texts[b], depth) for b in range(round.rows)]
        top_lp, top_ids = topk_per_position(logprobs, self.max_nodes)  # (B, D, k)
        if not any(cands):
            if self.on_device:
                return build_trees(round.roots, top_lp, top_ids, self.max_nodes, core=self.beam)
            return self._host_trees(round, top_lp, top_ids)
        # (row, depth, token) of every candidate token the drafter covers -> its log q, read with the top-k
        pairs = [(b, d, t) for b, cs in enumerate(cands) for c in cs for d, t in enumerate(c.tokens) if d < D]
        idx = host_tensor(pairs, logprobs.device).T  # (3, M)
        logq = logprobs[idx[0], idx[1], idx[2]]  # (M,)
        h_lp, h_ids, flat = _read_topk(top_lp, top_ids, logq)  # one transfer for all three
        trees, at = [], 0
        for b, cs in enumerate(cands):
            paths = []
            if cs:
                logq_b = []
                for c in cs:
                    k = min(len(c.tokens), D)
                    logq_b.append(flat[at:at + k] + [float("-inf")] * (len(c.tokens) - k))  # no drafter past its block
                    at += k
                paths = candidate_paths(cs, logq_b, [self.rows[b].calibrator.token_logprobs(c) for c in cs])
            trees.append(lookup_tree(texts[b][-1], h_lp[b], h_ids[b], paths, self.max_nodes))
        return trees

    def lookup_only(self, round: Round) -> Tree | None:
        """One row: the tree of its lookup candidates alone (no drafter forward; scores are the calibrated
        log acceptance probabilities), or None when lookup has nothing. The candidates are the ones `build`
        then uses if the round drafts after all (`plan` may still choose it)."""
        if round.rows != 1:
            raise ValueError("lookup_only plans one row.")
        depth = self._lookup_depth(round, round.depth_limit)
        text = round.text_list(0)
        cands = self._candidates(self.rows[0], text, depth)
        if not cands or depth < 1:
            return None
        calib = self.rows[0].calibrator
        paths = candidate_paths(cands, [[float("-inf")] * len(c.tokens) for c in cands],
                                [calib.token_logprobs(c) for c in cands])
        return merge_paths(text[-1], [p for p in paths if p[0]], self.max_nodes)

    def _lookup_depth(self, round: Round, D: int) -> int:
        """Deepest lookup node this round: past the drafter's D depths up to `max_depth`, within the round's own."""
        return max(D, min(self.max_depth, D if round.max_depth is None else round.max_depth))

    def _candidates(self, row: _LookupRow, text: list[int], depth: int):
        """The row's lookup candidates for this round (host work only): the index catches up with
        the committed text, last round's candidates are scored against it, new ones are found.
        Asked twice in one round (`lookup_only`, then `build`), it answers the same."""
        if row.planned is not None and row.planned[:2] == (len(text), depth):
            return row.planned[2]
        row.sync(text)
        if row.pending:
            row.calibrator.observe(row.pending, row.index.text[row.pending_at:])
            row.pending = []
        cands = row.index.candidates(depth)
        if cands:
            row.pending, row.pending_at = cands, len(row.index)
            self.proposed += len(cands)
        row.planned = (len(text), depth, cands)
        return cands

    def select(self, rows: list[int]) -> None:
        super().select(rows)
        if len(self.rows) > 1:
            self.rows = [self.rows[r] for r in rows]


def make_proposer(target, drafter, spec: DrafterSpec, method: str, max_nodes: int, *, drafter2=None,
                  spec2: DrafterSpec | None = None, boundaries: int = D2SD_BOUNDARIES,
                  alternatives: int = D2SD_ALTERNATIVES, compile_config=None, on_device: bool = True) -> Proposer:
    """The proposer for `method` (one of METHODS); the drafters borrow the target's embeddings and head.

    compile_config: a transformers CompileConfig: run the drafter forwards through torch.compile with
    its options and `dynamic=True` (the drafter's context length and cache length change every round;
    its block shape is fixed), see `compat.compiled_module_call`. None: eager.
    on_device: build DDTree / chain trees on the device (no host read); False: the host heap. With both,
    the device tree build runs compiled too (`compat.compiled_function`).
    """
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()

    def fwd(module):
        return None if compile_config is None else compiled_module_call(module, compile_config, dynamic=True)

    state = DrafterState(drafter, spec, embed, head, fwd(drafter))
    if method in D2SD_METHODS:
        return D2SDProposer(state, DrafterState(drafter2, spec2, embed, head, fwd(drafter2)), method, max_nodes,
                            boundaries, alternatives)
    if method == "ddtree-lookup":
        return LookupProposer(state, max_nodes, on_device=on_device, compile_config=compile_config)
    return DFlashProposer(state, method, max_nodes, on_device, compile_config)
