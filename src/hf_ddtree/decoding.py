"""The decoding loop (draft -> tree -> verify -> accept -> compact) and its hook into `generate()`.

`enable(target)` replaces this instance's `generate` with a thin wrapper. When an
`assistant_model` that is a DFlash drafter comes in, the wrapper calls transformers' own
`GenerationMixin.generate` with `custom_generate=partial(speculative_decoding, ...)`, so all of
generate()'s preparation (generation config merging, max_length, logits processors and warpers,
stopping criteria, EOS, streaming the prompt) still happens, and then our loop runs.
"""

from __future__ import annotations

import functools
import numbers
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from transformers import GenerationMixin
from transformers.cache_utils import StaticCache
from transformers.generation.stopping_criteria import (EosTokenCriteria, MaxLengthCriteria, MaxTimeCriteria, StopStringCriteria,
                                                       StoppingCriteriaList)
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .cache import (CacheRows, adopt_cache, commit_linear_states, compact, compact_rows, loop_cache_kind, make_cache,
                    kept_moves, make_kv_arena, mask_layout, mask_width, move_paths, select_rows, set_lengths)
from .compat import (CACHE_FIELD, cache_from_kwargs, cache_kwargs, compile_config_of, compile_requested, compiled_call,
                     gather_features, hidden_states_request)
from .distributed import check_tensor_parallel, leader_accept, leader_tree, leader_token
from .device import host_tensor
from .drafter import DrafterSpec, is_dflash_drafter, validate_pair
from .propose import (D2SD_ALTERNATIVES, D2SD_BOUNDARIES, D2SD_MAX_BRANCHES, D2SD_METHODS, DEFAULT_MAX_TREE_BUDGET,
                      DEFAULT_TREE_BUDGET, MAX_TREE_BUDGET, METHODS, DrafterSnapshot, Proposer, Round, make_proposer)
from .tree import Tree, build_chains
from .verify import accept_on_device, accept_on_host, choose, row_processors, unpack, verify_trees


@dataclass
class DecodeStats:
    """Per-call statistics. acceptance_lengths[i] = tokens committed by round i (accepted + bonus);
    tree_sizes[i] = drafted nodes verified by round i (padding excluded). For a batch, one entry per
    (round, row still decoding), rows in batch order within a round (the output's `acceptance_lengths`
    has them per row); mean_acceptance_length is then the mean over rows and rounds.

    The *_s fields are wall seconds summed over the call, booked by the loop only and only with
    `generate(..., collect_timing=True)` (they stay 0.0 otherwise; on CUDA each lap synchronizes):
    prefill_s (prompt forward + first token), draft_s (`proposer.draft`: the drafter forwards),
    tree_s (`proposer.build` + the budget policy + padding), verify_s (target forward, processors,
    accept walk, observe hooks), commit_s (KV compaction, appending tokens, stopping criteria, streamer).
    """

    acceptance_lengths: list[int] = field(default_factory=list)
    tree_sizes: list[int] = field(default_factory=list)
    round_kinds: list[str] = field(default_factory=list)  # per round: "draft", "lookup" (no drafter) or "root"
    prefill_s: float = 0.0
    draft_s: float = 0.0
    tree_s: float = 0.0
    verify_s: float = 0.0
    commit_s: float = 0.0

    @property
    def mean_acceptance_length(self) -> float:
        a = self.acceptance_lengths
        return sum(a) / len(a) if a else 0.0


@dataclass
class DDTreeGenerateOutput(GenerateDecoderOnlyOutput):
    """`GenerateDecoderOnlyOutput` plus per-round acceptance lengths and timing."""

    acceptance_lengths: list[int] | None = None
    stats: DecodeStats | None = None


class _Clock:
    """Accumulates wall time into DecodeStats fields; syncs CUDA only when timing is requested."""

    def __init__(self, stats: DecodeStats, device: torch.device, enabled: bool):
        self.stats, self.enabled = stats, enabled
        self.cuda = enabled and device.type == "cuda"
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        if not self.enabled:
            return
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        setattr(self.stats, name, getattr(self.stats, name) + now - self.t)
        self.t = now


def _check_inputs(model, input_ids: torch.Tensor, generation_config, model_kwargs: dict, logits_processor=None,
                  streamer=None) -> None:
    """Refuse, before any forward, every generate() argument the tree loop cannot honour exactly."""
    # beams / return sequences first: generate() has already expanded the batch by them
    if getattr(generation_config, "num_beams", 1) not in (None, 1):
        raise ValueError("hf_ddtree does not combine with beam search: set num_beams=1.")
    if getattr(generation_config, "num_return_sequences", 1) not in (None, 1):
        raise ValueError("hf_ddtree returns one sequence: set num_return_sequences=1.")
    batch = input_ids.shape[0]
    embeds = model_kwargs.get("inputs_embeds")
    if embeds is None and input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids is empty (shape ({batch}, 0)): pass at least one prompt token (e.g. [[tokenizer.bos_token_id]]), "
            "or call generate() without input_ids to start from the model's bos_token_id."
        )
    if embeds is not None:
        if embeds.dim() != 3 or embeds.shape[0] != 1 or embeds.shape[1] == 0:
            raise ValueError(
                f"inputs_embeds must have shape (1, P, hidden) with P >= 1, got {tuple(embeds.shape)}: hf_ddtree takes "
                "inputs_embeds for one sequence; pass a batch as input_ids (left-padded, with attention_mask)."
            )
        if input_ids.shape[1] not in (0, embeds.shape[1]):
            raise ValueError(
                f"inputs_embeds covers {embeds.shape[1]} positions but input_ids has {input_ids.shape[1]}: pass "
                "inputs_embeds alone, or input_ids of the same length as inputs_embeds."
            )
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        if embeds is not None:
            raise ValueError("hf_ddtree does not support a padded attention_mask with inputs_embeds: pass the prompt "
                             "without padding.")
        m = mask.to(torch.long)
        if tuple(m.shape) != tuple(input_ids.shape) or not bool((m[:, 1:] >= m[:, :-1]).all()) or not bool(m[:, -1].all()):
            raise ValueError(
                "hf_ddtree needs left padding (every attention_mask row 0...0 1...1, the prompt's last token real): "
                "this batch is right-padded or has holes. Tokenize with tokenizer.padding_side = 'left' "
                "(as transformers recommends for decoder-only generation)."
            )
    if batch > 1:
        from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

        if any(isinstance(p, PrefixConstrainedLogitsProcessor) for p in (logits_processor or [])):
            raise ValueError("prefix_allowed_tokens_fn reads the batch index of each row: hf_ddtree verifies rows one "
                             "by one, so pass a batch of 1 with prefix_allowed_tokens_fn.")
        if streamer is not None:
            raise ValueError(f"a streamer takes one sequence, got a batch of {batch} (stock generate() refuses it too): "
                             "drop streamer, or call generate() once per prompt.")
    if generation_config.output_attentions or generation_config.output_hidden_states:
        raise ValueError("hf_ddtree cannot return attentions or hidden states: drop output_attentions/output_hidden_states.")
    guidance = getattr(generation_config, "guidance_scale", None)
    if guidance is not None and guidance != 1:
        raise ValueError(
            f"guidance_scale={guidance!r}: classifier-free guidance runs a second, unconditional forward per token that "
            "the tree verification cannot reproduce, so hf_ddtree would not be lossless. Drop guidance_scale (or set "
            "it to 1), or call generate() without assistant_model."
        )
    impl = getattr(model.config, "_attn_implementation", None) or ""
    if "flash" in impl or "flex" in impl:
        raise ValueError(
            f"attn_implementation={impl!r} cannot take an arbitrary tree mask (hf_ddtree verifies a whole draft "
            "tree in one forward). Use attn_implementation='sdpa' (or 'eager'): load the target with "
            "from_pretrained(..., attn_implementation='sdpa') or call target.set_attn_implementation('sdpa')."
        )


def compile_forwards(model, generation_config):
    """The CompileConfig the loop compiles its verify and drafter forwards with, or None (eager).

    The decision is stock generate()'s (`compat.compile_requested`) for the same arguments: stock
    decodes with a static cache only for `cache_implementation="static"` (the loop's default static
    cache is an internal choice and does not count), on cuda/xpu/neuron/tpu or on any device when
    `compile_config._compile_all_devices` is set, and never with `disable_compile=True`.
    """
    static = getattr(generation_config, "cache_implementation", None) == "static"
    if not compile_requested(model, generation_config, static):
        return None
    return compile_config_of(model, generation_config)


def _resolve_budget(method: str, tree_budget, block_size: int) -> int:
    """Largest number of tree nodes a round may verify (sizes the cache)."""
    return block_size - 1 if method == "dflash" else int(tree_budget)


@torch.no_grad()
def speculative_decoding(
    model,
    input_ids: torch.LongTensor,  # (B, P), left-padded when B > 1 and lengths differ
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    drafter=None,
    method: str = "ddtree",
    tree_budget: int = DEFAULT_TREE_BUDGET,
    budget_policy: Callable[[Tree], int] | None = None,
    collect_timing: bool = False,
    drafter2=None,
    d2sd_boundaries: int = D2SD_BOUNDARIES,
    d2sd_alternatives: int = D2SD_ALTERNATIVES,
    pad_tree: bool = False,
    device_round: bool | None = None,
    user_cache: bool = False,
    **model_kwargs,
):
    """The hf_ddtree loop, with the signature generate() uses for a callable `custom_generate`.

    method: "ddtree" (best-first tree of `tree_budget` nodes), "dflash" (the drafter's single
    greedy chain), "auto" (CaDDTree, best-first tree of `tree_budget` nodes cut by the policy),
    "ddtree-lookup" (the DDTree heap plus n-gram lookup continuations of the prompt and the generated
    text, one tree of `tree_budget` nodes; with `budget_policy` CaDDTree cuts the merged tree),
    "d2sd" / "d2sd-tree" (D^2SD with the variable-prefix `drafter2`: drafter 1's chain / DDTree heap
    plus re-anchored branches at the `d2sd_boundaries` likeliest rejection depths,
    `d2sd_alternatives` alternatives each).
    budget_policy: `policy(tree) -> n` (e.g. `budget.CaDDTreePolicy`), applied by the loop to the
    tree of ANY method: only its first n nodes (pop order) are verified. It must also have
    `observe(accepted: list[int])`, called once per round like the proposer's.
    collect_timing: fill the DecodeStats *_s fields (returned as `.stats` with return_dict_in_generate).
    pad_tree: pad every tree to `tree_budget` + 1 rows (fixed verify shape, e.g. for a compiled forward;
    eager gains nothing from it).
    device_round: build the tree and walk it on the device with no host read (one read per round, for
    what it commits); False: the host heap and the node-by-node walk (a few reads, free where the
    device is the host). None (default): the environment's HF_DDTREE_DEVICE_ROUND (1 / 0) if set, else
    on the device unless the target runs on the CPU, where the host way is faster (docs/benchmarks.md,
    "Host time per round"). Output is the same either way (the test suite runs the device round on
    CPU by default, tests/conftest.py).

    user_cache: the caller passed `past_key_values=` (model_kwargs' cache is theirs, not one generate() made):
    it is used, never replaced. A pre-filled one continues a conversation as stock does (its tokens a
    prefix of input_ids, only the rest is prefilled); when a previous hf_ddtree call returned it, it also
    carries the drafter's context (`_Carry`), so the drafter goes on as if it had read the whole text.

    Compiled forwards follow generate()'s own rule (`compile_forwards`): when stock generate() would
    compile its decoding forward (cache_implementation="static" on cuda/xpu/..., or any device with
    `compile_config._compile_all_devices`; never with disable_compile=True), the tree verify runs through
    the target's `get_compiled_call(compile_config)` and the drafter through torch.compile with the
    same options (dynamic shapes); pad_tree and the preallocated mask buffer are then on, so one verify
    graph serves every round. The prefill stays eager, like stock.
    """
    _check_inputs(model, input_ids, generation_config, model_kwargs, logits_processor, streamer)
    spec: DrafterSpec = validate_pair(model, drafter)
    spec2 = validate_pair(model, drafter2) if method in D2SD_METHODS else None
    device = input_ids.device
    do_sample = bool(generation_config.do_sample)
    max_length = int(generation_config.max_length)
    hidden_idx = spec.hidden_state_indices
    max_nodes = _resolve_budget(method, tree_budget, spec.block_size)
    tp = check_tensor_parallel(model, input_ids, generation_config, (drafter, drafter2), max_nodes, method)  # None unless tp_plan
    B = input_ids.shape[0]
    stopping_criteria = stopping_criteria if stopping_criteria is not None else StoppingCriteriaList()
    # Like stock: with an EOS criterion a finished row is padded with pad_token_id (and leaves the batch here); without
    # one a finished row keeps generating real tokens until every row has finished.
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    pad_id = getattr(generation_config, "_pad_token_tensor", None)
    pad_id = int(pad_id) if pad_id is not None else generation_config.pad_token_id
    if B > 1 and has_eos and pad_id is None:
        raise ValueError("a batch with an EOS stop needs pad_token_id for the rows that finish first: pass "
                         "pad_token_id=... (stock generate() needs it too).")

    stats = DecodeStats()
    clock = _Clock(stats, device, collect_timing)
    want_scores = bool(generation_config.return_dict_in_generate and generation_config.output_scores)
    want_logits = bool(generation_config.return_dict_in_generate and generation_config.output_logits)

    # inputs_embeds without input_ids: the prompt is in the cache but not in `ids` (stock returns only the new
    # tokens then); `offset` is the number of cache positions in front of ids[0]
    embeds = model_kwargs.get("inputs_embeds")
    offset = embeds.shape[1] - input_ids.shape[1] if embeds is not None else 0
    attn = model_kwargs.get("attention_mask")
    padded = attn is not None and not bool(attn.all())
    left_pad = (attn == 0).sum(-1).tolist() if padded else [0] * B  # B ints
    rows = _Rows(input_ids, max_length, stopping_criteria, has_eos, pad_id, want_scores, want_logits, streamer)
    # a cache the caller passed: used (continued when pre-filled: `held` of input_ids' tokens are in it), never replaced
    given = cache_from_kwargs(model_kwargs) if user_cache else None
    held, carry = 0, None
    if given is not None:
        held, carry = _continue_from(given, model, input_ids, embeds, padded, tp, offset + max_length + 1 + max_nodes)
    cache, proposer, layout = given, None, None
    context, context_lengths = None, [0]

    def finish():
        if streamer is not None:
            streamer.end()
        ids = rows.sequences()
        out_cache = None
        if B == 1 and cache is not None and (given is not None or generation_config.return_dict_in_generate):
            # like stock's: the K/V of every token but the last (no tree slots, no cut path), plus the drafter's context
            total = offset + ids.shape[1]
            if (layout.write_at if layout is not None else held) > total - 1:  # host ints: no read
                compact(cache, total - 1, [])
            if proposer is not None:
                _Carry.store(cache, total - 1, proposer, context, context_lengths[0], rows.tokens[0] if offset == 0 else None)
            out_cache = cache
        if not generation_config.return_dict_in_generate:
            return ids
        return DDTreeGenerateOutput(
            sequences=ids,
            scores=rows.steps(rows.scores, ids.shape[1]) if want_scores else None,
            logits=rows.steps(rows.logits, ids.shape[1]) if want_logits else None,
            **{CACHE_FIELD: out_cache},
            acceptance_lengths=list(rows.acceptance[0]) if B == 1 else [list(a) for a in rows.acceptance],
            stats=stats,
        )

    if input_ids.shape[1] >= max_length:
        return finish()

    if cache is None:
        cache = make_cache(model, loop_cache_kind(generation_config.cache_implementation), offset + max_length + 1 + max_nodes)
        cache._hf_ddtree_made = True  # returned to the caller, it may grow on the next turn (`adopt_cache`)
    compile_config = compile_forwards(model, generation_config)  # None: eager
    forward = None  # the verify forward: the target itself, or its compiled call
    if compile_config is not None:
        forward = compiled_call(model, compile_config)
        pad_tree = True  # one verify shape per budget (and the mask buffer below)

    # ---- prefill: the prompt into the cache, the first token from the target -----------------
    layout, context, context_lengths = _prefill(model, cache, input_ids, embeds, attn if padded else None, held, offset,
                                                left_pad, hidden_idx, logits_processor, do_sample, tp, rows)
    clock.lap("prefill_s")
    if compile_config is None and getattr(cache, "_hf_ddtree_made", False):
        make_kv_arena(cache)  # a cache of ours, eager: every layer's K/V in one tensor, a round's moves one op

    if device_round is None and os.environ.get("HF_DDTREE_DEVICE_ROUND"):
        device_round = os.environ["HF_DDTREE_DEVICE_ROUND"] not in ("0", "false", "False")
    on_device = device.type != "cpu" if device_round is None else bool(device_round)
    proposer = make_proposer(model, drafter, spec, method, max_nodes, drafter2=drafter2, spec2=spec2,
                             boundaries=d2sd_boundaries, alternatives=d2sd_alternatives, compile_config=compile_config,
                             on_device=on_device)
    if held:  # a continued conversation: the drafter goes on from the carried context, or starts at `held`
        pending = _Carry.resume(carry, proposer, held)
        if pending is not None:
            context = torch.cat([pending.to(context.dtype), context], dim=1)  # (1, C, F): positions [end, P)
            context_lengths = [context.shape[1]]
    # round kinds (CaDDTree over lookup, one row, not tensor-parallel): a round may verify the lookup tree or the
    # root alone, without the drafter forward, when that promises more tokens per second (`CaDDTreePolicy.plan`)
    plans = hasattr(budget_policy, "plan") and hasattr(proposer, "lookup_only") and tp is None
    # on a tensor-parallel target the leader walks, every rank takes its path
    accept = leader_accept(tp, functools.partial(accept_on_device, compile_config=compile_config) if on_device
                           else accept_on_host)
    # one processor list per row (B > 1): processors with per-row state are narrowed to their row
    procs = logits_processor if B == 1 else [row_processors(logits_processor, b) for b in range(B)]
    # compiled pieces take the tree's depth as a static argument: give them the deepest any tree of this call can
    # reach (the drafter's block; lookup continuations go deeper; D2SD branches re-anchor past the block)
    depth_bound = None
    if compile_config is not None:
        depth_bound = spec.block_size - 1
        if method == "ddtree-lookup":
            depth_bound = max(depth_bound, proposer.max_depth)
        elif method in D2SD_METHODS:
            depth_bound = max_nodes
    loop = _Decode(model, cache, layout, proposer, context, context_lengths, list(range(B)), rows, stats, clock,
                   spec=spec, max_nodes=max_nodes, budget_policy=budget_policy, device=device,
                   # with compiled forwards the round's tensor pieces compile too, fullgraph at fixed shapes
                   # (`compat.compiled_function`): the tree inputs (ancestor matrices, positions, masks) and every layer's
                   # path moves; on the device round also the tree build (beam, `make_proposer`) and the accept walk
                   plans=plans, tp=tp, pad_tree=pad_tree, compile_config=compile_config, accept_fn=accept,
                   forward=forward, procs=procs, hidden_idx=hidden_idx, do_sample=do_sample, depth_bound=depth_bound,
                   host_way=not on_device)

    while loop.retire():  # finished rows leave the cache, the drafter and the proposer; none left: done
        rnd = loop.round_inputs()  # right-aligned ids on the device, host copies of the text
        kind, trees = loop.propose(rnd)  # draft + tree (or a lookup / root-only round), cut by the policy, padded
        v = loop.verify(trees)  # ONE target forward over every row's tree, processors by depth, the accept walk
        loop.accept(v, trees, drafted=kind == "draft")  # path K/V moved on the device, the round's ONE read, commit

    cache, layout, context, context_lengths = loop.cache, loop.layout, loop.context, loop.context_lengths
    return finish()


def _prefill(model, cache, input_ids: torch.Tensor, embeds, attn, held: int, offset: int, left_pad: list[int],
             hidden_idx, logits_processor, do_sample: bool, tp, rows: _Rows):
    """The prompt into the cache and the target's first token, committed to `rows` (stock's batched processor call).
    A pre-filled cache already holds the first `held` tokens: only the rest is read, at their own positions; a
    left-padded batch (attn: its 2D mask, else None) gets stock's positions. Returns the cache layout
    (`CacheRows`: row b's live slots [pad_b, P)) and the drafter's pending context: row b's features of its real
    tokens, left-aligned (B, C, F), and the B ints C_b."""
    B, device = input_ids.shape[0], input_ids.device
    prompt = dict(inputs_embeds=embeds) if embeds is not None else dict(input_ids=input_ids[:, held:])
    P = offset + input_ids.shape[1]
    if attn is not None:  # stock's positions for a left-padded batch; its 2D mask
        position_ids = (attn.long().cumsum(-1) - 1).masked_fill(attn == 0, 1)  # (B, P)
        prompt["attention_mask"] = attn
    else:
        position_ids = torch.arange(held, P, device=device)[None].expand(B, -1)  # (B, P - held)
    out = model(
        **prompt,
        position_ids=position_ids,
        **cache_kwargs(model, cache),
        use_cache=True,
        output_hidden_states=hidden_states_request(hidden_idx),
        logits_to_keep=1,
    )
    feats = gather_features(out, hidden_idx)  # (B, P - held, F)
    context, context_lengths = _left_align([feats[b, left_pad[b]:] for b in range(B)])  # (B, C, F), C_b = P - pad_b
    raw = out.logits[:, -1].float()  # (B, V)
    scores = logits_processor(input_ids, raw.clone()) if logits_processor else raw  # stock's batched call
    if tp is None:
        first = (torch.multinomial(torch.softmax(scores, dim=-1), 1)[:, 0] if do_sample else scores.argmax(-1)).tolist()
    else:
        first = [leader_token(tp, lambda: choose(scores[b], do_sample)) for b in range(B)]
    for b in range(B):
        rows.commit(b, [first[b]], lambda j, b=b: scores[b], lambda j, b=b: raw[b])
    return CacheRows(list(left_pad), [P] * B), context, context_lengths


def _continue_from(cache, model, input_ids: torch.Tensor, embeds, padded: bool, tp, need: int):
    """Check the caller's cache against this call; returns (tokens it holds, its valid `_Carry` or None).

    As stock generate(): a pre-filled cache's tokens are the first tokens of input_ids, and only the rest
    is prefilled. A cache a previous hf_ddtree call returned remembers its tokens (`_Carry.tokens`), so
    a cache that is not a prefix of input_ids is refused; a stock cache can only be checked by length."""
    B = input_ids.shape[0]
    if B > 1:
        raise ValueError(f"past_key_values with a batch of {B}: hf_ddtree continues a caller's cache for one "
                         "sequence (batched rows leave its cache as they finish). Pass one conversation per call, or "
                         "drop past_key_values for a batch.")
    if tp is not None:
        raise ValueError("past_key_values on a tensor-parallel target: hf_ddtree builds the cache on every rank "
                         "itself there; drop past_key_values.")
    held = adopt_cache(cache, model, need, grow=getattr(cache, "_hf_ddtree_made", False))
    carry = getattr(cache, _Carry.ATTR, None)
    if not held:
        return 0, None
    if embeds is not None:
        raise ValueError("inputs_embeds with a pre-filled past_key_values: continue a conversation with input_ids "
                         "(the cache's tokens, then the new ones).")
    if padded:
        raise ValueError("a padded attention_mask with a pre-filled past_key_values: pass the conversation unpadded.")
    L = input_ids.shape[1]
    if held >= L:
        raise ValueError(
            f"past_key_values holds {held} tokens but input_ids has {L}: input_ids must be the whole conversation, "
            "the tokens the cache holds followed by at least one new token (as stock generate() takes it)."
        )
    if carry is None or carry.length != held:  # a stock cache, or one extended since hf_ddtree returned it
        return held, None
    ids = input_ids[0, :held].tolist()
    if ids != carry.tokens:
        at = next(i for i, (a, b) in enumerate(zip(ids, carry.tokens)) if a != b)
        raise ValueError(
            f"past_key_values does not match input_ids: the cache holds {held} tokens, and input_ids[0, {at}] = {ids[at]} "
            f"where the cache has {carry.tokens[at]}. Pass the conversation the cache was built on (then the new "
            "tokens), or drop past_key_values to start over."
        )
    return held, carry


@dataclass
class _Carry:
    """What a returned target cache carries for the next generate() call on the same conversation
    (`cache._hf_ddtree_carry`): the drafters' context caches (one `DrafterSnapshot` each), the target
    features of positions [end, length) the drafters have not read yet, and the cache's tokens.

    length    the target cache's length when stored (a cache extended since, e.g. by stock generate, no
              longer matches and is continued like a stock cache)
    tokens    its `length` token ids (host ints), to refuse a cache that is not a prefix of input_ids;
              None when unknown (inputs_embeds)
    snapshots one per drafter of the proposer, all ending at the same position `end`
    pending   (1, length - end, F) target features of positions [end, length)
    """

    ATTR = "_hf_ddtree_carry"
    length: int
    tokens: list[int] | None
    snapshots: list[DrafterSnapshot]
    pending: torch.Tensor

    @classmethod
    def store(cls, cache, length: int, proposer: Proposer, context: torch.Tensor, context_len: int,
              tokens: list[int] | None) -> None:
        """Attach the carry to `cache` (one row, of `length` tokens: the committed ones but the last).
        context: (1, C, F) the loop's pending features, positions [end, end + context_len)."""
        snaps = [state.snapshot() for state in proposer.states()]
        carry = None
        if snaps and tokens is not None and 0 <= length - snaps[0].end <= context_len:
            carry = cls(length, list(tokens[:length]), snaps, context[:1, :length - snaps[0].end].clone())
        setattr(cache, cls.ATTR, carry)

    @staticmethod
    def resume(carry: _Carry | None, proposer: Proposer, held: int) -> torch.Tensor | None:
        """Set the proposer's drafters to go on from `carry` (when it has a snapshot of each of them): returns
        its pending features (1, C, F), to go in front of the prefill's. Otherwise the drafters start empty
        at position `held` (they never read the cached text; drafts are weaker, output the same) and None."""
        states = proposer.states()
        by_drafter = {id(s.drafter): s for s in carry.snapshots} if carry is not None else {}
        if states and all(id(state.drafter) in by_drafter for state in states):
            for state in states:
                state.resume(by_drafter[id(state.drafter)])
            return carry.pending
        for state in states:
            state.resume(origin=held)
        return None


class _Rows:
    """The loop's per-row bookkeeping, by ORIGINAL row index b (B rows), as stock generate() holds it.

    tokens[b]: row b's committed ids (prompt padding included), host ints: the host learns them from
    the round's one read, so stopping criteria, the streamer and lookup never read the device.
    buf (B, max_length) long on the device: the same ids, row b's at [:length[b]] (what the drafter,
    the processors and the output read). end_len[b]: the length row b may reach; stopped[b]: the
    length at which a stopping criterion fired; scores / logits[b]: (1, V) per new token when asked.
    """

    def __init__(self, input_ids: torch.Tensor, max_length: int, stopping_criteria, has_eos: bool, pad_id,
                 want_scores: bool, want_logits: bool, streamer):
        B, P0 = input_ids.shape
        self.B, self.P0, self.device = B, P0, input_ids.device
        self.tokens: list[list[int]] = input_ids.tolist()
        self.length = [P0] * B
        width = max(max_length, P0)
        # on the CPU, buf shares its memory with a NumPy array: a run of host ints is written with no tensor made
        self._host_buf = (np.zeros((B, width), dtype=np.int64)
                          if self.device.type == "cpu" and input_ids.dtype == torch.long else None)
        self.buf = input_ids.new_zeros(B, width) if self._host_buf is None else torch.from_numpy(self._host_buf)
        self.buf[:, :P0] = input_ids
        self.end_len = [max_length] * B
        self.stopped: list[int | None] = [None] * B
        self.scores: list[list[torch.Tensor]] = [[] for _ in range(B)]
        self.logits: list[list[torch.Tensor]] = [[] for _ in range(B)]
        self.acceptance: list[list[int]] = [[] for _ in range(B)]
        self.criteria, self.has_eos, self.pad_id = stopping_criteria, has_eos, pad_id
        self.want_scores, self.want_logits, self.streamer = want_scores, want_logits, streamer
        self.host_stop = _host_stop(stopping_criteria)
        self._pending: list[tuple[int, int, list[int]]] = []  # (row, start, tokens) not yet in buf

    def commit(self, b: int, new_tokens: list[int], score_of, raw_of) -> int:
        """Append row b's tokens one by one, checking the stopping criteria after each exactly as stock
        does for that row (on its own (1, L) ids and its scores so far). score_of(j) / raw_of(j): the
        (V,) processed scores / raw logits of token j (device views, only taken when asked for).
        Returns the number appended."""
        seq, start, added = self.tokens[b], self.length[b], []
        for j, tok in enumerate(new_tokens):
            if len(seq) >= self.end_len[b]:
                break
            seq.append(tok)
            added.append(tok)
            if self.want_scores:
                self.scores[b].append(score_of(j)[None])
            if self.want_logits:
                self.logits[b].append(raw_of(j)[None].float())
            if self.stopped[b] is None and self._stops(b, seq):
                self.stopped[b] = len(seq)
                if self.has_eos or self.B == 1:
                    self.end_len[b] = len(seq)
                elif all(x is not None for x in self.stopped):  # the last row stopped: that is every row's length
                    self.end_len = [len(seq)] * self.B
        self.length[b] = len(seq)
        if added:
            self._pending.append((b, start, added))
            if self.streamer is not None:
                self.streamer.put(torch.tensor(added, dtype=torch.long))
        return len(added)

    def _stops(self, b: int, seq: list[int]) -> bool:
        if self.host_stop is not None:
            return self.host_stop(seq)
        # another criterion (stop strings, the user's): called per token on the row's ids, as stock does (one
        # host-to-device copy and one read per token: stock's own cost)
        ids = torch.tensor([seq], dtype=torch.long).to(self.device)
        return bool(self.criteria(ids, tuple(self.scores[b]) if self.want_scores else None).all())

    def flush(self) -> None:
        """Write the tokens committed since the last flush into `buf` (one host-to-device copy; on the CPU,
        plain writes into its memory)."""
        if not self._pending:
            return
        if self._host_buf is not None:
            for b, start, toks in self._pending:
                self._host_buf[b, start:start + len(toks)] = toks
            self._pending = []
            return
        if len(self._pending) == 1:  # one row's run of tokens (every round of one row): a slice copy
            (b, start, toks), self._pending = self._pending[0], []
            self.buf[b, start:start + len(toks)] = host_tensor(toks, self.device)
            return
        idx = [(b, start + j, t) for b, start, toks in self._pending for j, t in enumerate(toks)]
        self._pending = []
        at = host_tensor(idx, self.device).T  # (3, M): row, slot, token
        self.buf[at[0], at[1]] = at[2]

    def right_aligned(self, active: list[int]) -> torch.Tensor:
        """(len(active), L) long on the device: the rows' ids right-aligned, shorter rows left-filled."""
        self.flush()
        lengths = [self.length[b] for b in active]
        L = max(lengths)
        if len(active) == 1:
            return self.buf[active[0]:active[0] + 1, :L]
        shift = host_tensor([L - n for n in lengths], self.device)  # (B,)
        col = torch.arange(L, device=self.device)[None] - shift[:, None]  # (B, L)
        ids = self.buf[active].gather(1, col.clamp(min=0))
        return ids.masked_fill(col < 0, self.pad_id if self.pad_id is not None else 0)

    def prefixes(self, active: list[int]) -> list[torch.Tensor]:
        """Each row's (1, L_b) committed ids on the device (what the processors see)."""
        self.flush()
        return [self.buf[b:b + 1, :self.length[b]] for b in active]

    def sequences(self) -> torch.Tensor:
        """(B, width) long on the device: the output ids, finished rows padded like stock."""
        self.flush()
        if self.B == 1:
            return self.buf[:, :min(self.length[0], self.end_len[0])]
        width = max(min(n, e) for n, e in zip(self.length, self.end_len))
        ids = self.buf[:, :width].clone()
        fill = self.pad_id if self.pad_id is not None else 0
        for b in range(self.B):
            n = min(self.length[b], width)
            if n < width:
                ids[b, n:] = fill
        return ids

    def steps(self, per_row: list[list[torch.Tensor]], width: int) -> tuple:
        """Tuple over new tokens of (B, V); a finished row shows its pad as certain."""
        if self.B == 1:
            return tuple(per_row[0])
        if width == self.P0:  # nothing generated (the prompt already reached max_length)
            return ()
        V = next(t for r in per_row for t in r).shape[-1]
        pad_row = torch.full((1, V), float("-inf"), device=self.device)
        if self.pad_id is not None:
            pad_row[0, self.pad_id] = 0.0
        return tuple(torch.cat([r[t] if t < len(r) else pad_row for r in per_row]) for t in range(width - self.P0))


@dataclass
class _Decode:
    """The loop's state between rounds and its steps, each a call (`speculative_decoding` reads top to bottom):
    retire -> round_inputs -> propose (draft + tree) -> verify -> accept.

    cache / layout   the target cache and its rows' layout (`cache.CacheRows`, host ints)
    context          (B, C, F) target features the drafter has not read yet, row b's first context_lengths[b]
    active           original indices of the rows still decoding, in batch order
    rows / stats / clock  the per-row bookkeeping (`_Rows`), the call's `DecodeStats`, its timer
    The rest is fixed for the call: the drafter spec, the node budget, the budget policy (CaDDTree) and whether
    it plans round kinds, the tensor-parallel handle, padding, the compile config of the round's pieces (None: eager), the
    accept walk, the verify forward, the logits processors (one list, or one per original row), the feature
    layers, greedy / sampling and the device."""

    model: object
    cache: object
    layout: CacheRows
    proposer: Proposer
    context: torch.Tensor
    context_lengths: list[int]
    active: list[int]
    rows: _Rows
    stats: DecodeStats
    clock: _Clock
    spec: DrafterSpec = None
    max_nodes: int = 0
    budget_policy: object = None
    plans: bool = False
    tp: object = None
    pad_tree: bool = False
    compile_config: object = None
    accept_fn: Callable = None
    forward: Callable | None = None
    procs: object = None
    hidden_idx: list[int] | None = None
    do_sample: bool = False
    device: torch.device | None = None  # the input ids' device: the loop's own tensors go there
    host_way: bool = False  # the host heap and walk (the device is the host): host-decided path moves
    depth_bound: int | None = None  # compiled pieces: the deepest node any tree of the call can have (one static depth)
    mask_out: torch.Tensor | None = None  # with padding and a static cache every verify has one shape: one mask buffer
    masks_of: tuple = field(init=False)  # the target's `cache.mask_layout` (its layer types' windows), read once a call

    def __post_init__(self):
        self.masks_of = mask_layout(self.model.config)

    def retire(self) -> bool:
        """Rows that reached their end leave the cache, the drafter and the proposer; False when none is left."""
        rows = self.rows
        keep = [i for i, b in enumerate(self.active) if rows.length[b] < rows.end_len[b]]
        if not keep:
            return False
        if len(keep) < len(self.active):
            self.layout = select_rows(self.cache, keep, self.layout)
            self.proposer.select(keep)
            self.context, self.context_lengths = self.context[keep], [self.context_lengths[i] for i in keep]
            self.active = [self.active[i] for i in keep]
            self.mask_out = None
        return True

    def round_inputs(self) -> Round:
        """The proposer's view of this round (`Round`): right-aligned ids on the device, host copies of the text."""
        rows, active = self.rows, self.active
        ids = rows.right_aligned(active)  # (B, L)
        remaining = min(rows.end_len[b] - rows.length[b] for b in active)  # new tokens still allowed after the roots
        # a compiled round keeps the drafter's whole block (one shape for the tree build): nodes past max_length are
        # verified but never committed (`_Rows.commit` stops at the row's end)
        block = self.spec.block_size - 1
        depth_limit = block if self.compile_config is not None and remaining >= 2 else min(block, remaining - 1)
        return Round(ids, self.context, self.layout.positions, depth_limit, self.context_lengths,
                     max_depth=remaining - 1, host_text=[rows.tokens[b] for b in active])

    def propose(self, rnd: Round) -> tuple[str, list[Tree]]:
        """(round kind, one padded tree per row): the drafter's trees cut by the budget policy ("draft"), or without
        a drafter forward the lookup tree alone ("lookup", CaDDTree's plan) or the roots alone ("root")."""
        proposer, policy, B = self.proposer, self.budget_policy, len(self.active)
        drafted = rnd.depth_limit > 0 and self.max_nodes > 0
        kind = "draft" if drafted else "root"
        if drafted and self.plans and B == 1:  # CaDDTree may skip the drafter: lookup alone, or the root alone
            lookup = proposer.lookup_only(rnd)
            kind, n = policy.plan(lookup)
        self.stats.round_kinds.append(kind)
        if kind == "lookup":
            trees = [lookup.truncate(n)]  # the lookup candidates' best n nodes, no drafter forward
        elif kind == "root":
            trees = build_chains(rnd.roots, rnd.ids.new_empty(B, 0))  # verify the roots alone, no draft
        else:
            drafts = proposer.draft(rnd)
            self.clock.lap("draft_s")
            trees = proposer.build(rnd, drafts)
            if policy is not None:  # CaDDTree: the first n nodes (pop order), one n for the batch
                n = policy(trees[0] if B == 1 else trees)
                trees = [t.truncate(n) for t in trees]
            if self.tp is not None:
                trees = [leader_tree(self.tp, trees[0])]  # tensor parallel: every rank verifies the leader's tree
        size = self.max_nodes + 1 if self.pad_tree else max(t.size for t in trees)
        trees = [t.pad_to(size) for t in trees]
        self.clock.lap("tree_s")
        return kind, trees

    def verify(self, trees: list[Tree]):
        """`verify.verify_trees` over the rows' trees: one target forward, the processors by depth, the accept walk;
        nothing read by the host (`Verified`)."""
        model, cache, B = self.model, self.cache, len(self.active)
        size = trees[0].size
        if self.pad_tree and isinstance(cache, StaticCache) and self.mask_out is None:
            self.mask_out = torch.empty(B, 1, size, mask_width(cache, 0, size), dtype=model.dtype, device=self.device)
        procs = self.procs if self.rows.B == 1 else tuple(self.procs[b] for b in self.active)
        prefixes = self.rows.prefixes(self.active) if procs else None  # what the processors see
        v = verify_trees(model, trees, cache, self.layout, self.hidden_idx, procs, prefixes, self.do_sample,
                         self.mask_out, accept=self.accept_fn, forward=self.forward, compile_config=self.compile_config,
                         depth_bound=self.depth_bound, masks_of=self.masks_of)
        self.clock.lap("verify_s")
        return v

    def accept(self, v, trees: list[Tree], drafted: bool) -> None:
        """Keep each row's accepted path: its K/V moved on the device, then the round's ONE host read (counts and
        tokens) for the layout, the observers (proposer, CaDDTree), the drafter's next context and the commit
        (stopping criteria, streamer, output); a hybrid target's linear states become the kept path's. The host way
        (the device is the host) reads first and moves only the path entries not already in place."""
        cache, rows, stats = self.cache, self.rows, self.stats
        F = v.features.shape[-1]
        if self.host_way:  # the device is the host: its paths are host data, and only entries not in place move
            committed = unpack(v.packed_rows())  # per row (accepted count, tokens): the host walk's own lists
            counts = [c for c, _ in committed]
            keep = [path[:c + 1] for path, c in zip(v.path_rows(), counts)]
            if self.compile_config is not None and kept_moves(self.layout, keep):
                move_paths(cache, self.layout, v.paths, v.at, self.compile_config)  # one compiled call, every layer
                self.layout = set_lengths(cache, self.layout, [c + 1 for c in counts])
            else:
                self.layout = compact_rows(cache, self.layout, keep)
            # (B, m, F), m = the longest path: one row's path nodes (a slice when they are the tree's first
            # nodes, as in every root-only round), or every row's padded with its root
            if len(keep) > 1:
                new_context = v.features.gather(1, v.paths[:, :max(counts) + 1, None].expand(-1, -1, F))
            else:
                first = keep[0][-1] == len(keep[0]) - 1  # paths only go to later nodes: [0, 1, .., c]
                new_context = v.features[:, :len(keep[0])] if first else v.features[:, keep[0]]
        else:  # the moves and the gather are queued before the read: the device works while the host waits
            move_paths(cache, self.layout, v.paths, v.at, self.compile_config)
            new_context = v.features.gather(1, v.paths[..., None].expand(-1, -1, F))  # (B, P, F)
            committed = unpack(v.packed_rows())  # the host's one read: per row (accepted count, tokens)
            counts = [c for c, _ in committed]
            self.layout = set_lengths(cache, self.layout, [c + 1 for c in counts])
        self.proposer.observe(counts)
        if self.budget_policy is not None:
            self.budget_policy.observe(counts)  # CaDDTree calibrates its acceptance estimate
        if drafted:
            self.context_lengths = [c + 1 for c in counts]
            m = max(self.context_lengths)  # (B, C, F) as a base tensor (compile guards): the gather's own, else a copy
            self.context = new_context if new_context.shape[1] == m else new_context[:, :m].clone()
        else:  # the drafter did not see last round's context: keep it in front
            self.context, self.context_lengths = _left_align(
                [torch.cat([self.context[i, :self.context_lengths[i]], new_context[i, :c + 1]]) for i, c in enumerate(counts)])
        kept = []
        for i, b in enumerate(self.active):
            n = rows.commit(b, committed[i][1], lambda j, i=i: v.scores[i, v.paths[i, j]],
                            lambda j, i=i: v.raw[i, v.paths[i, j]])
            rows.acceptance[b].append(n)  # committed only: a stop (EOS) mid-path drops the rest
            stats.acceptance_lengths.append(n)
            stats.tree_sizes.append(trees[i].num_nodes)
            kept.append(max(n - 1, 0))  # the depth of the last path node the cache keeps (the committed tokens but the last)
        if v.linear_states is not None:  # hybrid target: linear-attention states become the kept path's
            commit_linear_states(cache, v.linear_states, v.paths, host_tensor(kept, self.device))
        rows.flush()
        self.clock.lap("commit_s")


def _host_stop(criteria) -> Callable[[list[int]], bool] | None:
    """The stopping criteria as a host function of a row's token list, when every criterion is one of
    stock's own that needs no device data (max length, EOS, max time); else None (they run on the
    device ids, one read per token)."""
    checks = []
    for c in criteria:
        if type(c) is MaxLengthCriteria:
            checks.append(lambda seq, n=int(c.max_length): len(seq) >= n)
        elif type(c) is EosTokenCriteria:
            eos = set(c.eos_token_id.tolist()) if isinstance(c.eos_token_id, torch.Tensor) else {int(c.eos_token_id)}
            checks.append(lambda seq, eos=eos: seq[-1] in eos)
        elif type(c) is MaxTimeCriteria:
            checks.append(lambda seq, c=c: time.time() - c.initial_timestamp > c.max_time)
        else:
            return None
    # stock: a row is done when ANY criterion says so (StoppingCriteriaList ORs them)
    return lambda seq: any(check(seq) for check in checks)


def _left_align(rows: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Ragged (C_b, F) tensors -> (B, max C_b, F) with row b in [:C_b] (zeros after), and the B ints C_b."""
    lengths = [r.shape[0] for r in rows]
    out = rows[0].new_zeros((len(rows), max(lengths), rows[0].shape[-1]))
    for b, r in enumerate(rows):
        out[b, :r.shape[0]] = r
    return out, lengths


# ------------------------------------------------------------------------------------------------
# generate() integration
# ------------------------------------------------------------------------------------------------

def _is_auto(tree_budget) -> bool:
    return isinstance(tree_budget, str) and tree_budget == "auto"


def _as_int(name: str, value, lo: int, hi: int, what: str = "") -> int:
    """`value` as a python int if it is an integral number (int, numpy integer, ...; not bool) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int in [{lo}, {hi}]{what}, got {value!r}.")
    value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value} is out of range: use {lo} <= {name} <= {hi}.")
    return value


def _resolve_method(method: str | None, tree_budget, max_tree_budget=None) -> tuple[str, int | None]:
    """(method, budget): the loop's method and its node budget (the cap under CaDDTree, None for DFlash).

    One meaning per argument (refused when they contradict, never ignored):
      * tree_budget=<int>: DDTree verifies that many nodes every round (default 64).
      * tree_budget="auto" (or method="auto"): CaDDTree picks the budget each round, capped at
        max_tree_budget (default 256). method="auto", tree_budget=<int> sets the cap to that int (then a
        different max_tree_budget is refused).
      * max_tree_budget only applies under CaDDTree; with a fixed budget or DFlash it is refused.
      * method="ddtree-lookup": the DDTree heap plus lookup continuations of the text, with an int
        tree_budget (fixed, default 64) or tree_budget="auto" (CaDDTree over the merged tree, capped
        at max_tree_budget).
    Integral numbers of any type (numpy integers, ...) are accepted and converted to int; bool is not.
    """
    auto = _is_auto(tree_budget)
    if method is None:
        method = "dflash" if tree_budget is None else ("auto" if auto else "ddtree")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}.")
    if method == "ddtree-lookup" and auto:  # CaDDTree over the merged drafter + lookup tree
        if max_tree_budget is None:
            return method, DEFAULT_MAX_TREE_BUDGET
        return method, _as_int("max_tree_budget", max_tree_budget, 1, MAX_TREE_BUDGET)
    if method == "dflash":
        if tree_budget is not None:
            raise ValueError("method='dflash' verifies the drafter's single chain: drop tree_budget, or use method='ddtree'.")
    elif method == "auto" or auto:
        if method in D2SD_METHODS:
            raise ValueError("tree_budget='auto' (CaDDTree) takes one drafter; D2SD needs an int tree_budget (e.g. 64).")
        if tree_budget is None or auto:
            if max_tree_budget is None:
                return "auto", DEFAULT_MAX_TREE_BUDGET
            return "auto", _as_int("max_tree_budget", max_tree_budget, 1, MAX_TREE_BUDGET)
        cap = _as_int("tree_budget", tree_budget, 1, MAX_TREE_BUDGET, " (method='auto': the CaDDTree cap)")
        if max_tree_budget is not None and max_tree_budget != cap:
            raise ValueError(
                f"method='auto' with tree_budget={cap} caps CaDDTree at {cap} nodes, but max_tree_budget={max_tree_budget!r} "
                "asks for another cap: pass one of them (tree_budget='auto', max_tree_budget=N is the usual form)."
            )
        return "auto", cap
    if max_tree_budget is not None:
        raise ValueError(
            f"max_tree_budget only applies to tree_budget='auto' (CaDDTree, which picks the budget each round up to "
            f"that cap); method={method!r} verifies a fixed budget. Drop max_tree_budget, or pass tree_budget='auto'."
        )
    if method == "dflash":
        return method, None
    if tree_budget is None:
        tree_budget = DEFAULT_TREE_BUDGET
    if isinstance(tree_budget, bool) or not isinstance(tree_budget, numbers.Integral):
        raise ValueError(f"tree_budget must be an int in [0, {MAX_TREE_BUDGET}] or 'auto', got {tree_budget!r}.")
    tree_budget = int(tree_budget)
    if not 0 <= tree_budget <= MAX_TREE_BUDGET:
        raise ValueError(f"tree_budget={tree_budget} is out of range: use 0 <= tree_budget <= {MAX_TREE_BUDGET} ({DEFAULT_TREE_BUDGET} is a good default).")
    return method, tree_budget


def _ddtree_generate(self, inputs=None, generation_config=None, *args, assistant_model=None, tree_budget=None,
                     method=None, max_tree_budget=None, collect_timing: bool = False, **kwargs):
    """`generate()` that understands `assistant_model=<DFlash drafter>, tree_budget=..., method=...`.

    tree_budget: int (DDTree: that many draft nodes verified per round; default 64 once a tree is asked
    for) or "auto" (CaDDTree). method: "ddtree", "dflash" (the drafter's chain; the default without
    tree_budget), "auto" (CaDDTree), "d2sd" / "d2sd-tree" (two drafters). max_tree_budget: the CaDDTree
    cap (default 256), refused with a fixed budget. See `_resolve_method` for the exact rules.
    """
    if kwargs.get("custom_generate") is not None:
        # The caller picked a recipe (e.g. custom_generate="<drafter repo>", whose generate.py comes back
        # here without custom_generate): hand it our arguments untouched instead of passing it twice.
        for key, value in (("assistant_model", assistant_model), ("tree_budget", tree_budget), ("method", method),
                           ("max_tree_budget", max_tree_budget)):
            if value is not None:
                kwargs[key] = value
        if collect_timing:
            kwargs["collect_timing"] = collect_timing
        return GenerationMixin.generate(self, inputs, generation_config, *args, **kwargs)
    if isinstance(assistant_model, (tuple, list)):
        return _d2sd_generate(self, inputs, generation_config, *args, drafters=assistant_model,
                              tree_budget=tree_budget, method=method, max_tree_budget=max_tree_budget,
                              collect_timing=collect_timing, **kwargs)
    if method in D2SD_METHODS:
        raise ValueError(f"method={method!r} needs two drafters: assistant_model=(drafter, variable_prefix_drafter).")
    if assistant_model is None or not is_dflash_drafter(assistant_model):
        if tree_budget is not None or method is not None or max_tree_budget is not None:
            what = "no assistant_model" if assistant_model is None else f"a {type(assistant_model).__name__} assistant"
            raise ValueError(
                f"tree_budget/method/max_tree_budget need a DFlash drafter as assistant_model, got {what}. Load one with "
                "AutoModel.from_pretrained('<org>/<name>-DFlash...', trust_remote_code=True), or drop tree_budget/method."
            )
        if assistant_model is not None:
            kwargs["assistant_model"] = assistant_model
        return GenerationMixin.generate(self, inputs, generation_config, *args, **kwargs)

    method, budget = _resolve_method(method, tree_budget, max_tree_budget)
    policy = None
    if method == "auto" or (method == "ddtree-lookup" and _is_auto(tree_budget)):
        from .distributed import caddtree_policy  # calibrate.caddtree_policy; one decision on tensor-parallel targets

        # calibrated on the calls the loop will make: compiled (padded) forwards when generate()'s criteria say so
        requested = _requested_config(self, generation_config, kwargs)
        compile_config = compile_forwards(self, requested)
        policy = caddtree_policy(self, assistant_model, max_nodes=budget, compile_config=compile_config,
                                 cache_implementation=getattr(requested, "cache_implementation", None))

    return _run(self, inputs, generation_config, args, kwargs, drafter=assistant_model, method=method,
                tree_budget=budget, budget_policy=policy, collect_timing=collect_timing)


def _requested_config(model, generation_config, kwargs):
    """The compile-relevant fields (cache_implementation, compile_config, disable_compile) of the generation
    config generate() will build from `generation_config` (or the model's) and the call's kwargs."""
    from types import SimpleNamespace

    base = generation_config if generation_config is not None else model.generation_config
    fields = {k: kwargs.get(k, getattr(base, k, None)) for k in ("cache_implementation", "compile_config", "disable_compile")}
    return SimpleNamespace(**fields)


def _d2sd_generate(self, inputs, generation_config, *args, drafters, tree_budget, method, collect_timing,
                   max_tree_budget=None, d2sd_boundaries: int = D2SD_BOUNDARIES,
                   d2sd_alternatives: int = D2SD_ALTERNATIVES, **kwargs):
    if len(drafters) != 2 or not all(is_dflash_drafter(d) for d in drafters):
        raise ValueError("D2SD takes assistant_model=(drafter, variable_prefix_drafter): two DFlash drafters.")
    method = method or "d2sd"
    if method not in D2SD_METHODS:
        raise ValueError(f"two drafters run D2SD: method must be one of {D2SD_METHODS}, got {method!r}.")
    if _is_auto(tree_budget):
        raise ValueError("tree_budget='auto' (CaDDTree) is not wired to D2SD in generate() yet (the loop can apply "
                         "a budget policy to D2SD trees, but its calibration needs both drafters): pass an int "
                         f"tree_budget (e.g. {DEFAULT_TREE_BUDGET}).")
    _, budget = _resolve_method(method, tree_budget, max_tree_budget)
    d2sd_boundaries = _as_int("d2sd_boundaries", d2sd_boundaries, 1, D2SD_MAX_BRANCHES)
    d2sd_alternatives = _as_int("d2sd_alternatives", d2sd_alternatives, 1, D2SD_MAX_BRANCHES)
    return _run(self, inputs, generation_config, args, kwargs, drafter=drafters[0], drafter2=drafters[1],
                method=method, tree_budget=budget, collect_timing=collect_timing,
                d2sd_boundaries=d2sd_boundaries, d2sd_alternatives=d2sd_alternatives)


def _run(self, inputs, generation_config, args, kwargs, **loop_kwargs):
    """GenerationMixin.generate with our loop as the callable custom_generate.

    Stop strings are turned into a StopStringCriteria here: generate() drops `tokenizer` when
    custom_generate is a callable, so it could not build one itself. They come, like in stock
    generate(), from the `stop_strings=` argument, else the `generation_config=` argument, else the
    model's own generation_config; the copy generate() sees has none left.
    """
    tokenizer = kwargs.pop("tokenizer", None)
    explicit = "stop_strings" in kwargs  # stop_strings=None given explicitly switches the model's off, like stock
    stop_strings = kwargs.pop("stop_strings", None)
    config_stop_strings = getattr(generation_config, "stop_strings", None) if generation_config is not None else None
    model_stop_strings = getattr(getattr(self, "generation_config", None), "stop_strings", None)
    if not explicit:
        stop_strings = config_stop_strings if config_stop_strings is not None else model_stop_strings
    if stop_strings is not None:
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: pass generate(..., tokenizer=tokenizer).")
        extra = StoppingCriteriaList([StopStringCriteria(tokenizer, stop_strings)])
        user = kwargs.pop("stopping_criteria", None)
        kwargs["stopping_criteria"] = StoppingCriteriaList(list(user or []) + list(extra))
    if config_stop_strings is not None:
        generation_config = generation_config.__class__.from_dict({**generation_config.to_dict(), "stop_strings": None})
    if model_stop_strings is not None:  # else generate() fills the model's back in as a default
        kwargs["stop_strings"] = None

    if "device_round" in kwargs:  # the loop's own switch (see speculative_decoding), not a generation argument
        loop_kwargs["device_round"] = kwargs.pop("device_round")
    loop_kwargs["user_cache"] = cache_from_kwargs(kwargs) is not None  # the caller's cache, not one generate() makes
    fn = functools.partial(speculative_decoding, streamer=kwargs.get("streamer"), **loop_kwargs)
    return GenerationMixin.generate(self, inputs, generation_config, *args, custom_generate=fn, **kwargs)


def enable(model):
    """Make `model.generate(..., assistant_model=<DFlash drafter>, tree_budget=...)` run hf_ddtree.

    Per instance: the class and `save_pretrained` output stay untouched. Returns the model.
    """
    if not isinstance(model, GenerationMixin):
        raise TypeError(f"{type(model).__name__} is not a transformers generation model.")
    model.generate = _ddtree_generate.__get__(model)
    model._hf_ddtree_enabled = True
    return model


def disable(model):
    """Undo `enable`."""
    if "generate" in vars(model):
        del model.generate
    model.__dict__.pop("_hf_ddtree_enabled", None)
    return model


def is_enabled(model) -> bool:
    """Whether `enable(model)` is in effect on this instance."""
    return bool(getattr(model, "_hf_ddtree_enabled", False))


def generate(model, input_ids, drafter, **kwargs):
    """Functional form: `hf_ddtree.generate(target, ids, drafter, tree_budget=64, max_new_tokens=...)`."""
    return _ddtree_generate(model, input_ids, assistant_model=drafter, **kwargs)
