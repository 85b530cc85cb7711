"""Proposers: turn the drafter(s) into a draft tree for one round.

The decoding loop depends only on this small interface (like transformers'
`CandidateGenerator`):

    proposer.propose(root_token, context, past, depth_limit) -> Tree

    root_token  the last committed token (not yet in the target cache), at position `past`
    context     (C, F) target features of the committed tokens the drafter has not seen yet
                (positions past - C .. past - 1)
    depth_limit deepest node allowed this round (block_size - 1, or fewer near max_length)

A proposer owns its drafters' caches of projected context K/V.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from .compat import cache_kwargs
from .drafter import DrafterSpec
from .tree import Tree, build_chain, build_tree, merge_paths, topk_per_position, tree_paths


def _no_lap(name: str) -> None:
    return None


class DrafterState:
    """One DFlash drafter plus its context cache. `draft()` runs one forward over new context + blocks."""

    def __init__(self, drafter, spec: DrafterSpec, embed, lm_head):
        self.drafter, self.spec, self.embed, self.lm_head = drafter, spec, embed, lm_head
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
        """blocks: (K, bs) token ids, each starting at position `past`; context: (C, F) for positions
        [seen, past). Returns log-probs (K, bs - 1, V): row k, j predicts the token at past + j + 1.
        With a shortlist (`drafter.draft_vocab_ids`, S ids) they are normalised over those S ids and
        -inf for every other id."""
        k, bs = blocks.shape
        ctx_pos = torch.arange(self.seen, past, device=self.device)
        blk_pos = torch.arange(past, past + bs, device=self.device).repeat(k)
        pos = torch.cat([ctx_pos, blk_pos])[None]  # (1, C + K*bs)
        mask = None
        if k > 1:  # each block sees the whole context and only itself
            width = self.seen + context.shape[0] + k * bs  # cached context + new context + blocks
            mask = torch.full((1, 1, k * bs, width), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
            mask[..., : width - k * bs] = 0
            for b in range(k):
                s = width - k * bs + b * bs
                mask[0, 0, b * bs:(b + 1) * bs, s:s + bs] = 0
        noise = self.embed(blocks.reshape(1, -1).to(self.embed.weight.device)).to(self.device)  # (1, K*bs, H)
        hidden = self.drafter(
            position_ids=pos,
            attention_mask=mask,
            noise_embedding=noise,
            target_hidden=context[None].to(self.device),  # (1, C, F)
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


class DFlashProposer:
    """DDTree (`method="ddtree"`/`"auto"`) or the DFlash chain (`method="dflash"`) from one drafter."""

    def __init__(self, state: DrafterState, method: str, max_nodes: int,
                 budget_policy: Callable[[Tree], int] | None = None, lap: Callable[[str], None] = _no_lap):
        self.state, self.method, self.max_nodes, self.policy, self.lap = state, method, max_nodes, budget_policy, lap
        bs = state.spec.block_size
        self.block = torch.full((1, bs), state.spec.mask_token_id, dtype=torch.long)

    def propose(self, root_token: int, context: torch.Tensor, past: int, depth_limit: int) -> Tree:
        if self.max_nodes == 0:  # budget 0: the root alone, nothing to draft (the drafter is never consulted)
            return build_chain(root_token, torch.empty(0, dtype=torch.long))
        self.block[0, 0] = root_token
        logprobs = self.state.draft(self.block, context, past)[0, :depth_limit]  # (D, V)
        self.lap("draft_s")
        if self.method == "dflash":
            best = logprobs.max(-1)
            tree = build_chain(root_token, best.indices.cpu(), best.values.cpu())
            self.lap("tree_s")
            return tree
        top_lp, top_ids = topk_per_position(logprobs, self.max_nodes)
        tree = build_tree(root_token, top_lp.cpu(), top_ids.cpu(), self.max_nodes)
        if self.policy is not None:
            tree = tree.truncate(self.policy(tree))
        self.lap("tree_s")
        return tree


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


class D2SDProposer:
    """D^2SD: drafter 1 drafts a block; at the K likeliest rejection depths a second, variable-prefix
    drafter re-anchors on [chain prefix, alternative token] (all K*A blocks in ONE batched forward)
    and proposes fresh continuations; everything is merged into one prefix tree of <= max_nodes.

    method "d2sd": drafter 1's chain plus the re-anchored branches.
    method "d2sd-tree" (hybrid): drafter 1's DDTree heap plus the branches, ranked by one surrogate
    (sum of log-probs: drafter 1's up to and including the alternative, drafter 2's after it).
    """

    def __init__(self, state1: DrafterState, state2: DrafterState, method: str, max_nodes: int,
                 boundaries: int = 4, alternatives: int = 1, lap: Callable[[str], None] = _no_lap):
        if state1.spec.target_layer_ids != state2.spec.target_layer_ids:
            raise ValueError(
                f"D2SD drafters must read the same target layers: drafter 1 uses {list(state1.spec.target_layer_ids)}, "
                f"drafter 2 uses {list(state2.spec.target_layer_ids)}. Train the variable-prefix drafter with the "
                "same --target-layer-ids."
            )
        if state2.spec.block_size < state1.spec.block_size:
            raise ValueError("D2SD: the variable-prefix drafter's block_size must be >= drafter 1's.")
        self.s1, self.s2, self.method, self.max_nodes, self.lap = state1, state2, method, max_nodes, lap
        self.boundaries, self.alternatives = boundaries, alternatives
        self.block1 = torch.full((1, state1.spec.block_size), state1.spec.mask_token_id, dtype=torch.long)

    def propose(self, root_token: int, context: torch.Tensor, past: int, depth_limit: int) -> Tree:
        if self.max_nodes == 0:  # budget 0: the root alone, nothing to draft
            return build_chain(root_token, torch.empty(0, dtype=torch.long))
        D, A = depth_limit, self.alternatives
        self.block1[0, 0] = root_token
        lp1 = self.s1.draft(self.block1, context, past)[0, :D]  # (D, V)
        chain_lp, chain_ids = lp1.max(-1)  # (D,), (D,)
        js = rejection_boundaries(chain_lp, self.boundaries)  # (K,) depth indices
        alt_lp, alt_ids = torch.topk(lp1[js], A + 1, dim=-1)  # (K, A+1); rank 0 is the chain token
        alt_lp, alt_ids = alt_lp[:, 1:], alt_ids[:, 1:]

        # drafter 2: one block per (boundary j, alternative): [root, chain[:j], alt, mask, ...]
        bs2 = self.s2.spec.block_size
        cl = chain_ids.tolist()
        branches = [(k, j, a) for k, j in enumerate(js.tolist()) for a in range(A)]  # row b of drafter 2
        blocks = torch.full((len(branches), bs2), self.s2.spec.mask_token_id, dtype=torch.long)
        blocks[:, 0] = root_token
        for b, (k, j, a) in enumerate(branches):
            blocks[b, 1:j + 1] = chain_ids[:j].cpu()
            blocks[b, j + 1] = alt_ids[k, a]
        lp2 = self.s2.draft(blocks, context, past)  # (K*A, bs2-1, V): [b, m] predicts depth m + 1
        self.lap("draft_s")

        paths: list[tuple[list[int], list[float]]]
        if self.method == "d2sd-tree":
            top_lp, top_ids = topk_per_position(lp1, self.max_nodes)
            paths = tree_paths(build_tree(root_token, top_lp.cpu(), top_ids.cpu(), self.max_nodes))
        else:
            paths = [(cl, chain_lp.tolist())]
        cont_lp, cont_ids = lp2[:, :D].max(-1)  # (K*A, D)
        for b, (k, j, a) in enumerate(branches):
            toks = cl[:j] + [int(alt_ids[k, a])] + cont_ids[b, j + 1:D].tolist()
            lps = chain_lp[:j].tolist() + [float(alt_lp[k, a])] + cont_lp[b, j + 1:D].tolist()
            paths.append((toks, lps))
        tree = merge_paths(root_token, paths, self.max_nodes)
        self.lap("tree_s")
        return tree


def make_proposer(target, drafter, spec: DrafterSpec, method: str, max_nodes: int,
                  budget_policy: Callable[[Tree], int] | None = None, lap: Callable[[str], None] = _no_lap,
                  drafter2=None, spec2: DrafterSpec | None = None, boundaries: int = 4, alternatives: int = 1):
    """The proposer for `method` ("ddtree", "dflash", "auto", "d2sd", "d2sd-tree").
    `lap(name)` books time to a DecodeStats field."""
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()
    state = DrafterState(drafter, spec, embed, head)
    if method in ("d2sd", "d2sd-tree"):
        return D2SDProposer(state, DrafterState(drafter2, spec2, embed, head), method, max_nodes,
                            boundaries, alternatives, lap)
    return DFlashProposer(state, method, max_nodes, budget_policy, lap)
