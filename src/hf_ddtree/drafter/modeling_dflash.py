"""DFlash block-diffusion draft model.

This file is self-contained (it imports only torch and transformers) because it is also the
remote code of a drafter repo on the Hub: `save_pretrained` copies it next to the weights and
`AutoModel.from_pretrained("org/name", trust_remote_code=True)` imports it from there.

Checkpoint format (the one z-lab publishes, loaded unchanged):
  * config: a stock `Qwen3Config` (`model_type: "qwen3"`) plus `block_size`, `num_target_layers`
    and `dflash_config = {"mask_token_id": int, "target_layer_ids": [int, ...]}`. The
    transformers built-in DFlash convention (`block_size`, `mask_token_id`, `target_layer_ids`
    at the top level) is read too.
  * weights: `fc`, `hidden_norm`, `layers.N.{input_layernorm, post_attention_layernorm}`,
    `layers.N.self_attn.{q,k,v,o}_proj`, `layers.N.self_attn.{q,k}_norm`, `layers.N.mlp.*`,
    `norm`. No `embed_tokens` and no `lm_head`: the drafter borrows the target's.

What one forward does (shapes for batch B):
  target_hidden  (B, C, len(target_layer_ids) * H_target)  features of C new context tokens
  noise_embedding (B, Q, H)                                  target embeddings of the block
                                                             [anchor, mask, mask, ...]
  position_ids   (B, C + Q)                                  positions of the new context tokens,
                                                             then of the block
  -> (B, Q, H) final-normed hidden states; `target.lm_head(out[:, 1:])` gives the draft logits.
Queries come from the block only; keys/values from [cached context, new context, block]. There
is no causal mask: every block position sees the whole context and the whole block (unless the
caller passes a 4D mask, as training does).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3Config,
    Qwen3MLP,
    Qwen3PreTrainedModel,
    Qwen3RMSNorm,
    Qwen3RotaryEmbedding,
    eager_attention_forward,
    rotate_half,
)

_MISSING = object()
# transformers 5.24 renamed the cache argument and output field `past_key_values` -> `cache`; this
# file is also Hub remote code (no hf_ddtree import), so it follows the rename itself.
_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def dflash_field(config: Any, name: str, default: Any = _MISSING) -> Any:
    """Read a DFlash field from `config.dflash_config[name]` (z-lab) or `config.<name>` (top level)."""
    sub = getattr(config, "dflash_config", None)
    if isinstance(sub, dict) and sub.get(name) is not None:
        return sub[name]
    value = getattr(config, name, None)
    if value is not None:
        return value
    if default is _MISSING:
        raise ValueError(
            f"DFlash drafter config has no `{name}`: set `dflash_config.{name}` (z-lab format) or a "
            f"top-level `{name}` in the drafter's config.json."
        )
    return default


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """z-lab's default: the middle layer for one draft layer, else evenly spaced in [1, L - 3]."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, max(1, num_target_layers - 3)
    return [round(start + i * (end - start) / (num_draft_layers - 1)) for i in range(num_draft_layers)]


def _rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    # cos/sin: (B, C+Q, D) for every new key position; queries are the last Q of them.
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q_len = q.shape[-2]
    q = q * cos[..., -q_len:, :] + rotate_half(q) * sin[..., -q_len:, :]
    k = k * cos + rotate_half(k) * sin
    return q, k


class DFlashAttention(nn.Module):
    """Queries from the block; keys/values from [context features, block]. Qwen3 q/k norms."""

    def __init__(self, config: Qwen3Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = False
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        layer_types = getattr(config, "layer_types", None)
        sliding = layer_types is not None and layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if sliding else None

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, Q, H) block
        target_hidden: torch.Tensor,  # (B, C, H) projected context features
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[Cache] = None,
        **kwargs,
    ) -> torch.Tensor:
        bsz, q_len = hidden_states.shape[:-1]
        ctx_len = target_hidden.shape[1]
        q = self.q_norm(self.q_proj(hidden_states).view(bsz, q_len, -1, self.head_dim)).transpose(1, 2)
        kv_in = torch.cat([target_hidden, hidden_states], dim=1)  # (B, C+Q, H)
        k = self.k_norm(self.k_proj(kv_in).view(bsz, ctx_len + q_len, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(kv_in).view(bsz, ctx_len + q_len, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        cos, sin = cos[:, -(ctx_len + q_len):], sin[:, -(ctx_len + q_len):]
        q, k = _rotate(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attn_fn: Callable = eager_attention_forward
        if self.config._attn_implementation != "eager":
            attn_fn = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        kwargs.pop("is_causal", None)
        out, _ = attn_fn(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            is_causal=False,
            **kwargs,
        )
        return self.o_proj(out.reshape(bsz, q_len, -1))


class DFlashDecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int):
        super().__init__()
        self.self_attn = DFlashAttention(config, layer_idx)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, target_hidden, position_embeddings, attention_mask=None,
                past_key_values=None, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = residual + self.self_attn(
            hidden_states, target_hidden, position_embeddings, attention_mask, past_key_values, **kwargs
        )
        residual = hidden_states
        return residual + self.mlp(self.post_attention_layernorm(hidden_states))


class DFlashDraftModel(Qwen3PreTrainedModel):
    """DFlash drafter: fc + RMSNorm over concatenated target-layer features, Qwen3-style layers."""

    config_class = Qwen3Config
    base_model_prefix = "dflash"
    _no_split_modules = ["DFlashDecoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: Qwen3Config):
        super().__init__(config)
        self.block_size = int(dflash_field(config, "block_size"))
        self.mask_token_id = int(dflash_field(config, "mask_token_id"))
        layer_ids = dflash_field(config, "target_layer_ids", None)
        if layer_ids is None:
            layer_ids = default_target_layer_ids(int(dflash_field(config, "num_target_layers")),
                                                 config.num_hidden_layers)
        self.target_layer_ids = [int(i) for i in layer_ids]
        # mirror the fields at the config's top level, where transformers' built-in DFlash reads them
        config.block_size, config.mask_token_id = self.block_size, self.mask_token_id
        config.target_layer_ids = list(self.target_layer_ids)
        self.layers = nn.ModuleList([DFlashDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config)
        self.fc = nn.Linear(len(self.target_layer_ids) * config.hidden_size, config.hidden_size, bias=False)
        self.hidden_norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def __getattr__(self, name: str):
        # Stock generate(assistant_model=drafter) without `speculation_type="dflash"` treats the drafter
        # as a small causal LM and reads its generation_config: say what to do instead of "no attribute".
        # (An AttributeError still, so hasattr()/getattr(..., None) probes keep working.)
        if name == "generation_config":
            raise AttributeError(
                f"{type(self).__name__} is a DFlash drafter, not a causal LM: generate(assistant_model=drafter) cannot "
                "run it as a classic assistant. Call hf_ddtree.enable(target) first (DDTree / DFlash), or pass "
                "speculation_type='dflash' to generate() (transformers' built-in DFlash chain)."
            )
        return super().__getattr__(name)

    def forward(
        self,
        position_ids: torch.LongTensor,  # (B, C + Q)
        attention_mask: Optional[torch.Tensor] = None,  # None or additive (B, 1, Q, cached + C + Q)
        noise_embedding: Optional[torch.Tensor] = None,  # (B, Q, H)
        target_hidden: Optional[torch.Tensor] = None,  # (B, C, F)
        past_key_values: Optional[Cache] = None,  # transformers < 5.24 name of `cache`
        use_cache: bool = False,
        cache: Optional[Cache] = None,
        noise_embeds: Optional[torch.Tensor] = None,  # transformers' built-in DFlash names
        context_hidden_states: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> torch.Tensor | BaseModelOutputWithPast:  # (B, Q, H)
        # transformers' built-in DFlash (`speculation_type="dflash"`) passes `noise_embeds` and
        # `context_hidden_states`, a 2D padding mask, and reads `.last_hidden_state`.
        builtin = noise_embedding is None and noise_embeds is not None
        cache = cache if cache is not None else past_key_values
        hidden_states = noise_embedding if noise_embedding is not None else noise_embeds
        features = target_hidden if target_hidden is not None else context_hidden_states
        if hidden_states is None or features is None:
            raise ValueError("DFlashDraftModel.forward needs `noise_embedding` and `target_hidden`.")
        if attention_mask is not None and attention_mask.dim() == 2:
            if not bool(attention_mask.all()):
                raise ValueError("DFlashDraftModel does not support padded inputs (a 2D mask with zeros).")
            attention_mask = None
        features = self.hidden_norm(self.fc(features.to(self.fc.weight.dtype)))
        hidden_states = hidden_states.to(features.dtype)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, features, position_embeddings, attention_mask, cache, **kwargs)
        hidden_states = self.norm(hidden_states)
        if builtin:
            return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{_CACHE_FIELD: cache})
        return hidden_states
