"""Run every method on the same prompts, prompt-major, and return one row per (prompt, temperature, method).

Plain functions; no file output here (see `report.py`) and no process groups (see `cli.py`).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from hf_ddtree.compat import CACHE_FIELD, cache_from_kwargs, cache_kwargs
from hf_ddtree.propose import D2SD_BOUNDARIES, D2SD_METHODS, DEFAULT_MAX_TREE_BUDGET, MAX_TREE_BUDGET

# ------------------------------------------------------------------------------------------------
# Methods
# ------------------------------------------------------------------------------------------------

VALID_METHODS = ("ar", "dflash", "ddtree:N", "caddtree", "ddtree-lookup:N", "caddtree-lookup", "d2sd:N", "d2sd-tree:N",
                 "pld", "hf-dflash")
# stock generate() with a static cache and the run's compile setting: added (right after ar) by
# run_benchmark(compile_config=...) / `--compile`, never asked for by name
AR_STATIC = "ar-static"
AR_KINDS = ("ar", AR_STATIC)


def make_compile_config(backend: str = "inductor"):
    """The bench's compile setting: transformers' CompileConfig with `backend`, on any device
    (`_compile_all_devices`, the switch stock generate() reads; cuda/xpu compile without it)."""
    from transformers import CompileConfig

    cc = CompileConfig(backend=backend) if backend == "inductor" else CompileConfig(backend=backend, mode=None)
    cc._compile_all_devices = True
    return cc


BASELINES = ("pld", "hf-dflash")  # comparison points from transformers itself; skipped (not fatal) if they fail
BUDGETED = ("ddtree", "ddtree-lookup", *D2SD_METHODS)  # kinds written KIND:N, N = tree budget
AUTO_KINDS = ("caddtree", "caddtree-lookup")  # CaDDTree: calibrated once before the run


@dataclass(frozen=True)
class Method:
    """One decoding method. `name` is the canonical spelling used in rows, summaries and plots."""

    name: str  # "ar", "dflash", "ddtree:64", "caddtree", "d2sd:64", "d2sd-tree:64", "pld", "hf-dflash"
    kind: str  # "ar", "dflash", "ddtree", "caddtree", "ddtree-lookup", "caddtree-lookup", "d2sd", "d2sd-tree", "pld", "hf-dflash"
    budget: int | None = None  # ddtree:N / d2sd:N / d2sd-tree:N -> N

    @property
    def is_baseline(self) -> bool:
        return self.kind in BASELINES

    @property
    def needs_drafter2(self) -> bool:
        return self.kind in D2SD_METHODS

    @property
    def tree_budget(self) -> int | str | None:
        """What the row records as tree budget: N for ddtree:N / d2sd:N / d2sd-tree:N, "auto" for caddtree,
        else None."""
        if self.kind in BUDGETED:
            return self.budget
        if self.kind in AUTO_KINDS:
            return "auto"
        return None


def _method_error(token: str, why: str = "") -> ValueError:
    return ValueError(
        f"unknown method {token!r}{': ' + why if why else ''}. Valid methods: {', '.join(VALID_METHODS)} "
        f"(N = tree budget, an int in 1..{MAX_TREE_BUDGET}, e.g. ddtree:64). Example: --methods ar,dflash,ddtree:16,ddtree:64,caddtree"
        f",d2sd:64,d2sd-tree:64"
    )


def parse_method(token: str) -> Method:
    t = token.strip().lower()
    if t in ("ar", "dflash", "caddtree", "caddtree-lookup", "pld", "hf-dflash"):
        return Method(t, t)
    kind, sep, rest = t.partition(":")
    if kind in BUDGETED:
        if not sep or not rest.isdigit():
            raise _method_error(token, f"{kind} needs a budget, written {kind}:N")
        n = int(rest)
        if not 1 <= n <= MAX_TREE_BUDGET:
            raise _method_error(token, f"the budget must be in 1..{MAX_TREE_BUDGET}")
        return Method(f"{kind}:{n}", kind, n)
    raise _method_error(token)


def parse_methods(spec: str | Iterable[str], *, ensure_ar: bool = True) -> list[Method]:
    """"ar,dflash,ddtree:64" (or a list) -> [Method]; duplicates dropped, order kept.

    With ensure_ar (default) the AR baseline is added if missing, since speedups and the temperature-0
    identity check are measured against it. AR always runs first for each prompt.
    """
    tokens = [t for t in (spec.split(",") if isinstance(spec, str) else list(spec)) if str(t).strip()]
    if not tokens:
        raise _method_error("", "no method given")
    out: list[Method] = []
    for tok in tokens:
        m = parse_method(str(tok))
        if m not in out:
            out.append(m)
    ar = [m for m in out if m.kind == "ar"]
    if not ar and ensure_ar:
        ar = [Method("ar", "ar")]
    return ar + [m for m in out if m.kind != "ar"]


# ------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------

@dataclass
class BenchPrompt:
    """A tokenized prompt. `index` is global (before sharding): seeds and merge order use it."""

    id: str
    dataset: str
    input_ids: list[int]
    index: int = 0
    text: str | None = None


def _ids_list(x) -> list[int]:
    if isinstance(x, torch.Tensor):
        x = x.reshape(-1).tolist()
    return [int(t) for t in x]


def tokenize_chat(tokenizer, text: str) -> list[int]:
    """The prompt as the chat template renders it (`hf_ddtree.data.to_chat_ids`; ValueError without one)."""
    from hf_ddtree.data import to_chat_ids

    return _ids_list(to_chat_ids(tokenizer, text))


def prepare_prompts(prompts: Sequence[Any], tokenizer=None, dataset: str = "custom") -> list[BenchPrompt]:
    """Normalize prompts to BenchPrompt with global indices 0..n-1.

    Accepted items: BenchPrompt; objects with `.id`, `.dataset`, `.text` (hf_ddtree.data.Prompt);
    dicts with `input_ids` or `text` (optional `id`, `dataset`); token lists / 1-D or (1, T) tensors.
    Text needs `tokenizer`; token ids do not.
    """
    out: list[BenchPrompt] = []
    for i, p in enumerate(prompts):
        if isinstance(p, BenchPrompt):
            bp = BenchPrompt(p.id, p.dataset, list(p.input_ids), i, p.text)
        elif isinstance(p, dict):
            pid = str(p.get("id", i))
            ds = str(p.get("dataset", dataset))
            if p.get("input_ids") is not None:
                bp = BenchPrompt(pid, ds, _ids_list(p["input_ids"]), i, p.get("text"))
            elif p.get("text") is not None:
                bp = BenchPrompt(pid, ds, _need_tok(tokenizer, p["text"]), i, p["text"])
            else:
                raise ValueError(f"prompt {i}: a dict prompt needs 'input_ids' or 'text', got keys {sorted(p)}.")
        elif hasattr(p, "text"):
            bp = BenchPrompt(str(getattr(p, "id", i)), str(getattr(p, "dataset", dataset)),
                             _need_tok(tokenizer, p.text), i, p.text)
        elif isinstance(p, (list, tuple, torch.Tensor)):
            bp = BenchPrompt(str(i), dataset, _ids_list(p), i)
        else:
            raise TypeError(f"prompt {i}: unsupported type {type(p).__name__}.")
        if not bp.input_ids:
            raise ValueError(f"prompt {bp.dataset}/{bp.id} is empty.")
        out.append(bp)
    return out


def _need_tok(tokenizer, text: str) -> list[int]:
    if tokenizer is None:
        raise ValueError("text prompts need a tokenizer; pass tokenizer= or give prompts as token ids.")
    return tokenize_chat(tokenizer, text)


def shard_prompts(prompts: Sequence[BenchPrompt], rank: int, world_size: int) -> list[BenchPrompt]:
    """Data parallel split: rank r takes prompts r, r + N, r + 2N, ... (indices stay global)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad shard rank={rank} world_size={world_size}.")
    return list(prompts[rank::world_size])


def merge_rows(parts: Sequence[Sequence[dict]], method_order: Sequence[str] | None = None) -> list[dict]:
    """Merge per-rank rows into one list, ordered like a single-process run (prompt, temperature, method)."""
    rows = [r for part in parts for r in part]
    order = {m: i for i, m in enumerate(method_order or [])}
    rows.sort(key=lambda r: (r["prompt_index"], r["temperature"], order.get(r["method"], len(order)), r["method"]))
    return rows


# ------------------------------------------------------------------------------------------------
# Running one method
# ------------------------------------------------------------------------------------------------

SPLIT_FIELDS = ("prefill_s", "draft_s", "tree_s", "verify_s", "commit_s")


class ForwardRecorder:
    """Counts target forwards during stock generate() calls and, from the KV length seen at each, the
    tokens committed per verify round (accepted + bonus), so PLD / transformers' DFlash / AR get the
    same per-round acceptance lengths our loop reports. The first forward (prefill) is not a round."""

    def __init__(self, model):
        self.model = model
        self.starts: list[int] = []
        self._handle = None

    def _hook(self, module, args, kwargs):
        past = cache_from_kwargs(kwargs)  # generate() passes `cache=` (5.24+) or `past_key_values=`
        start = 0
        if past is not None and hasattr(past, "get_seq_length"):
            start = int(past.get_seq_length())
        self.starts.append(start)

    def __enter__(self):
        self.starts = []
        self._handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False

    def acceptance_lengths(self, final_len: int) -> list[int] | None:
        """Tokens committed by each verify round. None if the KV lengths do not add up (e.g. a static
        cache whose get_seq_length is not the live length), so callers fall back to an average."""
        s = self.starts[1:]
        if not s:
            return []
        out = [b - a for a, b in zip(s, s[1:])] + [final_len - 1 - s[-1]]
        if any(x < 1 for x in out):
            return None
        return out


class HFDFlashAdapter(torch.nn.Module):
    """Lets transformers' built-in DFlash candidate generator drive a drafter that does not speak its
    interface natively (the `hf-dflash` baseline's fallback).

    transformers (generation/candidate_generator.py, DFlashTokenCandidateGenerator) reads
    `assistant_model.config.{block_size, mask_token_id, target_layer_ids}` at the top level and calls
    `assistant_model(noise_embeds=, context_hidden_states=, position_ids=, attention_mask=<2D or None>,
    cache=<DFlashCache>)` (`past_key_values=` before 5.24), reading `.last_hidden_state`. Our
    `DFlashDraftModel` does all of that itself (it mirrors the fields at the config's top level and
    returns a `BaseModelOutputWithPast` for those keyword names), so the bench normally runs it
    directly and this wrapper is only used when that native call fails: e.g. a drafter class that
    keeps the fields only in `config.dflash_config` and returns a tensor (z-lab's remote code). The
    draft itself is the drafter's own forward; only the interface is adapted.
    """

    def __init__(self, drafter):
        super().__init__()
        from hf_ddtree.drafter import drafter_spec

        self.drafter = drafter
        spec = drafter_spec(drafter)
        cfg = drafter.config.__class__.from_dict(drafter.config.to_dict())
        cfg.block_size = spec.block_size
        cfg.mask_token_id = spec.mask_token_id
        cfg.target_layer_ids = list(spec.target_layer_ids)
        self.config = cfg

    @property
    def device(self):
        return next(self.drafter.parameters()).device

    @property
    def dtype(self):
        return next(self.drafter.parameters()).dtype

    def forward(self, noise_embeds, context_hidden_states, position_ids=None, attention_mask=None,
                past_key_values=None, cache=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        cache = cache if cache is not None else past_key_values

        if attention_mask is not None and attention_mask.dim() == 2:
            if not bool(attention_mask.all()):
                raise ValueError("hf-dflash adapter: padded inputs are not supported")
            attention_mask = None  # batch 1, no padding: every block query sees everything
        out = self.drafter(noise_embedding=noise_embeds, target_hidden=context_hidden_states,
                           position_ids=position_ids, attention_mask=attention_mask,
                           **cache_kwargs(self.drafter, cache), use_cache=cache is not None)
        hidden = out if isinstance(out, torch.Tensor) else out.last_hidden_state
        return BaseModelOutputWithPast(last_hidden_state=hidden, **{CACHE_FIELD: cache})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _MethodRunner:
    """Calls generate() for each method; decides once how hf-dflash runs (natively or via the adapter)."""

    def __init__(self, target, drafter, *, max_tree_budget: int, pld_tokens: int, drafter2=None,
                 d2sd_boundaries: int = D2SD_BOUNDARIES, compile_config=None):
        self.target, self.drafter, self.drafter2 = target, drafter, drafter2
        # with a compile setting, our methods and ar-static run stock generate()'s compile convention
        self.compiled = {} if compile_config is None else dict(cache_implementation="static",
                                                               compile_config=compile_config)
        self.d2sd_boundaries = int(d2sd_boundaries)
        self.max_tree_budget = int(max_tree_budget)
        self.pld_tokens = int(pld_tokens)
        self.device = next(target.parameters()).device
        self.hf_dflash_model = None  # decided on first use
        self.notes: dict[str, str] = {}

    def gen_kwargs(self, temperature: float, max_new_tokens: int) -> dict:
        kw: dict[str, Any] = dict(max_new_tokens=int(max_new_tokens))
        if temperature > 0:
            kw.update(do_sample=True, temperature=float(temperature))
        else:
            kw.update(do_sample=False)
        return kw

    def _call_hf_dflash(self, model, ids, kw):
        from transformers import GenerationMixin

        return GenerationMixin.generate(self.target, ids, assistant_model=model, speculation_type="dflash", **kw)

    def resolve_hf_dflash(self, ids) -> None:
        """Untimed: try the drafter natively with transformers' DFlash; if that fails, use the adapter."""
        if self.hf_dflash_model is not None:
            return
        kw = self.gen_kwargs(0.0, 4)
        try:
            self._call_hf_dflash(self.drafter, ids, kw)
            self.hf_dflash_model = self.drafter
        except Exception as e:  # the drafter does not speak transformers' DFlash interface natively
            adapter = HFDFlashAdapter(self.drafter)
            self._call_hf_dflash(adapter, ids, kw)  # raises if the adapter cannot run it either
            self.hf_dflash_model = adapter
            self.notes["hf-dflash"] = (
                "transformers' DFlash generator driven through hf_ddtree.bench.runner.HFDFlashAdapter "
                f"(native call failed: {type(e).__name__}: {_short(e)})")

    def run(self, method: Method, ids: torch.Tensor, temperature: float, max_new_tokens: int) -> dict:
        """One timed generation. Returns output ids (new tokens), time, per-round acceptance, split."""
        t = self.target
        kw = self.gen_kwargs(temperature, max_new_tokens)
        # the time split synchronizes an accelerator 5 times per round (decoding._Clock): only where that costs
        # nothing (the CPU), so a timed run on a GPU is wall time with no per-round sync, like the AR baseline
        spec_kw = dict(return_dict_in_generate=True, collect_timing=t.device.type == "cpu")
        stats = None
        accept = None
        with torch.inference_mode():
            _sync(self.device)
            if method.kind in ("ar", AR_STATIC, "pld", "hf-dflash"):
                extra = {"prompt_lookup_num_tokens": self.pld_tokens} if method.kind == "pld" else {}
                if method.kind == AR_STATIC:
                    extra = dict(self.compiled)
                if method.kind == "hf-dflash":
                    self.resolve_hf_dflash(ids)
                with ForwardRecorder(t) as rec:
                    t0 = time.perf_counter()
                    if method.kind == "hf-dflash":
                        out = self._call_hf_dflash(self.hf_dflash_model, ids, kw)
                    else:
                        out = t.generate(ids, **kw, **extra)
                    _sync(self.device)
                    dt = time.perf_counter() - t0
                seq = out if isinstance(out, torch.Tensor) else out.sequences
                n_forwards = len(rec.starts)
                accept = rec.acceptance_lengths(seq.shape[1])
            else:
                extra = method_kwargs(method, self.drafter, self.drafter2, self.max_tree_budget, self.d2sd_boundaries)
                t0 = time.perf_counter()
                out = t.generate(ids, **kw, **extra, **spec_kw, **self.compiled)
                _sync(self.device)
                dt = time.perf_counter() - t0
                seq = out.sequences
                stats = out.stats
                accept = list(out.acceptance_lengths or [])
                n_forwards = 1 + len(accept)
        new = seq[0, ids.shape[1]:].tolist()
        return dict(output_ids=new, time_s=dt, acceptance_lengths=accept, stats=stats, target_forwards=n_forwards)


def method_kwargs(method: Method, drafter, drafter2, max_tree_budget: int,
                  d2sd_boundaries: int = D2SD_BOUNDARIES) -> dict:
    """generate()'s keyword arguments (assistant_model included) that run one of our methods."""
    if method.kind == "dflash":
        return dict(assistant_model=drafter, tree_budget=None)
    if method.kind == "ddtree":
        return dict(assistant_model=drafter, tree_budget=method.budget)
    if method.kind == "ddtree-lookup":
        return dict(assistant_model=drafter, method="ddtree-lookup", tree_budget=method.budget)
    if method.kind == "caddtree-lookup":
        return dict(assistant_model=drafter, method="ddtree-lookup", tree_budget="auto", max_tree_budget=max_tree_budget)
    if method.kind in D2SD_METHODS:
        return dict(assistant_model=(drafter, drafter2), method=method.kind, tree_budget=method.budget,
                    d2sd_boundaries=d2sd_boundaries)
    return dict(assistant_model=drafter, tree_budget="auto", max_tree_budget=max_tree_budget)  # caddtree


def progress_bar(enabled: bool, total: int, desc: str, **kw):
    """A tqdm bar over `total` generations, or None (disabled, or tqdm missing)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="gen", dynamic_ncols=True, **kw)


def _short(e: BaseException, n: int = 300) -> str:
    s = str(e).strip().splitlines()
    s = s[0] if s else ""
    return s[:n]


# ------------------------------------------------------------------------------------------------
# The benchmark loop
# ------------------------------------------------------------------------------------------------

def _row(prompt: BenchPrompt, method: Method, temperature: float, seed: int, rank: int) -> dict:
    return {
        "prompt_id": prompt.id,
        "dataset": prompt.dataset,
        "prompt_index": prompt.index,
        "prompt_tokens": len(prompt.input_ids),
        "method": method.name,
        "kind": method.kind,
        "tree_budget": method.tree_budget,
        "temperature": float(temperature),
        "seed": int(seed + prompt.index),
        "rank": int(rank),
        "status": "ok",
        "reason": None,
        "note": None,
        "new_tokens": 0,
        "time_s": None,
        "tokens_per_s": None,
        "target_forwards": None,
        "rounds": None,
        "acceptance_lengths": None,
        "mean_acceptance_length": None,
        "tree_sizes": None,
        **{k: None for k in SPLIT_FIELDS},
        "identical_to_ar": None,
        "first_mismatch": None,
        "mismatch_margin": None,
        "mismatch_gap": None,
        "output_ids": None,
    }


def run_benchmark(
    target,
    tokenizer,
    drafter,
    prompts: Sequence[Any],
    methods: str | Sequence[str] | Sequence[Method],
    *,
    temperatures: Sequence[float] = (0.0,),
    max_new_tokens: int = 256,
    seed: int = 0,
    warmup: int = 1,
    max_tree_budget: int = DEFAULT_MAX_TREE_BUDGET,
    pld_tokens: int = 10,
    drafter2=None,
    drafter2_error: str | None = None,
    d2sd_boundaries: int = D2SD_BOUNDARIES,
    rank: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    compile_config=None,
) -> list[dict]:
    """Run every method on every prompt (prompt-major: for each prompt, each temperature, each method)
    and return one row per (prompt, temperature, method); schema in `hf_ddtree.bench`.

    `prompts`: see `prepare_prompts` (token ids need no tokenizer). Already-prepared BenchPrompts keep
    their global `index` (sharded runs). `methods`: "ar,dflash,ddtree:64,..." or Method objects.
    Seeds: torch.manual_seed(seed + prompt.index) before every call. A method that raises is recorded
    (status "skipped" for baselines, "error" otherwise, with the reason) and not retried; the run goes on.
    `drafter2` (the variable-prefix drafter) and `d2sd_boundaries` serve d2sd:N / d2sd-tree:N; without a
    drafter2 those methods are "skipped" with `drafter2_error` (why it could not be had) as the reason.
    `compile_config` (a transformers CompileConfig, e.g. `make_compile_config("inductor")`): our methods run
    with cache_implementation="static" and it (so generate()'s compile convention compiles their verify and
    drafter forwards), and a second AR baseline, "ar-static" (stock generate() with the same static cache and
    compile setting), is measured next to "ar" (stock generate() as it comes); the report takes speedups
    against the faster of the two (`report.summarize`).
    """
    import hf_ddtree

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if isinstance(methods, str) or (methods and not isinstance(list(methods)[0], Method)):
        methods = parse_methods(methods)
    methods = [m for m in methods if m.kind != AR_STATIC]
    if methods and methods[0].kind != "ar" and any(m.kind == "ar" for m in methods):
        methods = [m for m in methods if m.kind == "ar"] + [m for m in methods if m.kind != "ar"]
    if compile_config is not None:
        n_ar = sum(m.kind == "ar" for m in methods)
        methods = methods[:n_ar] + [Method(AR_STATIC, AR_STATIC)] + methods[n_ar:]
    needs_drafter = [m.name for m in methods if m.kind in ("dflash", "ddtree", "caddtree", "ddtree-lookup", "caddtree-lookup",
                                                           "hf-dflash", *D2SD_METHODS)]
    if drafter is None and needs_drafter:
        raise ValueError(f"methods {needs_drafter} need a drafter; pass one or drop them.")
    if all(isinstance(p, BenchPrompt) for p in prompts):
        bprompts = list(prompts)
    else:
        bprompts = prepare_prompts(prompts, tokenizer)
    temps = [float(t) for t in temperatures]
    if any(t < 0 or math.isnan(t) for t in temps):
        raise ValueError(f"temperatures must be >= 0, got {temps}.")

    if not hf_ddtree.is_enabled(target):
        hf_ddtree.enable(target)
    device = next(target.parameters()).device
    runner = _MethodRunner(target, drafter, max_tree_budget=max_tree_budget, pld_tokens=pld_tokens,
                           drafter2=drafter2, d2sd_boundaries=d2sd_boundaries, compile_config=compile_config)
    disabled: dict[str, tuple[str, str]] = {}  # method name -> (status, reason)
    d2sd = [m for m in methods if m.needs_drafter2]
    if d2sd and drafter2 is None:
        reason = f"no second (variable-prefix) drafter: {drafter2_error or 'none given (drafter2=...)'}"
        for m in d2sd:
            disabled[m.name] = ("skipped", reason)
        log(f"[bench] {', '.join(m.name for m in d2sd)} skipped ({reason})")
    elif d2sd and not (getattr(drafter2.config, "dflash_config", None) or {}).get("variable_prefix"):
        for m in d2sd:  # still lossless, but drafter 2 was not trained for re-anchored prefixes
            runner.notes[m.name] = "drafter 2 is not a variable-prefix drafter (dflash_config.variable_prefix unset)"

    def fail(method: Method, e: BaseException, where: str) -> None:
        status = "skipped" if method.is_baseline else "error"
        reason = f"{where}: {type(e).__name__}: {_short(e)}"
        disabled[method.name] = (status, reason)
        log(f"[bench] {method.name} {status} ({reason})")

    # CaDDTree calibrates its latency model once per (models, device); do it outside any timing.
    if any(m.kind in AUTO_KINDS for m in methods) and bprompts:
        try:
            from hf_ddtree.distributed import calibrate  # calibrate.calibrate; all TP ranks together

            t0 = time.perf_counter()
            with torch.inference_mode():
                calibrate(target, drafter, int(max_tree_budget), compile_config=compile_config)
            log(f"[bench] CaDDTree latency model ready ({time.perf_counter() - t0:.1f} s)")
        except Exception as e:
            for m in methods:
                if m.kind in AUTO_KINDS:
                    fail(m, e, "calibration")

    # Warm-up: first calls pay allocation, kernel selection, lazy imports. Not timed, not recorded.
    if warmup > 0 and bprompts:
        p0 = bprompts[0]
        ids0 = torch.tensor([p0.input_ids], device=device)
        for m in methods:
            if m.name in disabled:
                continue
            for w in range(int(warmup)):
                torch.manual_seed(seed + p0.index)
                try:
                    runner.run(m, ids0, temps[0] if temps else 0.0, min(int(max_new_tokens), 32))
                except Exception as e:
                    fail(m, e, "warm-up")
                    break

    rows: list[dict] = []
    bar = progress_bar(progress, len(bprompts) * len(temps) * len(methods),
                       f"bench{' rank ' + str(rank) if rank else ''}", position=rank)

    for p in bprompts:
        ids = torch.tensor([p.input_ids], device=device)
        for temp in temps:
            ar_out: list[int] | None = None
            for m in methods:
                row = _row(p, m, temp, seed, rank)
                if bar is not None:
                    bar.set_postfix_str(f"{p.dataset}/{p.id} T={temp:g} {m.name}", refresh=False)
                if m.name in disabled:
                    row["status"], row["reason"] = disabled[m.name]
                else:
                    torch.manual_seed(seed + p.index)
                    try:
                        res = runner.run(m, ids, temp, max_new_tokens)
                    except Exception as e:
                        fail(m, e, f"prompt {p.dataset}/{p.id}")
                        row["status"], row["reason"] = disabled[m.name]
                    else:
                        _fill(row, res)
                        row["note"] = runner.notes.get(m.name)
                        if m.kind == "ar":
                            ar_out = res["output_ids"]
                        elif temp == 0 and ar_out is not None:
                            row["identical_to_ar"], row["first_mismatch"] = compare_outputs(ar_out, res["output_ids"])
                            if row["first_mismatch"] is not None:
                                row["mismatch_margin"], row["mismatch_gap"] = mismatch_margin(
                                    target, p.input_ids, ar_out, res["output_ids"], row["first_mismatch"])
                        if m.kind == "ar" and temp == 0:
                            row["identical_to_ar"], row["first_mismatch"] = True, None
                rows.append(row)
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    return rows


def _fill(row: dict, res: dict) -> None:
    new = res["output_ids"]
    dt = float(res["time_s"])
    row["output_ids"] = list(new)
    row["new_tokens"] = len(new)
    row["time_s"] = dt
    row["tokens_per_s"] = len(new) / dt if dt > 0 else None
    row["target_forwards"] = int(res["target_forwards"])
    acc = res["acceptance_lengths"]
    if acc is None:  # per-round split unknown: the average still is (tokens after prefill / verify forwards)
        rounds = max(0, int(res["target_forwards"]) - 1)
        row["rounds"] = rounds
        row["mean_acceptance_length"] = (len(new) - 1) / rounds if rounds else None
    else:
        row["acceptance_lengths"] = [int(a) for a in acc]
        row["rounds"] = len(acc)
        row["mean_acceptance_length"] = sum(acc) / len(acc) if acc else None
    stats = res["stats"]
    if stats is not None:
        row["tree_sizes"] = [int(s) for s in getattr(stats, "tree_sizes", []) or []]
        for k in SPLIT_FIELDS:
            v = getattr(stats, k, None)
            row[k] = float(v) if v is not None else None


@torch.inference_mode()
def mismatch_margin(target, prompt_ids: list[int], ref: list[int], out: list[int], at: int) -> tuple[float | None, float | None]:
    """At the first new token where `out` differs from AR's `ref`: (the target's logit margin between its
    top two tokens, logit(AR's token) - logit(out's token)), from one plain forward over prompt + the
    shared prefix, in the target's dtype. A near-tie (a margin at the dtype's rounding, e.g. bf16's) says
    the two runs rounded differently; a wide margin would be a bug. (None, None) where one output simply
    stopped earlier (no differing token)."""
    if at >= min(len(ref), len(out)):
        return None, None
    device = next(target.parameters()).device
    ids = torch.tensor([list(prompt_ids) + list(ref[:at])], device=device)
    logits = target(input_ids=ids, logits_to_keep=1).logits[0, -1].float()  # (V,)
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1]), float(logits[ref[at]] - logits[out[at]])


def compare_outputs(ref: list[int], out: list[int]) -> tuple[bool, int | None]:
    """(identical, index of the first differing new token: a token that differs, or where the shorter one ends)."""
    if ref == out:
        return True, None
    for i, (a, b) in enumerate(zip(ref, out)):
        if a != b:
            return False, i
    return False, min(len(ref), len(out))
