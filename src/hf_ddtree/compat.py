"""The transformers API differences hf_ddtree tracks, in one place.

Supported: transformers 5.17 (the oldest release CI tests) through the newest release pip resolves
(CI tests both ends; see docs/design.md). What moved inside that range and how we follow it:

  * The cache argument of a model forward: `past_key_values=` up to 5.23, `cache=` from 5.24
    (`past_key_values=` still works there but warns, and is announced for removal in 5.40).
    `cache_kwargs(module, cache)` names it by reading the forward's signature, so remote-code
    models that kept the old name keep working on new releases.
  * The same rename in generate()'s model_kwargs (what a `custom_generate` callable receives) and
    in the output dataclasses' field: `cache_from_kwargs` and `CACHE_FIELD`.

Everything else that reads or calls transformers internals (cache layers, masks, generate()) goes
through the public names of both ends; when one moves, it gets a line here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import transformers
from transformers.generation.utils import GenerateDecoderOnlyOutput

TRANSFORMERS_VERSION = transformers.__version__

# the field of generate()'s output dataclasses (and of ModelOutput) that holds the cache
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput)} else "past_key_values"


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(forward) -> str:
    try:
        params = inspect.signature(forward).parameters  # follows functools.wraps (deprecate_kwarg)
    except (TypeError, ValueError):
        return CACHE_FIELD
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    return CACHE_FIELD


def cache_kwarg(module) -> str:
    """The keyword `module.forward` takes its KV cache by: "cache" (5.24+) or "past_key_values"."""
    forward = getattr(type(module), "forward", None) or module.forward
    return _cache_kwarg_of(forward)


def cache_kwargs(module, cache) -> dict:
    """`{<module's cache keyword>: cache}`, for `module(**inputs, **cache_kwargs(module, cache))`."""
    return {cache_kwarg(module): cache}


def cache_from_kwargs(kwargs: dict):
    """The cache in a model call's keyword arguments, or in the model_kwargs generate() hands a
    custom_generate callable, under either name (None when there is none)."""
    for key in ("cache", "past_key_values"):
        if kwargs.get(key) is not None:
            return kwargs[key]
    return None


# ------------------------------------------------------------------------------------------------
# Target features (the hidden states the drafter reads)
# ------------------------------------------------------------------------------------------------
# `output_hidden_states=[i, ...]` selects hidden states by index (0 = embeddings, i = decoder layer
# i - 1) with the same indexing as `output_hidden_states=True` only from 5.23 on; 5.17-5.22 take a
# list with another indexing (shifted by one, the last layer dropped), which silently fed the drafter
# the wrong layer. Before 5.23 we ask for all hidden states instead: forward hooks keep references,
# no extra compute.
try:
    from transformers.utils import output_capturing as _capturing

    LIST_HIDDEN_STATES = hasattr(_capturing, "resolve_hidden_states_indices")
except ImportError:  # pragma: no cover - very old layouts
    LIST_HIDDEN_STATES = False


def hidden_states_request(indices):
    """The `output_hidden_states=` value that makes `gather_features(out, indices)` correct."""
    if not indices:
        return None
    return list(indices) if LIST_HIDDEN_STATES else True


def gather_features(out, indices):
    """(B, T, len(indices) * H): the selected hidden states of a forward, concatenated in order.
    `indices` use `output_hidden_states=True` indexing (0 = embeddings, i = decoder layer i - 1)."""
    import torch

    return torch.cat([out.hidden_states[i] for i in indices], dim=-1)


# ------------------------------------------------------------------------------------------------
# Tensor-parallel targets (from_pretrained(tp_plan="auto") under torchrun)
# ------------------------------------------------------------------------------------------------
# Both ends keep the sharding degree in `model._tp_size` and the mesh in `model._device_mesh`; the
# mesh is 1-D over the TP ranks up to 5.2x and (pp, fsdp, tp) in 5.24. The named styles
# ("colwise", "colwise_gather_output", ...) live in `transformers.distributed.tensor_parallel`
# in both, as objects whose `output_layouts` says whether a module's output stays sharded.

def tensor_parallel_size(model) -> int:
    """How many ranks transformers sharded `model` over (1 when it is not tensor parallel)."""
    size = getattr(model, "_tp_size", None)
    return int(size) if size else 1


def tensor_parallel_process_group(model):
    """The process group of `model`'s tensor-parallel mesh dimension (None when not sharded)."""
    if tensor_parallel_size(model) <= 1:
        return None
    mesh = getattr(model, "_device_mesh", None)
    if mesh is None:
        return None
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if "tp" in names:
        return mesh.get_group("tp")
    return mesh.get_group()


def tp_style_shards_output(style: str) -> bool | None:
    """True if the named TP style leaves a module's output sharded (e.g. "colwise"), False if its
    output is whole on every rank ("colwise_gather_output", "rowwise", ...), None if unknown."""
    try:
        from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES
        from torch.distributed.tensor import Shard
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    try:
        obj = ALL_PARALLEL_STYLES[style]
    except KeyError:
        return None
    layouts = getattr(obj, "output_layouts", None)
    if layouts is None:
        return False  # styles without output layouts (replicated, all-reduce) do not shard outputs
    layouts = layouts if isinstance(layouts, (tuple, list)) else (layouts,)
    return any(isinstance(p, Shard) for p in layouts)


# ------------------------------------------------------------------------------------------------
# generate()'s compile convention (GenerationMixin._valid_auto_compile_criteria + get_compiled_call)
# ------------------------------------------------------------------------------------------------
# Both ends (5.17 and 5.24) decide alike: no compile with `disable_compile`; else compile when the
# decoding cache is compileable and not a DynamicCache (i.e. `cache_implementation="static"`), the
# device is cuda/xpu/neuron/tpu or `compile_config._compile_all_devices` is set, the quantizer (if
# any) is compileable and no part of the model is offloaded to cpu/disk. What differs is only where
# the private method looks for the cache in model_kwargs (`cache` in 5.24, `past_key_values` /
# `cache_params` before), so we mirror the rule here instead of calling the private method.
# `get_compiled_call(compile_config)` is the same in both: torch.compile(model.__call__,
# **compile_config.to_dict()), memoised on the model, defaulting to `_default_compile_config()`.
COMPILE_DEVICES = ("cuda", "xpu", "neuron", "tpu")


def compile_requested(model, generation_config, static_cache: bool) -> bool:
    """Whether stock generate() would run its decoding forward compiled with this generation_config,
    given whether its cache is static (`cache_implementation="static"`)."""
    if generation_config is None or getattr(generation_config, "disable_compile", False):
        return False
    cc = getattr(generation_config, "compile_config", None)
    device = getattr(model, "device", None)
    valid_hardware = (getattr(device, "type", None) in COMPILE_DEVICES
                      or bool(cc is not None and getattr(cc, "_compile_all_devices", None)))
    ok = valid_hardware and static_cache
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        ok = ok and bool(getattr(quantizer, "is_compileable", False))
    device_map = getattr(model, "hf_device_map", None)
    if device_map is not None:
        devices = set(device_map.values())
        ok = ok and not ("cpu" in devices and len(devices) > 1) and "disk" not in devices
    return bool(ok)


def compile_config_of(model, generation_config):
    """The CompileConfig stock generate() compiles with: the generation_config's, else the model's default."""
    cc = getattr(generation_config, "compile_config", None)
    return cc if cc is not None else model._default_compile_config()


def compiled_call(model, compile_config):
    """The target's compiled `__call__`, exactly the one stock generate() decodes with."""
    return model.get_compiled_call(compile_config)


def compiled_module_call(module, compile_config, dynamic: bool | None = None):
    """torch.compile(module.__call__) with the compile_config's options (dynamic overridden when given),
    memoised on the module per (options)."""
    import torch

    options = compile_config.to_dict()
    if dynamic is not None:
        options["dynamic"] = dynamic
    tag = repr(sorted((k, repr(v)) for k, v in options.items()))
    memo = module.__dict__.setdefault("_hf_ddtree_compiled", {})
    if tag not in memo:
        memo[tag] = torch.compile(module.__call__, **options)
    return memo[tag]
