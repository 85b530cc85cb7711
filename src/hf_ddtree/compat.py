"""The transformers API differences hf_ddtree tracks, in one place.

Supported: transformers 5.17 (the oldest release CI tests) through the newest release pip resolves
(CI tests both ends; see docs/design.md). What moved inside that range and how we follow it:

  * The cache argument of a model forward: `past_key_values=` up to 5.23, `cache=` from 5.24
    (`past_key_values=` still works there but warns, and is announced for removal in 5.40).
    `cache_kwargs(module, cache)` names it by reading the forward's signature, so remote-code
    models that kept the old name keep working on new releases.
  * The same rename in generate()'s model_kwargs (what a `custom_generate` callable receives) and
    in the output dataclasses' field: `cache_from_kwargs` and `CACHE_FIELD`.

  * Linear-attention cache layers (`LinearAttentionLayer`) count their tokens from 5.25
    (`cumulative_length_linear`, which `Cache.get_seq_length()` reads when layer 0 is one) and can record
    state history for rollback; `cache._set_length` keeps the count, hf_ddtree never needs the history.

Everything else that reads or calls transformers internals (cache layers, masks, generate()) goes
through the public names of both ends; when one moves, it gets a line here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import torch
import torch.nn.functional as F
import transformers
from transformers.activations import ACT2FN
from transformers.generation.utils import GenerateDecoderOnlyOutput

from . import linear_attention as la

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


def compiled_function(fn, compile_config):
    """`fn` compiled for the round: torch.compile(fn, fullgraph=True, dynamic=False) with compile_config's backend
    and inductor options, memoised per (fn, compile_config); `fn` itself when compile_config is None (eager).

    For the pure tensor pieces of a round (tree build, tree inputs, accept walk, path moves): fixed shapes
    (padded trees, a static cache) and no host read inside, so one graph each serves every round, and
    fullgraph=True makes a graph break an error rather than a silent host round trip. mode is left at
    inductor's default ("reduce-overhead" would add CUDA graphs on a GPU: not yet run on one, docs/design.md)."""
    if compile_config is None:
        return fn
    key = (fn, id(compile_config))
    hit = _COMPILED_FUNCTIONS.get(key)
    if hit is not None and hit[0] is compile_config:
        return hit[1]
    import torch

    options = compile_config.to_dict()
    kwargs = dict(fullgraph=True, dynamic=False, backend=options.get("backend", "inductor"))
    if options.get("options"):
        kwargs["options"] = options["options"]
    compiled = torch.compile(fn, **kwargs)
    _COMPILED_FUNCTIONS[key] = (compile_config, compiled)  # the config kept alive: its id stays its own
    return compiled


_COMPILED_FUNCTIONS: dict = {}


# ------------------------------------------------------------------------------------------------
# Linear-attention (Gated DeltaNet) layers of hybrid targets: Qwen3-Next, Qwen3.5 / 3.6 (dense, MoE)
# ------------------------------------------------------------------------------------------------
# Both ends keep a Gated DeltaNet layer's states in the cache's `LinearAttentionLayer`
# (`conv_states[0]` (B, C, K): the last K pre-conv inputs; `recurrent_states[0]` (B, Hv, Dk, Dv)), and
# the layer's module (`<Family>GatedDeltaNet`, the decoder layer's `linear_attn`, `layer_idx` set) takes
# its cache as `cache=` (5.24) or `cache_params=` (5.17) and its mask as `attention_mask=` (None for a
# tree: the model forwards `attention_mask["linear_attention"]`). Two projection layouts exist:
# Qwen3-Next's fused `in_proj_qkvz` / `in_proj_ba` (split by the module's own
# `fix_query_key_value_ordering`) and Qwen3.5's `in_proj_qkv` / `in_proj_z` / `in_proj_b` / `in_proj_a`.
# During a tree verify the modules run `_gdn_tree_forward` instead of their own forward (the same
# parameters, the tree's conv windows and recurrence: `linear_attention.py`); tests/test_hybrid.py
# checks it against the module's own forward on a chain at both ends.
LINEAR_ATTENTION = "linear_attention"


def _gdn_layout(module) -> str | None:
    if all(hasattr(module, n) for n in ("in_proj_qkvz", "in_proj_ba", "fix_query_key_value_ordering")):
        return "qwen3_next"
    if all(hasattr(module, n) for n in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")):
        return "qwen3_5"
    return None


def linear_attention_modules(model) -> list:
    """The target's Gated DeltaNet modules, in layer order (empty for a target without linear attention;
    memoised on the model). Raises ValueError for a linear-attention layer whose module hf_ddtree does not know."""
    memo = model.__dict__.get("_hf_ddtree_gdn")
    if memo is None:
        memo = model.__dict__["_hf_ddtree_gdn"] = _find_linear_attention(model)
    return memo


def _find_linear_attention(model) -> list:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    types = list(getattr(config, "layer_types", None) or ())
    if LINEAR_ATTENTION not in types:
        return []
    found = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and idx < len(types) and types[idx] == LINEAR_ATTENTION and hasattr(module, "conv1d"):
            found[idx] = module
    want = [i for i, t in enumerate(types) if t == LINEAR_ATTENTION]
    bad = sorted({type(m).__name__ for m in found.values() if _gdn_layout(m) is None})
    if bad or sorted(found) != want:
        raise ValueError(
            f"this target's linear_attention layers ({'modules ' + ', '.join(bad) if bad else f'{len(found)} of {len(want)} found'}) "
            "are not Gated DeltaNet layers hf_ddtree knows (Qwen3-Next's or Qwen3.5's); only those can be verified as a tree."
        )
    return [found[i] for i in want]


def linear_states(cache, layer_idx: int):
    """(conv state (B, C, K), recurrent state (B, H, Dk, Dv)) of a linear-attention layer of `cache`."""
    layer = cache.layers[layer_idx]
    return layer.conv_states[0], layer.recurrent_states[0]


def _gdn_inputs(m, h):
    """A Gated DeltaNet module's input projections of hidden states h (B, N, hidden):
    pre-conv qkv (B, C, N), z (B, N, Hv, Dv), b and a (B, N, Hv)."""
    B, N, _ = h.shape
    if _gdn_layout(m) == "qwen3_next":
        q, k, v, z, b, a = m.fix_query_key_value_ordering(m.in_proj_qkvz(h), m.in_proj_ba(h))
        mixed = torch.cat([x.reshape(B, N, -1) for x in (q, k, v)], dim=-1)
    else:
        mixed = m.in_proj_qkv(h)
        z = m.in_proj_z(h).reshape(B, N, -1, m.head_v_dim)
        b, a = m.in_proj_b(h), m.in_proj_a(h)
    return mixed.transpose(1, 2), z, b, a


def _gdn_tree_forward(m, ctx, hidden_states, cache=None, cache_params=None, attention_mask=None, **kwargs):
    """The tree forward of Gated DeltaNet module `m` (what `tree_linear_attention` installs): each node's
    conv window and recurrence along its own path, the cache's states read, not written (the loop
    commits the accepted path's: `cache.commit_linear_states`). Records the layer in `ctx.layers`."""
    cache = cache if cache is not None else cache_params
    h = hidden_states  # (B, N, hidden)
    B, N, _ = h.shape
    conv_state, state = linear_states(cache, m.layer_idx)
    mixed, z, b, a = _gdn_inputs(m, h)  # (B, C, N), ...
    conv = la.tree_causal_conv(mixed, conv_state, ctx.ancestors, ctx.depths, m.conv1d.weight.squeeze(1),
                               m.conv1d.bias, ACT2FN[m.activation])
    q, k, v = torch.split(conv.transpose(1, 2), [m.key_dim, m.key_dim, m.value_dim], dim=-1)
    q = q.reshape(B, N, -1, m.head_k_dim)
    k = k.reshape(B, N, -1, m.head_k_dim)
    v = v.reshape(B, N, -1, m.head_v_dim)
    beta = b.sigmoid()
    g = -m.A_log.float().exp() * F.softplus(a.float() + m.dt_bias)  # (B, N, Hv)
    rep = m.num_v_heads // m.num_k_heads
    if rep > 1:
        q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
    q = la.l2norm(q.float()) / (m.head_k_dim ** 0.5)
    k = la.l2norm(k.float())
    o, (kk, u, gsum) = la.tree_gated_delta_rule(q, k, v, g, beta, state, ctx.visibility)
    ctx.layers[m.layer_idx] = la.TreeRecurrence(kk, u, gsum, mixed)
    core = m.norm(o.to(h.dtype).reshape(-1, m.head_v_dim), z.reshape(-1, m.head_v_dim))
    return m.out_proj(core.reshape(B, N, -1))


class tree_linear_attention:
    """`with tree_linear_attention(modules, ctx):` the target's Gated DeltaNet modules run their tree
    forward (`_gdn_tree_forward`, recording into ctx: a `linear_attention.TreeStates`) inside the block,
    their own forward again after it (nothing happens for an empty list)."""

    def __init__(self, modules, ctx):
        self.modules, self.ctx, self.saved = modules, ctx, []

    def __enter__(self):
        for m in self.modules:
            self.saved.append(m.__dict__.get("forward"))
            m.forward = functools.partial(_gdn_tree_forward, m, self.ctx)
        return self.ctx

    def __exit__(self, *exc):
        for m, old in zip(self.modules, self.saved):
            if old is None:
                del m.forward
            else:
                m.forward = old
        self.saved = []
        return False
