"""Shared fixtures for the core test suite: tiny seeded targets, random DFlash drafters, an oracle drafter.

Targets are built from a config (no Hub access), fp32, untied embeddings, and their lm_head is
replaced by a matrix with orthonormal rows (scaled by `logit_scale`), so that
  * logits are well spread (std ~ logit_scale), which keeps greedy argmax gaps far above fp32 noise,
  * any wanted logit vector v is reachable: hidden h = v @ W / scale^2 gives lm_head(h) = v.
The oracle drafter uses the second property to emit exactly the ranking it wants.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from hf_ddtree import DFlashDraftModel, make_drafter_config

# The models here are tiny: one intra-op thread is faster than two, and far more stable on a shared
# 2-core machine (thread hand-offs under contention made single generate() calls 10-50x slower).
# Override with HF_DDTREE_TEST_THREADS=<n>.
torch.set_num_threads(int(os.environ.get("HF_DDTREE_TEST_THREADS", "1")))

# The suite checks the device-resident round (tree, walk, compaction as tensor code: what runs on an
# accelerator) even on this CPU, where generate() would use the host heap and walk by default;
# tests/test_device_round.py checks the host way gives the same outputs. HF_DDTREE_DEVICE_ROUND=0 runs
# the whole suite the host way.
os.environ.setdefault("HF_DDTREE_DEVICE_ROUND", "1")

ARCHS = ("qwen3", "llama")
IMPLS = ("sdpa", "eager")
CACHES = ("static", "dynamic")

VOCAB = 64
HIDDEN = 64
LAYERS = 3
BLOCK = 8
TARGET_LAYERS = [0, 1]


def build_target(arch: str = "qwen3", impl: str = "sdpa", *, vocab: int = VOCAB, hidden: int = HIDDEN,
                 layers: int = LAYERS, seed: int = 0, logit_scale: float = 1.0, init_range: float = 0.1):
    """A tiny random causal LM (fp32, eval) with an lm_head whose rows are orthonormal * logit_scale."""
    assert vocab <= hidden, "the orthogonal-head trick needs hidden_size >= vocab_size"
    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=512,
        tie_word_embeddings=False, initializer_range=init_range,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)
    if arch == "qwen3":
        model = Qwen3ForCausalLM._from_config(Qwen3Config(**common), attn_implementation=impl)
    elif arch == "llama":
        model = LlamaForCausalLM._from_config(LlamaConfig(**common), attn_implementation=impl)
    else:
        raise ValueError(arch)
    model = model.float().eval()
    g = torch.Generator().manual_seed(seed + 1000)
    q, _ = torch.linalg.qr(torch.randn(hidden, vocab, generator=g))  # (H, V) orthonormal columns
    with torch.no_grad():
        model.lm_head.weight.copy_(q.T * logit_scale)  # (V, H) orthonormal rows
    gc = model.generation_config
    gc.bos_token_id = gc.eos_token_id = gc.pad_token_id = None
    return model


def build_drafter(target, *, block_size: int = BLOCK, seed: int = 1, target_layer_ids=None, num_hidden_layers: int = 1,
                  mask_token_id: int | None = None, **overrides):
    """A random z-lab-format DFlash drafter for `target`."""
    vocab = target.config.vocab_size
    torch.manual_seed(seed)
    cfg = make_drafter_config(
        target.config, num_hidden_layers=num_hidden_layers, block_size=block_size,
        mask_token_id=vocab - 1 if mask_token_id is None else mask_token_id,
        target_layer_ids=list(TARGET_LAYERS if target_layer_ids is None else target_layer_ids), **overrides,
    )
    cfg.initializer_range = 0.1
    return DFlashDraftModel(cfg).float().eval()


class OracleDrafter(nn.Module):
    """A DFlash-shaped drafter that knows the reference continuation.

    Block position p (the last Q entries of `position_ids`) predicts the token at absolute position p
    of `reference` (prompt + target's own continuation). At positions with `p % rank1_every ==
    rank1_phase` the correct token is put at rank 1 behind a decoy, so a single chain (DFlash)
    rejects there while a tree that also expands rank 1 still accepts. Elsewhere it is rank 0.

    It also checks the loop's drafter-cache bookkeeping on every call: the cached context length
    equals the first new position, and `position_ids` covers exactly the new context + the block.
    With `write_cache=True` it writes dummy K/V so that `dcache.crop(-block_size)` has real work.
    """

    def __init__(self, target, reference, *, block_size: int = BLOCK, rank1_every: int = 3, rank1_phase: int = 0,
                 hi: float = 6.0, lo: float = 5.0, write_cache: bool = True, target_layer_ids=None):
        super().__init__()
        vocab = target.config.vocab_size
        hidden = target.get_input_embeddings().weight.shape[1]
        cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=hidden // 4, intermediate_size=2 * hidden)
        cfg.block_size = block_size
        cfg.dflash_config = {"mask_token_id": vocab - 1,
                             "target_layer_ids": list(TARGET_LAYERS if target_layer_ids is None else target_layer_ids)}
        self.config = cfg
        self.anchor = nn.Parameter(torch.zeros(()))  # the loop reads next(drafter.parameters()).device
        w = target.get_output_embeddings().weight.detach().float()  # (V, H), rows orthogonal with equal norms
        self.register_buffer("inverse", w / (w[0].norm() ** 2), persistent=False)  # v @ inverse @ w.T == v
        self.reference = [int(t) for t in reference]
        self.rank1_every, self.rank1_phase = rank1_every, rank1_phase
        self.hi, self.lo, self.write_cache = hi, lo, write_cache
        self.vocab = vocab
        self.calls = 0

    def wanted_logits(self, p: int) -> torch.Tensor:
        v = torch.zeros(self.vocab)
        if p < len(self.reference):
            correct = self.reference[p]
            decoy = (correct + 1 + p) % self.vocab
            if decoy == correct:
                decoy = (decoy + 1) % self.vocab
            rank1 = self.rank1_every > 0 and p % self.rank1_every == self.rank1_phase
            v[decoy], v[correct] = (self.hi, self.lo) if rank1 else (self.lo, self.hi)
        return v

    def forward(self, position_ids, noise_embedding=None, target_hidden=None, past_key_values=None,
                use_cache=False, **kwargs):
        self.calls += 1
        q_len, ctx_len = noise_embedding.shape[1], target_hidden.shape[1]
        assert position_ids.shape == (1, ctx_len + q_len), (position_ids.shape, ctx_len, q_len)
        if past_key_values is not None:
            cached = int(past_key_values.get_seq_length())
            expect = int(position_ids[0, 0]) if self.write_cache else 0
            assert cached == expect, f"drafter cache holds {cached} tokens, expected {expect}"
            if self.write_cache:
                kv = torch.zeros(1, 1, ctx_len + q_len, 2)
                past_key_values.update(kv, kv, 0)
        block = position_ids[0, -q_len:].tolist()
        logits = torch.stack([self.wanted_logits(p) for p in block])  # (Q, V)
        return (logits @ self.inverse)[None] + 0.0 * self.anchor  # (1, Q, H)


@pytest.fixture
def make_target():
    return build_target


@pytest.fixture
def make_drafter():
    return build_drafter


@pytest.fixture
def make_oracle():
    return OracleDrafter
