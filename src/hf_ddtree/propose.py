"""Proposers: turn the drafter(s) into a draft tree for one round.

The decoding loop depends only on this small interface (like transformers' `CandidateGenerator`):

    drafted = proposer.draft(round)          the drafters' forwards (the loop times it as draft_s)
    tree = proposer.build(round, drafted)    the tree from them (timed as tree_s, with the budget policy)
    proposer.observe(accepted)               after verification: accepted draft tokens per row
    proposer.propose(round) == proposer.build(round, proposer.draft(round))

`Round` carries what any proposer needs (a drafter, or a lookup over the committed text: `LookupProposer`): the
committed ids, the roots, the target features the drafter has not seen yet, the past lengths and
the depth limit, each with a leading row dimension B (B = 1 until batching lands). The loop, not
the proposer, applies the budget policy (CaDDTree) to whatever tree comes back, pads it when asked
and books all time. A proposer owns its drafters' caches of projected context K/V.

The method names and their defaults live here too, so generate(), bench and budget share them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from .compat import cache_kwargs, compiled_module_call
from .drafter import DrafterSpec, validate_d2sd_pair
from .lookup import LookupCalibrator, LookupIndex, candidate_paths, lookup_tree
from .tree import Tree, build_chain, build_tree, merge_paths, topk_per_position, tree_paths

METHODS = ("ddtree", "dflash", "auto", "ddtree-lookup", "d2sd", "d2sd-tree")
D2SD_METHODS = ("d2sd", "d2sd-tree")
MAX_TREE_BUDGET = 4096  # the largest tree_budget / max_tree_budget accepted
DEFAULT_TREE_BUDGET = 64  # tree_budget when a tree method is asked for without one
DEFAULT_MAX_TREE_BUDGET = 256  # CaDDTree's cap (max_tree_budget)
D2SD_BOUNDARIES = 4  # rejection depths drafter 2 re-anchors at
D2SD_ALTERNATIVES = 1  # alternative tokens per boundary
D2SD_MAX_BRANCHES = 64  # the largest d2sd_boundaries / d2sd_alternatives accepted


@dataclass
class Round:
    """What a proposer sees of one round. B rows (B = 1 for now).

    ids          (B, L) long: committed ids; ids[:, -1] are the roots, not yet in the target cache
    context      (B, C, F): target features of committed tokens the drafter has not seen yet
                 (positions past - C .. past - 1), F = len(target_layer_ids) * hidden_size
    past         (B,) long: target-cache entries per row (= L - 1: the root sits at position past)
    depth_limit  deepest node allowed this round (block_size - 1, or fewer near max_length)
    """

    ids: torch.Tensor
    context: torch.Tensor
    past: torch.Tensor
    depth_limit: int

    @property
    def roots(self) -> torch.Tensor:
        """(B,) long: the last committed token of each row."""
        return self.ids[:, -1]

    def single(self) -> tuple[int, torch.Tensor, int]:
        """(root, context (1, C, F), past) of the only row; ValueError for B > 1 (not implemented)."""
        if self.ids.shape[0] != 1:
            raise ValueError(f"proposers draft one row at a time, got {self.ids.shape[0]} rows.")
        return int(self.ids[0, -1]), self.context, int(self.past[0])


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


class DrafterState:
    """One DFlash drafter plus its context cache. `draft()` runs one forward over new context + blocks.

    forward: the callable that runs the drafter (default the drafter itself; a compiled call when the
    loop compiles, see `make_proposer(compile_config=...)`)."""

    def __init__(self, drafter, spec: DrafterSpec, embed, lm_head, forward=None):
        self.drafter, self.spec, self.embed, self.lm_head = drafter, spec, embed, lm_head
        self.forward = forward or drafter
        self.cache = DynamicCache()
        self.seen = 0  # positions [0, seen) are in the drafter cache
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
        """blocks: (K, bs) token ids of one row, each starting at position `past`; context: (1, C, F)
        for positions [seen, past). Returns log-probs (K, bs - 1, V): [k, j] predicts position past + j + 1.
        With a shortlist (`drafter.draft_vocab_ids`, S ids) they are normalised over those S ids and
        -inf for every other id."""
        k, bs = blocks.shape
        ctx_pos = torch.arange(self.seen, past, device=self.device)
        blk_pos = torch.arange(past, past + bs, device=self.device).repeat(k)
        pos = torch.cat([ctx_pos, blk_pos])[None]  # (1, C + K*bs)
        mask = None
        if k > 1:  # each block sees the whole context and only itself
            width = self.seen + context.shape[1] + k * bs  # cached context + new context + blocks
            mask = torch.full((1, 1, k * bs, width), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
            mask[..., : width - k * bs] = 0
            for b in range(k):
                s = width - k * bs + b * bs
                mask[0, 0, b * bs:(b + 1) * bs, s:s + bs] = 0
        noise = self.embed(blocks.reshape(1, -1).to(self.embed.weight.device)).to(self.device)  # (1, K*bs, H)
        hidden = self.forward(
            position_ids=pos,
            attention_mask=mask,
            noise_embedding=noise,
            target_hidden=context.to(self.device),  # (1, C, F)
            **cache_kwargs(self.drafter, self.cache),
            use_cache=True,
            is_causal=False,
        )  # (1, K*bs, H)
        self.cache.crop(-k * bs)  # keep the context, drop the blocks
        self.seen = past
        hidden = hidden.reshape(k, bs, -1)[:, 1:]  # (K, bs-1, H)
        hidden = hidden.to(self.lm_head.weight.device, self.lm_head.weight.dtype)
        if self.vocab_ids is None:
            return torch.log_softmax(self.lm_head(hidden).float(), dim=-1)
        # shortlist: logits for S ids, renormalised over them; every other id gets -inf
        short = torch.log_softmax(F.linear(hidden, self.head_weight, self.head_bias).float(), dim=-1)  # (K, bs-1, S)
        out = short.new_full((*short.shape[:-1], self.lm_head.weight.shape[0]), float("-inf"))
        return out.index_copy_(-1, self.vocab_ids, short)  # (K, bs-1, V)


class DFlashProposer(Proposer):
    """DDTree (`method="ddtree"`/`"auto"`: the best-first tree of `max_nodes` nodes) or the DFlash
    chain (`method="dflash"`) from one drafter."""

    def __init__(self, state: DrafterState, method: str, max_nodes: int):
        self.state, self.method, self.max_nodes = state, method, max_nodes
        self.block = torch.full((1, state.spec.block_size), state.spec.mask_token_id, dtype=torch.long)

    def draft(self, round: Round) -> torch.Tensor:
        """(D, V) log-probs, D = round.depth_limit: row d predicts depth d + 1."""
        root, context, past = round.single()
        self.block[0, 0] = root
        return self.state.draft(self.block, context, past)[0, :round.depth_limit]

    def build(self, round: Round, logprobs: torch.Tensor) -> Tree:
        root = int(round.roots[0])
        if self.method == "dflash":
            best = logprobs.max(-1)
            return build_chain(root, best.indices.cpu(), best.values.cpu())
        top_lp, top_ids = topk_per_position(logprobs, self.max_nodes)
        return build_tree(root, top_lp.cpu(), top_ids.cpu(), self.max_nodes)


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
    drafter re-anchors on [chain prefix, alternative token] (all K*A blocks in ONE batched forward)
    and proposes fresh continuations; everything is merged into one prefix tree of <= max_nodes.

    method "d2sd": drafter 1's chain plus the re-anchored branches.
    method "d2sd-tree" (hybrid): drafter 1's DDTree heap plus the branches, ranked by one surrogate
    (sum of log-probs: drafter 1's up to and including the alternative, drafter 2's after it).
    """

    def __init__(self, state1: DrafterState, state2: DrafterState, method: str, max_nodes: int,
                 boundaries: int = D2SD_BOUNDARIES, alternatives: int = D2SD_ALTERNATIVES):
        validate_d2sd_pair(state1.spec, state2.spec)
        self.s1, self.s2, self.method, self.max_nodes = state1, state2, method, max_nodes
        self.boundaries, self.alternatives = boundaries, alternatives
        self.block1 = torch.full((1, state1.spec.block_size), state1.spec.mask_token_id, dtype=torch.long)

    def draft(self, round: Round) -> D2SDDraft:
        root, context, past = round.single()
        D, A = round.depth_limit, self.alternatives
        self.block1[0, 0] = root
        lp1 = self.s1.draft(self.block1, context, past)[0, :D]  # (D, V)
        chain_lp, chain_ids = lp1.max(-1)  # (D,), (D,)
        js = rejection_boundaries(chain_lp, self.boundaries)  # (K,) depth indices
        alt_lp, alt_ids = torch.topk(lp1[js], A + 1, dim=-1)  # (K, A+1); rank 0 is the chain token
        alt_lp, alt_ids = alt_lp[:, 1:], alt_ids[:, 1:]

        # drafter 2: one block per (boundary j, alternative): [root, chain[:j], alt, mask, ...]
        bs2 = self.s2.spec.block_size
        branches = [(k, j, a) for k, j in enumerate(js.tolist()) for a in range(A)]  # row b of drafter 2
        blocks = torch.full((len(branches), bs2), self.s2.spec.mask_token_id, dtype=torch.long)
        blocks[:, 0] = root
        for b, (k, j, a) in enumerate(branches):
            blocks[b, 1:j + 1] = chain_ids[:j].cpu()
            blocks[b, j + 1] = alt_ids[k, a]
        lp2 = self.s2.draft(blocks, context, past)  # (K*A, bs2-1, V)
        return D2SDDraft(lp1, chain_lp, chain_ids, alt_lp, alt_ids, branches, lp2)

    def build(self, round: Round, d: D2SDDraft) -> Tree:
        root, D = int(round.roots[0]), round.depth_limit
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


class LookupProposer(DFlashProposer):
    """DDTree plus lookup candidates (`method="ddtree-lookup"`): the drafter's best-first heap and
    n-gram continuations of the committed text (`lookup.py`: prompt + generated so far) merged into
    one tree of `max_nodes` nodes, verified in the same target forward. Lookup nodes carry calibrated
    acceptance probabilities as scores, so a budget policy (CaDDTree, applied by the loop) counts
    them in its expected acceptance like drafter nodes.

    `build` reads `round.ids`: the tokens committed since the previous round calibrate the lookup
    acceptance rates (`LookupCalibrator`), then the index is extended with them (O(new tokens)).
    """

    def __init__(self, state: DrafterState, max_nodes: int, index: LookupIndex | None = None,
                 calibrator: LookupCalibrator | None = None):
        super().__init__(state, "ddtree", max_nodes)
        self.index = LookupIndex() if index is None else index
        self.calibrator = LookupCalibrator(self.index.max_ngram) if calibrator is None else calibrator
        self.pending: list = []  # last round's candidates, scored once the next round shows what was committed
        self.pending_at = 0  # text length when they were proposed
        self.proposed = 0  # lookup candidates offered so far

    def build(self, round: Round, logprobs: torch.Tensor) -> Tree:
        """logprobs: (D, V) from `draft`. The merged tree of drafter and lookup paths."""
        if round.ids.shape[0] != 1:
            raise ValueError(f"the lookup proposer reads one row at a time, got {round.ids.shape[0]} rows.")
        self._sync(round.ids[0])
        if self.pending:
            self.calibrator.observe(self.pending, self.index.text[self.pending_at:])
            self.pending = []
        root, depth = int(round.roots[0]), logprobs.shape[0]
        cands = self.index.candidates(depth)
        paths = []
        if cands:
            rows = torch.tensor([d for c in cands for d in range(len(c.tokens))], dtype=torch.long)
            cols = torch.tensor([t for c in cands for t in c.tokens], dtype=torch.long)
            flat = logprobs[rows.to(logprobs.device), cols.to(logprobs.device)].tolist()  # drafter log q_d(t)
            logq, at = [], 0
            for c in cands:
                logq.append(flat[at:at + len(c.tokens)])
                at += len(c.tokens)
            paths = candidate_paths(cands, logq, [self.calibrator.token_logprobs(c) for c in cands])
            self.pending, self.pending_at = cands, len(self.index)
            self.proposed += len(cands)
        top_lp, top_ids = topk_per_position(logprobs, self.max_nodes)
        return lookup_tree(root, top_lp.cpu(), top_ids.cpu(), paths, self.max_nodes)

    def _sync(self, ids: torch.Tensor) -> None:
        """ids: (L,) the committed tokens of the row."""
        n, L = len(self.index), ids.shape[0]
        if n and L >= n and int(ids[n - 1]) == self.index.text[-1]:
            self.index.extend(ids[n:].tolist())  # O(new tokens)
        else:
            self.index.sync(ids.tolist())  # first call (or a different sequence): index it all


def make_proposer(target, drafter, spec: DrafterSpec, method: str, max_nodes: int, *, drafter2=None,
                  spec2: DrafterSpec | None = None, boundaries: int = D2SD_BOUNDARIES,
                  alternatives: int = D2SD_ALTERNATIVES, compile_config=None) -> Proposer:
    """The proposer for `method` (one of METHODS); the drafters borrow the target's embeddings and head.

    compile_config: a transformers CompileConfig: run the drafter forwards through torch.compile with
    its options and `dynamic=True` (the drafter's context length and cache length change every round;
    its block shape is fixed), see `compat.compiled_module_call`. None: eager.
    """
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()

    def fwd(module):
        return None if compile_config is None else compiled_module_call(module, compile_config, dynamic=True)

    state = DrafterState(drafter, spec, embed, head, fwd(drafter))
    if method in D2SD_METHODS:
        return D2SDProposer(state, DrafterState(drafter2, spec2, embed, head, fwd(drafter2)), method, max_nodes,
                            boundaries, alternatives)
    if method == "ddtree-lookup":
        return LookupProposer(state, max_nodes)
    return DFlashProposer(state, method, max_nodes)
