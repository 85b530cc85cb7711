"""Stage 3 of drafter training: the DFlash block-diffusion objective over cached target features.

What one training example is (it mirrors `decoding.py` exactly):
  * an anchor position `a` inside the response (`a >= prompt_len`, `a <= T - 2`);
  * the block `[token[a], mask, mask, ...]` (`block_size` tokens) at positions `a .. a+bs-1`;
  * the context: the target features of every position `< a`;
  * labels: `token[a+1 .. a+bs-1]` for block positions `1 .. bs-1` (positions past the end of the
    sequence are ignored, so blocks near the end are clipped rather than skipped).

Many anchors of one sequence share ONE drafter forward: the queries are all N blocks
concatenated (N*bs rows) and the keys are `[features of the whole sequence (T rows), all blocks]`
with `position_ids = [0..T-1, a_1..a_1+bs-1, ..., a_N..a_N+bs-1]`. An additive 4D mask
(1, 1, N*bs, T+N*bs) lets block k see context positions `< a_k` and its own block only
(bidirectionally), which is what the drafter sees at inference with context = features[:a_k].
The drafter's attention rotates queries with the LAST Q position embeddings and keys with all
`T + N*bs` of them, so this packing is exact (tested against inference-style forwards).

Loss: cross-entropy of `target.lm_head(drafter_out)` at the labelled positions, weighted by
`w_j = exp(-(j - 1) / gamma)` for block position j (the DFlash paper's decay: early positions
matter most, since a chain is accepted only up to its first miss; gamma defaults to 7 for bs 16,
5 for bs 10, 4 for bs 8), normalised by the sum of weights in the optimiser step. Logits are
computed only for labelled rows, in chunks (`logits_chunk` rows, recomputed in backward via
checkpointing when there is more than one chunk) so a 49k-150k vocabulary fits in memory. The
target's `embed_tokens` and `lm_head` are frozen and shared (they are not in the drafter's
state_dict); only drafter parameters train.

Distillation (`distill_alpha=a > 0`, needs a feature cache made with `topk=K`): each labelled row's
loss becomes `(1 - a) * CE(label) + a * CE(p_target)`, where p_target is the target's own distribution
of that token (its top-K log-probs stored with the features, renormalised over the K), i.e. the
cross-entropy to the teacher's soft distribution instead of its argmax alone. The teacher of the
token at position t is the target's next-token distribution at t-1 given the TRUE prefix, so for a
greedy record its argmax is the label itself; what the soft part adds is the rest of the ranking,
which the tree's second and third branches use. The block decay weights apply to both terms.

Variable-prefix mode (`prefix_mode=True`, the D^2SD drafter): per block, k ~ U{0..bs-2} clean
tokens after the anchor are given as real embeddings (`[tok a, tok a+1 .. a+k, mask, ...]`), the
loss covers only the masked positions and the decay is counted from the first masked position.
The saved config carries `dflash_config["variable_prefix"] = True`.

Initialisation (`build_drafter(..., init_from_target=True)`, the default here): DFlash itself
initialises the drafter fresh; we copy the target's top `num_layers` decoder layers (q/k/v/o,
q/k norms, MLP, layer norms, whenever the shapes match) and its final norm into the drafter,
leaving `fc`/`hidden_norm` fresh. With a CPU budget of a few thousand steps this starts the drafter
from weights that already produce lm_head-ready hidden states; pass False for the paper's recipe.
`standardize_fc(drafter, feature_rms(store, train_idx))` then rescales fc's input columns to the
feature channels' scale (`hf-ddtree train-drafter` does this by default, `--standardize-features`).

Shortlisted softmax (`head_vocab=N > 0`): the frozen lm_head is ~80% of a step's FLOPs (49k rows on
SmolLM2). With a shortlist the loss of a step is a softmax over the N most frequent tokens of the
training responses, every label of that step (so the right class is always in it) and
`head_negatives` (default N/2) random other tokens, as in sampled-softmax training; the random
negatives matter: without them tokens outside the shortlist are never pushed down and full-vocabulary
argmax lands on them (measured: top-1 accuracy 0 after 60 steps). Validation (`evaluate`) always
uses the full vocabulary, so its tau is what inference gets. Measured on SmolLM2-135M (60 steps of
1024 block tokens, N=8192 + 4096 negatives): steps 1.6x faster, held-out loss 8.07 vs 7.60 for the
full softmax, i.e. about even per CPU-second; off by default.

Optimiser: AdamW (no decay on norms), cosine schedule with linear warm-up, grad-clip, optional bf16
autocast with fp32 master weights. bf16 is only a win where the hardware has bf16 matmuls (CUDA;
CPUs with AVX512-BF16 or AMX: 1.2-1.7x faster than fp32 there). On a CPU without them (e.g. AVX2
only) torch emulates bf16 and the 49k-row lm_head matmul runs ~10x SLOWER than fp32, so the default
(`bf16=None`) turns autocast on only where `fast_bf16()` says so, and the frozen lm_head is used
in fp32 (an fp32 copy if the target was loaded in bf16) when autocast is off. Resumable checkpoints in `out_dir/checkpoint-last`;
the final drafter in `out_dir/final` (loadable with `DFlashDraftModel.from_pretrained`).
The data order is a pure function of (seed, epoch, position), saved with the checkpoint, so a
resumed run reproduces the uninterrupted one step for step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from ..device import native_bf16
from ..drafter import DFlashDraftModel, make_drafter_config
from .features import FeatureStore

IGNORE = -100
CHECKPOINT = "checkpoint-last"
FINAL = "final"
LOG = "train_log.jsonl"


@dataclass
class TrainConfig:
    """Hyper-parameters of `train_drafter` (all saved into checkpoints and the train log)."""

    block_size: int = 16
    anchors_per_seq: int = 32  # blocks sampled per sequence per visit (fewer when the response is short)
    batch_tokens: int = 4096  # block (query) tokens per optimiser step, gathered over sequences
    steps: int | None = None  # total optimiser steps; None: derived from `epochs`
    epochs: float = 1.0
    lr: float = 6e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_ratio: float = 0.04
    warmup_steps: int | None = None  # overrides warmup_ratio
    gamma: float | None = None  # loss decay over block positions; None: default_gamma(block_size)
    grad_clip: float = 1.0
    bf16: bool | None = None  # bf16 autocast, fp32 master weights; None: on where bf16 is fast (fast_bf16())
    threads: int | None = None
    seed: int = 0
    prefix_mode: bool = False
    logits_chunk: int = 1024
    head_vocab: int = 0  # >0: softmax over the N most frequent training tokens + the step's labels (see `head_shortlist`)
    head_negatives: int | None = None  # random other tokens per step with head_vocab; None: head_vocab // 2
    distill_alpha: float = 0.0  # weight of the soft (target top-k) cross-entropy; needs a cache with topk > 0
    eval_every: int = 100
    val_anchors_per_seq: int = 32
    save_every: int = 200
    log_every: int = 10
    progress: bool = True

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


# ------------------------------------------------------------------------------------------------
# the objective: blocks, mask, weights, loss
# ------------------------------------------------------------------------------------------------

def fast_bf16(device: torch.device | str = "cpu") -> bool:
    """True on CUDA, and on CPUs with native bf16 matmuls (`device.native_bf16`)."""
    return native_bf16(device)


def head_weight(lm_head, bf16: bool) -> torch.Tensor:
    """The frozen lm_head weight in the dtype the loss uses: bf16 under autocast, else fp32 (copied once if needed)."""
    if getattr(lm_head, "bias", None) is not None:
        raise NotImplementedError("an lm_head with a bias is not supported")
    w = lm_head.weight.detach()
    return w.to(torch.bfloat16 if bf16 else torch.float32)


def default_gamma(block_size: int) -> float:
    """DFlash's loss-decay constants: 7 for block 16, 5 for block 10, 4 for block 8 (about 0.45 * bs otherwise)."""
    return {16: 7.0, 10: 5.0, 8: 4.0}.get(int(block_size), max(1.0, 0.45 * block_size))


def decay_weight(distance: torch.Tensor, gamma: float) -> torch.Tensor:
    """w = exp(-(d - 1) / gamma) for distance d >= 1 from the last given token (0 elsewhere)."""
    d = distance.float()
    return torch.where(d >= 1, torch.exp(-(d - 1) / gamma), torch.zeros_like(d))


def num_anchor_candidates(length: int, prompt_len: int) -> int:
    """Anchors a with prompt_len <= a <= length - 2 (the block's first prediction exists)."""
    return max(0, length - 1 - max(prompt_len, 0))


def sample_anchors(length: int, prompt_len: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """Up to n distinct sorted anchors uniformly from [prompt_len, length - 2]."""
    lo = max(prompt_len, 0)
    count = num_anchor_candidates(length, prompt_len)
    n = min(n, count)
    pick = torch.randperm(count, generator=generator)[:n]
    return (lo + pick).sort().values


def eval_anchors(length: int, prompt_len: int, block_size: int, n: int) -> torch.Tensor:
    """Deterministic, evenly spaced anchors whose whole block lies inside the sequence."""
    lo, hi = max(prompt_len, 0), length - block_size
    if hi < lo:
        return torch.empty(0, dtype=torch.long)
    return torch.linspace(lo, hi, min(n, hi - lo + 1)).round().long().unique()


def sample_prefix_lens(length: int, anchors: torch.Tensor, block_size: int, generator: torch.Generator) -> torch.Tensor:
    """k ~ U{0 .. min(bs-2, length-2-a)} clean tokens after each anchor (at least one labelled masked position stays)."""
    hi = torch.clamp(length - 2 - anchors, max=block_size - 2).clamp(min=0)
    u = torch.rand(anchors.shape[0], generator=generator)
    return torch.floor(u * (hi + 1).float()).long().clamp(max=hi)


@dataclass
class Blocks:
    """One sequence's packed training forward: inputs for the drafter plus labels and loss weights."""

    block_ids: torch.Tensor  # (N*bs,) token ids fed as noise: [tok a, (clean tokens), mask, ...]
    labels: torch.Tensor  # (N*bs,) target token or IGNORE
    distance: torch.Tensor  # (N*bs,) block position minus number of given tokens - 1 (>= 1 where labelled)
    label_pos: torch.Tensor  # (N*bs,) sequence position of each row's label (clamped to T-1 where unlabelled)
    position_ids: torch.Tensor  # (T + N*bs,)
    allowed: torch.Tensor  # (N*bs, T + N*bs) bool: query may attend key


def make_blocks(input_ids: torch.Tensor, anchors: torch.Tensor, block_size: int, mask_token_id: int,
                prefix_lens: torch.Tensor | None = None) -> Blocks:
    T, N, bs = input_ids.shape[0], anchors.shape[0], block_size
    j = torch.arange(bs)
    pos = anchors[:, None] + j[None]  # (N, bs)
    tokens = input_ids[pos.clamp(max=T - 1)]
    p = prefix_lens if prefix_lens is not None else torch.zeros(N, dtype=torch.long)
    given = j[None] <= p[:, None]  # the anchor and the clean prefix
    block_ids = torch.where(given, tokens, torch.full_like(tokens, mask_token_id))
    labels = torch.where(given | (pos > T - 1), torch.full_like(tokens, IGNORE), tokens)
    distance = j[None] - p[:, None]
    position_ids = torch.cat([torch.arange(T), pos.reshape(-1)])
    owner = torch.arange(N).repeat_interleave(bs)  # block of each query row
    ctx_visible = torch.arange(T)[None, :] < anchors.repeat_interleave(bs)[:, None]
    allowed = torch.cat([ctx_visible, owner[:, None] == owner[None, :]], dim=1)
    return Blocks(block_ids.reshape(-1), labels.reshape(-1), distance.reshape(-1),
                  pos.clamp(max=T - 1).reshape(-1), position_ids, allowed)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool (Q, K) -> additive (1, 1, Q, K): 0 where allowed, finfo(dtype).min elsewhere."""
    m = torch.zeros(allowed.shape, dtype=dtype)
    m.masked_fill_(~allowed, torch.finfo(dtype).min)
    return m[None, None]


def drafter_forward(drafter, embed, features: torch.Tensor, blocks: Blocks, mask_dtype=torch.float32) -> torch.Tensor:
    """One packed drafter forward for a sequence -> (N*bs, H) normed hidden states."""
    device = next(drafter.parameters()).device
    with torch.no_grad():
        noise = embed(blocks.block_ids.to(embed.weight.device)).to(device)
    out = drafter(
        position_ids=blocks.position_ids.to(device)[None],
        attention_mask=additive_mask(blocks.allowed, mask_dtype).to(device),
        noise_embedding=noise[None],
        target_hidden=features.to(device)[None],
    )
    return out[0]


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, w: torch.Tensor,
                soft_ids: torch.Tensor | None = None, soft_p: torch.Tensor | None = None,
                alpha: float = 0.0) -> torch.Tensor:
    logp = torch.log_softmax(F.linear(h.to(weight.dtype), weight).float(), dim=-1)  # (R, V')
    ce = -logp.gather(1, labels[:, None])[:, 0]
    if soft_ids is not None and alpha > 0:
        soft = -(soft_p * logp.gather(1, soft_ids)).sum(-1)  # cross-entropy to the teacher's top-k
        ce = (1.0 - alpha) * ce + alpha * soft
    return (ce * w).sum()


def weighted_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                    chunk: int = 1024, soft: tuple[torch.Tensor, torch.Tensor] | None = None,
                    alpha: float = 0.0) -> torch.Tensor:
    """sum_i w_i * CE(hidden_i @ weight.T, label_i) over labelled rows, in chunks of `chunk` rows.

    weight: the frozen lm_head weight (see `head_weight`). With more than one chunk each chunk is
    checkpointed, so only one chunk's logits live at a time (the matmul is recomputed in backward).
    soft: per row ((R, K) teacher token ids as rows of `weight`, (R, K) teacher probabilities summing
    to 1); with alpha > 0 each row's loss is (1 - alpha) * CE(label) + alpha * CE(teacher) (distillation).
    """
    keep = labels != IGNORE
    h, y, w = hidden[keep], labels[keep].to(hidden.device), weights[keep].to(hidden.device)
    if h.shape[0] == 0:
        return hidden.sum() * 0.0
    if soft is not None and alpha > 0:
        si, sp = soft[0][keep].to(hidden.device), soft[1][keep].to(hidden.device)
    else:
        si, sp, alpha = None, None, 0.0
    if h.shape[0] <= chunk:
        return _chunk_loss(h, weight, y, w, si, sp, alpha)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        part = (si[s:s + chunk], sp[s:s + chunk]) if si is not None else (None, None)
        total = total + checkpoint(_chunk_loss, h[s:s + chunk], weight, y[s:s + chunk], w[s:s + chunk],
                                   *part, alpha, use_reentrant=False)
    return total


def teacher_targets(store: FeatureStore, i: int, blocks: Blocks, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Record i's distillation targets for `blocks`' rows: ((N*bs, K) token ids, (N*bs, K) probabilities).

    The teacher of the token at sequence position t is the target's next-token distribution at t-1
    (stored by `extract_features(topk=K)`); its top-k log-probs are renormalised over the k kept.
    Unlabelled rows get a harmless copy (their loss weight is 0).
    """
    ids, logp = store.topk(i)  # (T, K), (T, K); row t is the distribution of token t+1
    if k is not None:
        ids, logp = ids[:, :k], logp[:, :k]
    src = (blocks.label_pos - 1).clamp(min=0)
    return ids[src], torch.softmax(logp[src], dim=-1)


def token_counts(store: FeatureStore, records: Sequence[int], vocab_size: int) -> torch.Tensor:
    """(vocab_size,) how often each token is a response token of `records` (what the loss predicts)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for i in records:
        ids = store.input_ids(i)[store.prompt_len(i):]
        counts += torch.bincount(ids.clamp(0, vocab_size - 1), minlength=vocab_size)
    return counts


def head_shortlist(counts: torch.Tensor, n: int) -> torch.Tensor:
    """The n most frequent token ids (sorted), from `token_counts`."""
    n = min(int(n), counts.shape[0])
    return counts.topk(n).indices.sort().values


def restrict_head(weight: torch.Tensor, shortlist: torch.Tensor, labels: Sequence[torch.Tensor],
                  negatives: int = 0, generator: torch.Generator | None = None,
                  soft_ids: Sequence[torch.Tensor] | None = None):
    """Rows of `weight` for shortlist ∪ labels ∪ `negatives` random other ids, and the labels re-indexed.

    weight: (V, H); shortlist: (n,) sorted ids; labels: per sequence (L_i,) ids or IGNORE.
    The random negatives (drawn uniformly from the ids not already kept) push the rest of the
    vocabulary down over the steps; without them the drafter is free to put mass on tokens it never
    sees in a softmax, and full-vocabulary argmax at inference lands on them.
    soft_ids: per sequence (L_i, K) distillation teacher ids, also kept and re-indexed.
    Returns ((n', H) weight, [(L_i,) re-indexed labels]), plus [(L_i, K) re-indexed soft ids] with soft_ids.
    """
    real = [y[y != IGNORE] for y in labels]
    real += [s.reshape(-1) for s in soft_ids or ()]
    keep = torch.unique(torch.cat([shortlist, *real]))  # sorted
    if negatives > 0:
        rest = torch.ones(weight.shape[0], dtype=torch.bool)
        rest[keep] = False
        rest = rest.nonzero().squeeze(1)
        pick = torch.randperm(rest.numel(), generator=generator)[:negatives]
        keep = torch.unique(torch.cat([keep, rest[pick]]))
    out = []
    for y in labels:
        z = torch.full_like(y, IGNORE)
        m = y != IGNORE
        z[m] = torch.searchsorted(keep, y[m])
        out.append(z)
    if soft_ids is not None:
        return weight[keep.to(weight.device)], out, [torch.searchsorted(keep, s) for s in soft_ids]
    return weight[keep.to(weight.device)], out


# ------------------------------------------------------------------------------------------------
# drafter construction
# ------------------------------------------------------------------------------------------------

def _decoder(model):
    dec = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    return dec


def init_from_target_layers(drafter: DFlashDraftModel, target) -> dict[str, list[str]]:
    """Copy the target's top decoder layers (and final norm) into the drafter where shapes match.

    Drafter layer i gets target layer `n_target - n_draft + i`. Returns {"copied": [...], "skipped": [...]}.
    """
    dec = _decoder(target)
    t_layers = dec.layers
    n_t, n_d = len(t_layers), len(drafter.layers)
    copied, skipped = [], []
    with torch.no_grad():
        for i, layer in enumerate(drafter.layers):
            src = t_layers[max(0, n_t - n_d + i)].state_dict()
            for name, p in layer.state_dict().items():
                s = src.get(name)
                key = f"layers.{i}.{name}"
                if s is not None and s.shape == p.shape:
                    p.copy_(s.to(p.dtype))
                    copied.append(key)
                else:
                    skipped.append(key)
        norm = getattr(dec, "norm", None)
        if norm is not None and norm.weight.shape == drafter.norm.weight.shape:
            drafter.norm.weight.copy_(norm.weight.to(drafter.norm.weight.dtype))
            copied.append("norm.weight")
        else:
            skipped.append("norm.weight")
    return {"copied": copied, "skipped": skipped}


def feature_rms(store: FeatureStore, records: Sequence[int], max_tokens: int = 50_000) -> torch.Tensor:
    """(F,) root-mean-square of each cached feature channel over (up to `max_tokens` of) `records`."""
    total, count = None, 0
    for i in records:
        f = store.features(i).float()
        sq = f.pow(2).sum(0)
        total = sq if total is None else total + sq
        count += f.shape[0]
        if count >= max_tokens:
            break
    if total is None:
        raise ValueError("no records to measure feature scales on.")
    return (total / max(count, 1)).sqrt()


def standardize_fc(drafter: DFlashDraftModel, rms: torch.Tensor, eps: float = 1e-6) -> None:
    """Data-dependent init of `fc`: divide its input columns by each feature channel's RMS.

    Target residual streams carry a few "massive activation" channels (SmolLM2's layer-27 states
    have norms ~1e4, dominated by a handful of channels); through a random fc and the RMSNorm after
    it they drown every other channel, and the drafter needs many steps just to learn to ignore
    them. Folding 1/rms into fc's columns makes every channel start on an equal footing (the
    column scale is renormalised so fc's output keeps its default magnitude). The checkpoint format
    is unchanged: it is only an initialisation. Measured on SmolLM2-135M (2-layer drafter, 60 steps of
    1024 block tokens, same data and seed): held-out loss 7.60 with it vs 7.92 without.
    """
    w = drafter.fc.weight  # (H, F)
    if rms.shape[0] != w.shape[1]:
        raise ValueError(f"feature RMS has {rms.shape[0]} channels but fc takes {w.shape[1]}.")
    inv = 1.0 / rms.to(w.dtype).clamp_min(eps)
    inv = inv / inv.pow(2).mean().sqrt()  # unit mean-square column scale
    with torch.no_grad():
        w.mul_(inv[None, :])


def build_drafter(target, *, num_layers: int = 1, block_size: int = 16, mask_token_id: int,
                  target_layer_ids: Sequence[int] | None = None, intermediate_size: int | None = None,
                  init_from_target: bool = True, prefix_mode: bool = False, seed: int = 0) -> DFlashDraftModel:
    """A fresh fp32 DFlash drafter sized for `target` (see the module docstring on `init_from_target`)."""
    config = make_drafter_config(target.config, num_hidden_layers=num_layers, block_size=block_size,
                                 mask_token_id=mask_token_id,
                                 target_layer_ids=list(target_layer_ids) if target_layer_ids is not None else None,
                                 intermediate_size=intermediate_size)
    if prefix_mode:
        config.dflash_config = {**config.dflash_config, "variable_prefix": True}
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        drafter = DFlashDraftModel(config).float()
    finally:
        torch.random.set_rng_state(state)
    if init_from_target:
        init_from_target_layers(drafter, target)
    return drafter


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------

def split_train_val(ids: Sequence[str], val_fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic split by a hash of the record id (stable when records are added).

    With val_fraction > 0 and at least two records, at least one record is held out.
    """
    if val_fraction <= 0 or len(ids) < 2:
        return list(range(len(ids))), []
    h = [int(hashlib.sha1(str(i).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for i in ids]
    val = [k for k, x in enumerate(h) if x < val_fraction]
    if not val:
        val = [min(range(len(ids)), key=lambda k: h[k])]
    if len(val) == len(ids):
        val = val[:-1]
    vs = set(val)
    return [k for k in range(len(ids)) if k not in vs], val


class DataOrder:
    """Epoch-wise shuffled record order; everything random is a function of (seed, epoch, pos)."""

    def __init__(self, records: Sequence[int], seed: int, epoch: int = 0, pos: int = 0):
        self.records, self.seed, self.epoch, self.pos = list(records), int(seed), int(epoch), int(pos)
        self._perm_epoch, self._perm = None, None

    def _perm_for(self, epoch: int) -> list[int]:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = [self.records[i] for i in torch.randperm(len(self.records), generator=g).tolist()]
            self._perm_epoch = epoch
        return self._perm

    def next(self) -> tuple[int, torch.Generator]:
        if self.pos >= len(self.records):
            self.epoch, self.pos = self.epoch + 1, 0
        rec = self._perm_for(self.epoch)[self.pos]
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + self.pos + 17)
        self.pos += 1
        return rec, g

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}


def _query_tokens(store: FeatureStore, i: int, cfg: TrainConfig) -> int:
    r = store.records[i]
    return min(cfg.anchors_per_seq, num_anchor_candidates(int(r["length"]), int(r["prompt_len"]))) * cfg.block_size


def steps_per_epoch(store: FeatureStore, train_idx: Sequence[int], cfg: TrainConfig) -> int:
    total = sum(_query_tokens(store, i, cfg) for i in train_idx)
    return max(1, math.ceil(total / cfg.batch_tokens))


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(drafter, target, store: FeatureStore, val_idx: Sequence[int], *, block_size: int, mask_token_id: int,
             anchors_per_seq: int = 32, bf16: bool = False, logits_chunk: int = 1024,
             lm_weight: torch.Tensor | None = None) -> dict:
    """Top-1 accuracy per block position and the expected greedy-chain acceptance length on held-out records.

    tau = 1 + sum_j P(the first j predictions of a block are all right) (the +1 is the target's
    bonus token), over evenly spaced full blocks inside the responses. Blocks are always plain
    `[anchor, mask, ...]` (also for a variable-prefix drafter), so runs are comparable. Labels are
    the recorded responses: exact for greedy records, an approximation for sampled ones.
    """
    embed = target.get_input_embeddings()
    if lm_weight is None:
        lm_weight = head_weight(target.get_output_embeddings(), bf16)
    was_training = drafter.training
    drafter.eval()
    device = next(drafter.parameters()).device
    correct, losses, n_tok = [], 0.0, 0
    try:
        for i in val_idx:
            feats, ids, plen = store.get(i)
            anchors = eval_anchors(ids.shape[0], plen, block_size, anchors_per_seq)
            if anchors.numel() == 0:
                continue
            blocks = make_blocks(ids, anchors, block_size, mask_token_id)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                hidden = drafter_forward(drafter, embed, feats, blocks,
                                         torch.bfloat16 if bf16 else torch.float32)
                hidden = hidden.view(-1, block_size, hidden.shape[-1])[:, 1:].reshape(-1, hidden.shape[-1])
                labels = blocks.labels.view(-1, block_size)[:, 1:].reshape(-1).to(device)
                preds = []
                for s in range(0, hidden.shape[0], logits_chunk):
                    h = hidden[s:s + logits_chunk]
                    logits = F.linear(h.to(lm_weight.dtype), lm_weight).float()
                    losses += float(F.cross_entropy(logits, labels[s:s + logits_chunk], reduction="sum"))
                    preds.append(logits.argmax(-1))
            n_tok += labels.numel()
            correct.append((torch.cat(preds) == labels).view(-1, block_size - 1).cpu())
    finally:
        drafter.train(was_training)
    if not correct:
        return {"blocks": 0, "acc": [], "tau": float("nan"), "loss": float("nan")}
    c = torch.cat(correct)
    prefix = torch.cumprod(c.long(), dim=1).float().mean(0)
    return {
        "blocks": int(c.shape[0]),
        "acc": [round(float(x), 4) for x in c.float().mean(0)],
        "tau": float(1.0 + prefix.sum()),
        "loss": losses / max(1, n_tok),
    }


# ------------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    step: int
    final_dir: Path | None
    losses: list[float] = field(default_factory=list)  # per-step weighted CE of this run's steps
    tokens_per_s: float = 0.0
    val: dict | None = None


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _atomic_dir_replace(tmp: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _find_checkpoint(out_dir: Path) -> Path | None:
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        p = out_dir / name
        if (p / "trainer_state.pt").exists():
            return p
    return None


def _load_safetensors_into(model, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the drafter (missing {missing}, unexpected {unexpected}).")


def train_drafter(target, drafter: DFlashDraftModel, store: FeatureStore, out_dir: str | os.PathLike,
                  config: TrainConfig | None = None, *, train_idx: Sequence[int] | None = None,
                  val_idx: Sequence[int] = (), resume: bool = False, save_final: bool = True,
                  stop_after: int | None = None, time_limit_s: float | None = None,
                  extra_meta: dict | None = None) -> TrainResult:
    """Train `drafter` (in place) on `store`'s cached features; see the module docstring.

    target: supplies the frozen `embed_tokens`/`lm_head` (its decoder layers are not run here).
    resume: continue from `out_dir/checkpoint-last` (weights, optimiser, scheduler, step, data order).
    stop_after / time_limit_s: end this call early after that many steps / seconds (a checkpoint is
    saved; `out_dir/final` is written only once all steps are done), to be continued with resume=True.
    Writes `out_dir/train_log.jsonl`, `out_dir/checkpoint-last` every `save_every` steps and, when
    `save_final`, `out_dir/final` (drafter dir + train_log.jsonl + train_config.json).
    """
    cfg = config or TrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    spec_bs = int(drafter.block_size)
    if spec_bs != cfg.block_size:
        raise ValueError(f"TrainConfig.block_size={cfg.block_size} but the drafter's block_size is {spec_bs}.")
    if [int(i) for i in drafter.target_layer_ids] != store.layer_ids:
        raise ValueError(f"the drafter reads target layers {drafter.target_layer_ids} but the feature cache holds "
                         f"{store.layer_ids}: extract features for the drafter's layers.")
    if cfg.prefix_mode:
        drafter.config.dflash_config = {**drafter.config.dflash_config, "variable_prefix": True}
    mask_id = int(drafter.mask_token_id)
    bs = cfg.block_size
    gamma = float(cfg.gamma if cfg.gamma is not None else default_gamma(bs))
    train_idx = list(range(len(store))) if train_idx is None else list(train_idx)
    train_idx = [i for i in train_idx if num_anchor_candidates(int(store.records[i]["length"]),
                                                                int(store.records[i]["prompt_len"])) > 0]
    if not train_idx:
        raise ValueError("no training record has a response token to predict.")
    val_idx = list(val_idx)
    distill = float(cfg.distill_alpha)
    if not 0.0 <= distill <= 1.0:
        raise ValueError(f"distill_alpha={distill} is out of range: use a weight in [0, 1] (0 turns distillation off).")
    if distill > 0 and not store.topk_k:
        raise ValueError(f"distill_alpha={distill} needs the target's top-k log-probs, but the feature cache in "
                         f"{store.dir} has none: extract features with --distill-topk K into a new --features-dir.")
    total_steps = cfg.steps if cfg.steps is not None else max(
        1, math.ceil(cfg.epochs * steps_per_epoch(store, train_idx, cfg)))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * total_steps))

    device = next(drafter.parameters()).device
    bf16 = fast_bf16(device) if cfg.bf16 is None else bool(cfg.bf16)
    embed = target.get_input_embeddings()
    lm_weight = head_weight(target.get_output_embeddings(), bf16).to(device)
    frozen = [(p, p.requires_grad) for p in embed.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)

    from transformers import get_cosine_schedule_with_warmup

    drafter.float().train()
    optimizer = torch.optim.AdamW(_param_groups(drafter, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                                  eps=cfg.eps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    order = DataOrder(train_idx, cfg.seed)
    step, loss_ema, tokens_seen, last_val = 0, None, 0, None
    shortlist = None
    if cfg.head_vocab and cfg.head_vocab < lm_weight.shape[0]:
        shortlist = head_shortlist(token_counts(store, train_idx, lm_weight.shape[0]), cfg.head_vocab)

    log_path = out / LOG
    ckpt = _find_checkpoint(out)
    if ckpt is not None and not resume:
        warnings.warn(f"{ckpt} exists but resume=False: starting from scratch and overwriting it "
                      "(pass resume=True / --resume to continue that run).", stacklevel=2)
    if resume and ckpt is not None:
        _load_safetensors_into(drafter, ckpt)
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, loss_ema, tokens_seen = int(state["step"]), state.get("loss_ema"), int(state.get("tokens_seen", 0))
        order = DataOrder(train_idx, cfg.seed, **state["data_order"])
        last_val = state.get("last_val") or None
        if "torch_rng" in state:
            torch.random.set_rng_state(state["torch_rng"])
        if log_path.exists():  # drop log lines written after the checkpoint
            keep = [ln for ln in log_path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
            log_path.write_text("".join(k + "\n" for k in keep))
    elif log_path.exists():
        log_path.unlink()  # a fresh run: the log starts over

    meta = {"event": "start", "step": step, "total_steps": total_steps, "warmup_steps": warmup, "gamma": gamma,
            "train_records": len(train_idx), "val_records": len(val_idx), "config": cfg.to_dict(),
            "drafter_params": sum(p.numel() for p in drafter.parameters()), "resumed": bool(resume and step > 0),
            "threads": torch.get_num_threads(), "bf16": bf16, **(extra_meta or {})}

    def log(rec: dict) -> None:
        with log_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    log(meta)
    mask_dtype = torch.bfloat16 if bf16 else torch.float32

    def do_eval() -> dict | None:
        if not val_idx:
            return None
        return evaluate(drafter, target, store, val_idx, block_size=bs, mask_token_id=mask_id,
                        anchors_per_seq=cfg.val_anchors_per_seq, bf16=bf16, logits_chunk=cfg.logits_chunk,
                        lm_weight=lm_weight)

    def save_checkpoint() -> None:
        tmp = out / (CHECKPOINT + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        drafter.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "data_order": order.state(), "loss_ema": loss_ema, "tokens_seen": tokens_seen,
                    "last_val": last_val, "torch_rng": torch.random.get_rng_state()}, tmp / "trainer_state.pt")
        (tmp / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        _atomic_dir_replace(tmp, out / CHECKPOINT)

    result = TrainResult(step=step, final_dir=None)
    bar = tqdm(total=total_steps, initial=step, desc="train drafter", unit="step", disable=not cfg.progress)
    train_time, train_tokens = 0.0, 0
    start_step, t_start = step, time.perf_counter()
    try:
        while step < total_steps:
            if stop_after is not None and step - start_step >= stop_after:
                break
            if time_limit_s is not None and time.perf_counter() - t_start >= time_limit_s:
                break
            t0 = time.perf_counter()
            # ---- plan the step: sequences until batch_tokens block tokens --------------------------
            plan, q_tokens = [], 0
            while q_tokens < cfg.batch_tokens:
                rec, g = order.next()
                feats, ids, plen = store.get(rec)
                anchors = sample_anchors(ids.shape[0], plen, cfg.anchors_per_seq, g)
                prefix = sample_prefix_lens(ids.shape[0], anchors, bs, g) if cfg.prefix_mode else None
                blocks = make_blocks(ids, anchors, bs, mask_id, prefix)
                w = decay_weight(blocks.distance, gamma) * (blocks.labels != IGNORE)
                soft = teacher_targets(store, rec, blocks) if distill > 0 else None
                plan.append((feats, blocks, w, soft))
                q_tokens += blocks.block_ids.numel()
            total_w = float(sum(float(w.sum()) for _, _, w, _ in plan))
            # ---- forward/backward per sequence, one optimiser step ---------------------------------
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            head, labels = lm_weight, [b.labels for _, b, _, _ in plan]
            soft_ids = [s[0] for _, _, _, s in plan] if distill > 0 else None
            if shortlist is not None:
                neg = cfg.head_negatives if cfg.head_negatives is not None else cfg.head_vocab // 2
                head, labels, *rest = restrict_head(lm_weight, shortlist, labels, neg,
                                                    torch.Generator().manual_seed(cfg.seed * 7919 + step), soft_ids)
                soft_ids = rest[0] if rest else None
            for k, ((feats, blocks, w, soft), y) in enumerate(zip(plan, labels)):
                if soft is not None:
                    soft = (soft_ids[k], soft[1])
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    hidden = drafter_forward(drafter, embed, feats, blocks, mask_dtype)
                    loss = weighted_ce_sum(hidden, head, y, w, cfg.logits_chunk, soft, distill) / max(total_w, 1e-12)
                loss.backward()
                step_loss += float(loss.detach())
            if cfg.grad_clip and cfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(drafter.parameters(), cfg.grad_clip))
            else:
                grad_norm = float("nan")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            step += 1
            dt = time.perf_counter() - t0
            train_time += dt
            train_tokens += q_tokens
            tokens_seen += q_tokens
            alpha = max(0.05, 1.0 / step)  # a running mean over the first 20 steps, then an EMA
            loss_ema = step_loss if loss_ema is None else (1 - alpha) * loss_ema + alpha * step_loss
            result.losses.append(step_loss)
            tps = train_tokens / max(train_time, 1e-9)
            if step % max(1, cfg.log_every) == 0 or step == total_steps or step == 1:
                log({"step": step, "loss": round(step_loss, 5), "loss_ema": round(loss_ema, 5), "lr": lr,
                     "grad_norm": round(grad_norm, 4), "tokens": tokens_seen, "tok_per_s": round(tps, 1),
                     "epoch": order.epoch})
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == total_steps) and val_idx:
                last_val = do_eval()
                log({"step": step, "val": last_val})
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                save_checkpoint()
            post = {"loss": f"{loss_ema:.3f}", "lr": f"{lr:.2e}", "tok/s": f"{tps:.0f}"}
            if last_val:
                post["tau"] = f"{last_val['tau']:.2f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
    finally:
        bar.close()
        for p, flag in frozen:
            p.requires_grad_(flag)

    result.step = step
    result.tokens_per_s = train_tokens / max(train_time, 1e-9)
    result.val = last_val
    done = step >= total_steps
    if cfg.save_every or not done:
        save_checkpoint()
    log({"event": "end" if done else "pause", "step": step, "total_steps": total_steps,
         "tok_per_s": round(result.tokens_per_s, 1), "val": last_val})
    if save_final and done:
        final = out / FINAL
        tmp = out / (FINAL + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        drafter.save_pretrained(tmp)
        shutil.copyfile(log_path, tmp / LOG)
        (tmp / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        _atomic_dir_replace(tmp, final)
        result.final_dir = final
    return result
