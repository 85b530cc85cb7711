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
from transformers.cache_utils import DynamicCache

from .drafter import DrafterSpec
from .tree import Tree, build_chain, build_tree, topk_per_position


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

    def draft(self, blocks: torch.Tensor, context: torch.Tensor, past: int) -> torch.Tensor:
        """blocks: (K, bs) token ids, each starting at position `past`; context: (C, F) for positions
        [seen, past). Returns log-probs (K, bs - 1, V): row k, j predicts the token at past + j + 1."""
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
            past_key_values=self.cache,
            use_cache=True,
            is_causal=False,
        )  # (1, K*bs, H)
        self.cache.crop(-k * bs)  # keep the context, drop the blocks
        self.seen = past
        hidden = hidden.reshape(k, bs, -1)[:, 1:]  # (K, bs-1, H)
        logits = self.lm_head(hidden.to(self.lm_head.weight.device, self.lm_head.weight.dtype))
        return torch.log_softmax(logits.float(), dim=-1)


class DFlashProposer:
    """DDTree (`method="ddtree"`/`"auto"`) or the DFlash chain (`method="dflash"`) from one drafter."""

    def __init__(self, state: DrafterState, method: str, max_nodes: int,
                 budget_policy: Callable[[Tree], int] | None = None, lap: Callable[[str], None] = _no_lap):
        self.state, self.method, self.max_nodes, self.policy, self.lap = state, method, max_nodes, budget_policy, lap
        bs = state.spec.block_size
        self.block = torch.full((1, bs), state.spec.mask_token_id, dtype=torch.long)

    def propose(self, root_token: int, context: torch.Tensor, past: int, depth_limit: int) -> Tree:
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


def make_proposer(target, drafter, spec: DrafterSpec, method: str, max_nodes: int,
                  budget_policy: Callable[[Tree], int] | None = None, lap: Callable[[str], None] = _no_lap):
    """The proposer for `method` ("ddtree", "dflash", "auto"). `lap(name)` books time to a stats field."""
    state = DrafterState(drafter, spec, target.get_input_embeddings(), target.get_output_embeddings())
    return DFlashProposer(state, method, max_nodes, budget_policy, lap)
