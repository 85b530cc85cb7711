"""The decoding loop (draft -> tree -> verify -> accept -> compact) and its hook into `generate()`.

`enable(target)` replaces this instance's `generate` with a thin wrapper. When an
`assistant_model` that is a DFlash drafter comes in, the wrapper calls transformers' own
`GenerationMixin.generate` with `custom_generate=partial(speculative_decoding, ...)`, so all of
generate()'s preparation (generation config merging, max_length, logits processors and warpers,
stopping criteria, EOS, streaming the prompt) still happens, and then our loop runs.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import GenerationMixin
from transformers.generation.stopping_criteria import StopStringCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .cache import compact, make_cache
from .compat import CACHE_FIELD, cache_from_kwargs, cache_kwargs, gather_features, hidden_states_request
from .drafter import DrafterSpec, is_dflash_drafter, validate_pair
from .propose import make_proposer
from .tree import Tree, build_chain
from .verify import process_scores, run_tree, walk

MAX_TREE_BUDGET = 4096
METHODS = ("ddtree", "dflash", "auto", "ddtree-lookup", "d2sd", "d2sd-tree")
D2SD_METHODS = ("d2sd", "d2sd-tree")


@dataclass
class DecodeStats:
    """Per-call statistics. acceptance_lengths[i] = tokens committed by round i (accepted + bonus)."""

    acceptance_lengths: list[int] = field(default_factory=list)
    tree_sizes: list[int] = field(default_factory=list)
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


def _check_inputs(model, input_ids: torch.Tensor, generation_config, model_kwargs: dict) -> None:
    # beams / return sequences first: generate() has already expanded the batch by them
    if getattr(generation_config, "num_beams", 1) not in (None, 1):
        raise ValueError("hf_ddtree does not combine with beam search: set num_beams=1.")
    if getattr(generation_config, "num_return_sequences", 1) not in (None, 1):
        raise ValueError("hf_ddtree returns one sequence: set num_return_sequences=1.")
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"hf_ddtree decodes one sequence at a time, got batch size {input_ids.shape[0]}. "
            "Call generate() once per prompt (batching is not implemented yet)."
        )
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError("hf_ddtree does not support padded inputs: pass the prompt without padding.")
    if generation_config.output_attentions or generation_config.output_hidden_states:
        raise ValueError("hf_ddtree cannot return attentions or hidden states: drop output_attentions/output_hidden_states.")
    impl = getattr(model.config, "_attn_implementation", None) or ""
    if "flash" in impl:
        raise ValueError(
            f"attn_implementation={impl!r} cannot take an arbitrary tree mask; load the target with "
            "attn_implementation='sdpa' (or 'eager')."
        )
    past = cache_from_kwargs(model_kwargs)
    if past is not None and int(past.get_seq_length()) > 0:
        raise ValueError("hf_ddtree builds its own KV cache: do not pass a pre-filled past_key_values.")


def _pick(scores_row: torch.Tensor, do_sample: bool) -> int:
    if do_sample:
        return int(torch.multinomial(torch.softmax(scores_row, dim=-1), 1))
    return int(torch.argmax(scores_row))


def _resolve_budget(method: str, tree_budget, block_size: int) -> int:
    """Largest number of tree nodes a round may verify (sizes the cache)."""
    return block_size - 1 if method == "dflash" else int(tree_budget)


@torch.no_grad()
def speculative_decoding(
    model,
    input_ids: torch.LongTensor,  # (1, P)
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    drafter=None,
    method: str = "ddtree",
    tree_budget: int = 64,
    budget_policy: Callable[[Tree], int] | None = None,
    collect_timing: bool = False,
    drafter2=None,
    d2sd_boundaries: int = 4,
    d2sd_alternatives: int = 1,
    **model_kwargs,
):
    """The hf_ddtree loop, with the signature generate() uses for a callable `custom_generate`.

    method: "ddtree" (best-first tree of `tree_budget` nodes), "dflash" (the drafter's single
    greedy chain), "auto" (CaDDTree: `budget_policy(tree)` picks how many of the tree's nodes, in
    pop order, to verify this round; `tree_budget` is the cap), "ddtree-lookup" (the DDTree heap plus
    n-gram lookup continuations of the prompt and the generated text, in one tree of `tree_budget`
    nodes; with `budget_policy` CaDDTree cuts that tree), "d2sd" / "d2sd-tree" (D^2SD with
    the variable-prefix `drafter2`: drafter 1's chain / DDTree heap plus re-anchored branches at the
    `d2sd_boundaries` likeliest rejection depths, `d2sd_alternatives` alternatives each).
    """
    _check_inputs(model, input_ids, generation_config, model_kwargs)
    spec: DrafterSpec = validate_pair(model, drafter)
    spec2 = validate_pair(model, drafter2) if method in D2SD_METHODS else None
    device = input_ids.device
    do_sample = bool(generation_config.do_sample)
    max_length = int(generation_config.max_length)
    hidden_idx = spec.hidden_state_indices
    max_nodes = _resolve_budget(method, tree_budget, spec.block_size)

    stats = DecodeStats()
    clock = _Clock(stats, device, collect_timing)
    scores_out: list[torch.Tensor] = []
    logits_out: list[torch.Tensor] = []
    want_scores = bool(generation_config.return_dict_in_generate and generation_config.output_scores)
    want_logits = bool(generation_config.return_dict_in_generate and generation_config.output_logits)

    def finish(ids: torch.Tensor):
        if streamer is not None:
            streamer.end()
        if generation_config.return_dict_in_generate:
            return DDTreeGenerateOutput(
                sequences=ids,
                scores=tuple(scores_out) if want_scores else None,
                logits=tuple(logits_out) if want_logits else None,
                **{CACHE_FIELD: None},
                acceptance_lengths=list(stats.acceptance_lengths),
                stats=stats,
            )
        return ids

    def commit(ids: torch.Tensor, new_tokens: list[int], rows: list[int], scores, raw) -> tuple[torch.Tensor, bool]:
        """Append tokens one by one, checking stopping criteria after each (exactly like stock)."""
        done = False
        added = []
        for j, tok in enumerate(new_tokens):
            ids = torch.cat([ids, ids.new_tensor([[tok]])], dim=-1)
            added.append(tok)
            if want_scores:
                scores_out.append(scores[rows[j]][None])
            if want_logits:
                logits_out.append(raw[rows[j]][None].float())
            if bool(stopping_criteria(ids, None).all()):
                done = True
                break
        if streamer is not None and added:
            streamer.put(torch.tensor(added, dtype=torch.long))
        return ids, done

    if input_ids.shape[1] >= max_length:
        return finish(input_ids)

    cache = make_cache(model, generation_config.cache_implementation or "static", max_length + 1 + max_nodes)

    # ---- prefill: the prompt into the cache, the first token from the target -----------------
    P = input_ids.shape[1]
    out = model(
        input_ids=input_ids,
        position_ids=torch.arange(P, device=device)[None],
        **cache_kwargs(model, cache),
        use_cache=True,
        output_hidden_states=hidden_states_request(hidden_idx),
        logits_to_keep=1,
    )
    context = gather_features(out, hidden_idx)[0]  # (P, F) pending drafter context
    raw = out.logits[0, -1:].float()  # (1, V)
    scores = logits_processor(input_ids, raw.clone()) if logits_processor else raw
    ids, done = commit(input_ids, [_pick(scores[0], do_sample)], [0], scores, raw)
    clock.lap("prefill_s")

    proposer = make_proposer(model, drafter, spec, method, max_nodes, budget_policy, clock.lap,
                             drafter2=drafter2, spec2=spec2, boundaries=d2sd_boundaries,
                             alternatives=d2sd_alternatives)

    observe_acceptance = getattr(budget_policy, "observe_acceptance", None)
    while not done:
        L = ids.shape[1]
        past = L - 1  # the root (last token) is not in the target cache yet
        remaining = max_length - L  # new tokens still allowed after the root
        depth_limit = min(spec.block_size - 1, remaining - 1)
        root = int(ids[0, -1])

        # ---- draft + tree: one drafter forward, best-first heap (or chain) -> Tree (n+1 nodes) ----
        if depth_limit <= 0:
            tree = build_chain(root, ids.new_empty(0))  # last token: verify the root alone
        else:
            tree = proposer.propose(root, context, past, depth_limit, ids=ids)  # books draft_s and tree_s
        clock.lap("tree_s")

        # ---- verify: one target forward over root + nodes, ancestor-only mask ------------------
        raw, feats = run_tree(model, tree, cache, past, hidden_idx)  # (n+1, V), (n+1, F)
        scores = process_scores(logits_processor, ids, tree, raw)
        path, nxt = walk(tree, scores, do_sample)
        if observe_acceptance is not None:
            observe_acceptance(len(path) - 1)  # CaDDTree calibrates its acceptance estimate
        clock.lap("verify_s")

        # ---- accept: keep the path's K/V, append its tokens and the target's next token --------
        keep = torch.tensor(path, dtype=torch.long, device=device)
        compact(cache, past, keep)
        context = feats[keep]  # (k+1, F) features of the root and accepted nodes
        new_tokens = tree.tokens[path[1:]].tolist() + [nxt]
        before = ids.shape[1]
        ids, done = commit(ids, new_tokens, path, scores, raw)
        stats.acceptance_lengths.append(ids.shape[1] - before)  # committed only: a stop (EOS) mid-path drops the rest
        stats.tree_sizes.append(tree.num_nodes)
        clock.lap("commit_s")

    return finish(ids)


# ------------------------------------------------------------------------------------------------
# generate() integration
# ------------------------------------------------------------------------------------------------

def _resolve_method(method: str | None, tree_budget) -> tuple[str, Any]:
    if method is None:
        if tree_budget is None:
            return "dflash", None
        method = "auto" if tree_budget == "auto" else "ddtree"
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}.")
    if method == "ddtree-lookup":
        if tree_budget == "auto":
            return method, "auto"  # CaDDTree over the merged tree
        _, budget = _resolve_method("ddtree", tree_budget)
        return method, budget
    if method == "dflash":
        if tree_budget is not None:
            raise ValueError("method='dflash' verifies the drafter's single chain: drop tree_budget, or use method='ddtree'.")
        return method, None
    if method == "auto" or tree_budget == "auto":
        return "auto", tree_budget
    if tree_budget is None:
        tree_budget = 64
    if isinstance(tree_budget, bool) or not isinstance(tree_budget, int):
        raise ValueError(f"tree_budget must be an int in [0, {MAX_TREE_BUDGET}] or 'auto', got {tree_budget!r}.")
    if not 0 <= tree_budget <= MAX_TREE_BUDGET:
        raise ValueError(f"tree_budget={tree_budget} is out of range: use 0 <= tree_budget <= {MAX_TREE_BUDGET} (64 is a good default).")
    return "ddtree", tree_budget


def _ddtree_generate(self, inputs=None, generation_config=None, *args, assistant_model=None, tree_budget=None,
                     method=None, max_tree_budget: int = 256, collect_timing: bool = False, **kwargs):
    """`generate()` that understands `assistant_model=<DFlash drafter>, tree_budget=..., method=...`."""
    if kwargs.get("custom_generate") is not None:
        # The caller picked a recipe (e.g. custom_generate="<drafter repo>", whose generate.py comes back
        # here without custom_generate): hand it our arguments untouched instead of passing it twice.
        for key, value in (("assistant_model", assistant_model), ("tree_budget", tree_budget), ("method", method)):
            if value is not None:
                kwargs[key] = value
        if max_tree_budget != 256:
            kwargs["max_tree_budget"] = max_tree_budget
        if collect_timing:
            kwargs["collect_timing"] = collect_timing
        return GenerationMixin.generate(self, inputs, generation_config, *args, **kwargs)
    if isinstance(assistant_model, (tuple, list)):
        return _d2sd_generate(self, inputs, generation_config, *args, drafters=assistant_model,
                              tree_budget=tree_budget, method=method, collect_timing=collect_timing, **kwargs)
    if method in D2SD_METHODS:
        raise ValueError(f"method={method!r} needs two drafters: assistant_model=(drafter, variable_prefix_drafter).")
    if assistant_model is None or not is_dflash_drafter(assistant_model):
        if tree_budget is not None or method is not None:
            what = "no assistant_model" if assistant_model is None else f"a {type(assistant_model).__name__} assistant"
            raise ValueError(
                f"tree_budget/method need a DFlash drafter as assistant_model, got {what}. Load one with "
                "AutoModel.from_pretrained('<org>/<name>-DFlash...', trust_remote_code=True), or drop tree_budget/method."
            )
        if assistant_model is not None:
            kwargs["assistant_model"] = assistant_model
        return GenerationMixin.generate(self, inputs, generation_config, *args, **kwargs)

    method, budget = _resolve_method(method, tree_budget)
    policy = None
    if method == "auto" or budget == "auto":
        from .budget import caddtree_policy

        if not isinstance(max_tree_budget, int) or not 1 <= max_tree_budget <= MAX_TREE_BUDGET:
            raise ValueError(f"max_tree_budget must be an int in [1, {MAX_TREE_BUDGET}], got {max_tree_budget!r}.")
        budget = max_tree_budget
        policy = caddtree_policy(self, assistant_model, max_nodes=max_tree_budget)

    return _run(self, inputs, generation_config, args, kwargs, drafter=assistant_model, method=method,
                tree_budget=budget, budget_policy=policy, collect_timing=collect_timing)


def _d2sd_generate(self, inputs, generation_config, *args, drafters, tree_budget, method, collect_timing,
                   d2sd_boundaries: int = 4, d2sd_alternatives: int = 1, **kwargs):
    if len(drafters) != 2 or not all(is_dflash_drafter(d) for d in drafters):
        raise ValueError("D2SD takes assistant_model=(drafter, variable_prefix_drafter): two DFlash drafters.")
    method = method or "d2sd"
    if method not in D2SD_METHODS:
        raise ValueError(f"two drafters run D2SD: method must be one of {D2SD_METHODS}, got {method!r}.")
    if tree_budget == "auto":
        raise ValueError("tree_budget='auto' (CaDDTree) takes one drafter; D2SD needs an int tree_budget (e.g. 64).")
    _, budget = _resolve_method("ddtree", 64 if tree_budget is None else tree_budget)
    for name, v in (("d2sd_boundaries", d2sd_boundaries), ("d2sd_alternatives", d2sd_alternatives)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 64:
            raise ValueError(f"{name} must be an int in [1, 64], got {v!r}.")
    return _run(self, inputs, generation_config, args, kwargs, drafter=drafters[0], drafter2=drafters[1],
                method=method, tree_budget=budget, collect_timing=collect_timing,
                d2sd_boundaries=d2sd_boundaries, d2sd_alternatives=d2sd_alternatives)


def _run(self, inputs, generation_config, args, kwargs, **loop_kwargs):
    """GenerationMixin.generate with our loop as the callable custom_generate."""
    tokenizer = kwargs.pop("tokenizer", None)
    stop_strings = kwargs.pop("stop_strings", None)
    if stop_strings is None and generation_config is not None:
        stop_strings = getattr(generation_config, "stop_strings", None)
    if stop_strings is not None:
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: pass generate(..., tokenizer=tokenizer).")
        extra = StoppingCriteriaList([StopStringCriteria(tokenizer, stop_strings)])
        user = kwargs.pop("stopping_criteria", None)
        kwargs["stopping_criteria"] = StoppingCriteriaList(list(user or []) + list(extra))
        if generation_config is not None and getattr(generation_config, "stop_strings", None) is not None:
            generation_config = generation_config.__class__.from_dict(
                {**generation_config.to_dict(), "stop_strings": None})

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


def generate(model, input_ids, drafter, **kwargs):
    """Functional form: `hf_ddtree.generate(target, ids, drafter, tree_budget=64, max_new_tokens=...)`."""
    return _ddtree_generate(model, input_ids, assistant_model=drafter, **kwargs)
