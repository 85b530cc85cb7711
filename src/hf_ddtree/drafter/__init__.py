"""DFlash drafters: the model, how to read its spec from any checkpoint, and pair validation."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import Qwen3Config

from .modeling_dflash import DFlashDraftModel, default_target_layer_ids, dflash_field

__all__ = [
    "DFlashDraftModel",
    "DrafterSpec",
    "default_target_layer_ids",
    "dflash_field",
    "drafter_spec",
    "is_dflash_drafter",
    "make_drafter_config",
    "special_token_ids",
    "validate_d2sd_pair",
    "validate_pair",
]


@dataclass(frozen=True)
class DrafterSpec:
    block_size: int
    mask_token_id: int
    target_layer_ids: tuple[int, ...]

    @property
    def hidden_state_indices(self) -> list[int]:
        """Indices into `output.hidden_states` (index 0 is the embedding output)."""
        return [i + 1 for i in self.target_layer_ids]


def is_dflash_drafter(model) -> bool:
    """True for our `DFlashDraftModel`, z-lab's remote-code class, or any model whose config carries DFlash fields."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    if isinstance(getattr(config, "dflash_config", None), dict):
        return True
    return getattr(config, "block_size", None) is not None and (
        getattr(config, "target_layer_ids", None) is not None or getattr(model, "target_layer_ids", None) is not None
    )


def drafter_spec(drafter) -> DrafterSpec:
    """Read block size, mask token and target layers from a drafter (model attributes first, then config)."""
    if not is_dflash_drafter(drafter):
        raise ValueError(
            f"{type(drafter).__name__} is not a DFlash drafter: its config has neither `dflash_config` nor "
            "`block_size`/`target_layer_ids`. Pass a DFlash drafter (e.g. AutoModel.from_pretrained("
            "'z-lab/Qwen3-8B-DFlash-b16', trust_remote_code=True)), or drop `tree_budget`/`method` to use "
            "transformers' own assisted decoding with a regular draft model."
        )
    config = drafter.config
    block_size = getattr(drafter, "block_size", None) or dflash_field(config, "block_size")
    mask = getattr(drafter, "mask_token_id", None)
    if mask is None:
        mask = dflash_field(config, "mask_token_id")
    layers = getattr(drafter, "target_layer_ids", None)
    if layers is None:
        layers = dflash_field(config, "target_layer_ids", None)
    if layers is None:
        layers = default_target_layer_ids(int(dflash_field(config, "num_target_layers")), config.num_hidden_layers)
    spec = DrafterSpec(int(block_size), int(mask), tuple(int(i) for i in layers))
    if spec.block_size < 2:
        raise ValueError(f"DFlash block_size must be >= 2 (got {spec.block_size}): fix the drafter's config.json.")
    return spec


def _target_hidden_size(target) -> int:
    return target.get_input_embeddings().weight.shape[1]


def validate_pair(target, drafter) -> DrafterSpec:
    """Check that `drafter` can draft for `target`; raise ValueError naming the mismatch and the fix."""
    spec = drafter_spec(drafter)
    archs = getattr(drafter.config, "architectures", None) or []
    if archs and type(drafter).__name__ not in archs and getattr(drafter, "fc", None) is None:
        raise ValueError(
            f"The drafter was loaded as {type(drafter).__name__}, not as its checkpoint's {archs[0]}: a DFlash "
            "checkpoint's model class is remote code. Load it with AutoModel.from_pretrained(..., "
            "trust_remote_code=True) (or hf_ddtree.hub.load_drafter)."
        )
    tcfg = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    n_layers = tcfg.num_hidden_layers
    bad = [i for i in spec.target_layer_ids if not 0 <= i < n_layers]
    if bad:
        raise ValueError(
            f"Drafter reads target layers {list(spec.target_layer_ids)} but the target has {n_layers} layers "
            f"(out of range: {bad}). This drafter was trained for a different target; load the drafter that "
            "matches your target model."
        )
    hidden = _target_hidden_size(target)
    d_hidden = drafter.config.hidden_size
    if d_hidden != hidden:
        raise ValueError(
            f"Drafter hidden_size {d_hidden} != target hidden size {hidden}. The drafter shares the target's "
            "embed_tokens and lm_head, so both must match: use the drafter trained for this target."
        )
    fc = getattr(drafter, "fc", None)
    if fc is not None and fc.in_features != len(spec.target_layer_ids) * hidden:
        raise ValueError(
            f"Drafter fc expects {fc.in_features} input features but the target gives "
            f"{len(spec.target_layer_ids)} layers x {hidden} = {len(spec.target_layer_ids) * hidden}: "
            "the drafter does not belong to this target."
        )
    vocab = target.get_input_embeddings().weight.shape[0]
    if not 0 <= spec.mask_token_id < vocab:
        raise ValueError(
            f"Drafter mask_token_id {spec.mask_token_id} is outside the target vocabulary ({vocab} rows). "
            "Use the drafter trained for this target, or resize the target's embeddings the way the drafter "
            "expects (e.g. after tokenizer.add_special_tokens({'mask_token': ...}))."
        )
    d_vocab = getattr(drafter.config, "vocab_size", None)
    if d_vocab is not None and d_vocab != vocab and d_vocab != getattr(tcfg, "vocab_size", vocab):
        raise ValueError(
            f"Drafter vocab_size {d_vocab} != target vocabulary {vocab}: the drafter was trained for another "
            "tokenizer. Use the drafter that matches your target."
        )
    shortlist = getattr(drafter, "draft_vocab_ids", None)
    if shortlist is not None:
        from .vocab import check_draft_vocab

        check_draft_vocab(shortlist, target.get_output_embeddings().weight.shape[0],
                          what="the drafter's draft vocabulary (drafter.draft_vocab_ids)")
    return spec


def _full_attention_rope(rope: dict | None) -> dict | None:
    """The rope parameters a full-attention drafter uses. Targets like Gemma 3 store them per layer
    type ({"full_attention": {...}, "sliding_attention": {...}}): take the full-attention ones (the
    drafter is a Qwen3-style full-attention model), else those of the first layer type."""
    if rope and all(isinstance(v, dict) for v in rope.values()):
        return rope.get("full_attention") or next(iter(rope.values()))
    return rope


def validate_d2sd_pair(spec1: DrafterSpec, spec2: DrafterSpec) -> None:
    """D2SD needs drafter 2 (variable prefix) to read drafter 1's target layers with a block at least
    as long. ValueError otherwise."""
    if tuple(spec1.target_layer_ids) != tuple(spec2.target_layer_ids):
        raise ValueError(
            f"D2SD drafters must read the same target layers: drafter 1 uses {list(spec1.target_layer_ids)}, "
            f"drafter 2 uses {list(spec2.target_layer_ids)}. Train the variable-prefix drafter with the "
            "same --target-layer-ids."
        )
    if spec2.block_size < spec1.block_size:
        raise ValueError(f"D2SD: the variable-prefix drafter's block_size {spec2.block_size} must be >= "
                         f"drafter 1's {spec1.block_size}.")


SPECIAL_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def special_token_ids(target_config) -> dict:
    """{bos/eos/pad_token_id: the target's value} from its (text) config: what a drafter config carries so
    that `pipeline(..., assistant_model=drafter)` sees one tokenizer for both models."""
    tcfg = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
    return {name: getattr(tcfg, name, None) for name in SPECIAL_TOKEN_FIELDS}


def make_drafter_config(
    target_config,
    *,
    num_hidden_layers: int = 1,
    block_size: int = 16,
    mask_token_id: int,
    target_layer_ids: list[int] | None = None,
    intermediate_size: int | None = None,
    **overrides,
) -> Qwen3Config:
    """A z-lab-format drafter config (Qwen3Config + DFlash fields) sized for `target_config`."""
    tcfg = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
    n_target = tcfg.num_hidden_layers
    if target_layer_ids is None:
        target_layer_ids = default_target_layer_ids(n_target, num_hidden_layers)
    heads = tcfg.num_attention_heads
    head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // heads
    rope = _full_attention_rope(getattr(tcfg, "rope_parameters", None)) or {"rope_type": "default", "rope_theta": 10000.0}
    kwargs = dict(
        vocab_size=tcfg.vocab_size,
        hidden_size=tcfg.hidden_size,
        intermediate_size=intermediate_size or tcfg.intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(tcfg, "num_key_value_heads", heads),
        head_dim=head_dim,
        rms_norm_eps=getattr(tcfg, "rms_norm_eps", 1e-6),
        max_position_embeddings=tcfg.max_position_embeddings,
        rope_parameters=dict(rope),
        tie_word_embeddings=False,
        attention_bias=False,
        use_cache=False,
        # the target's special ids: transformers' pipelines compare them (and vocab_size) to decide whether the
        # assistant shares the target's tokenizer; the drafter reads none of them itself
        **special_token_ids(tcfg),
    )
    kwargs.update(overrides)
    config = Qwen3Config(**kwargs)
    config.architectures = ["DFlashDraftModel"]
    config.block_size = int(block_size)
    config.num_target_layers = n_target
    config.dflash_config = {"mask_token_id": int(mask_token_id), "target_layer_ids": [int(i) for i in target_layer_ids]}
    # the same fields at the top level: transformers' built-in DFlash (speculation_type="dflash") reads them there
    config.mask_token_id = int(mask_token_id)
    config.target_layer_ids = [int(i) for i in target_layer_ids]
    return config
