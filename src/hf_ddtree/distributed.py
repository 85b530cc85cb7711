"""Tensor-parallel targets: the same decoding loop on every rank of a transformers `tp_plan` model.

A target loaded with `AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")` under
`torchrun --nproc_per_node N` holds 1/N of most weights on each rank; every forward all-reduces
(or all-gathers) so each rank sees the whole hidden states and logits. hf_ddtree runs its loop on
every rank in lock-step: the target forwards are collectives, so each rank must verify a tree of
the same shape in the same round, or the collectives deadlock.

How the ranks cannot diverge (even if one rank's logits differ from another's in the last bit):
rank 0 of the TP group (the *leader*) makes every data-dependent decision and broadcasts it.

  * the draft tree: every rank runs the drafter (a full replica on every rank; its embedding and
    lm_head are the target's, which may themselves be collectives), but the tree that gets
    verified is the leader's, broadcast each round (`leader_tree`, called by the loop after the budget
    policy cut the tree). That also makes the CaDDTree budget one decision: the leader's cut is the one broadcast.
  * every target choice (the first token after the prompt, the accept walk and its bonus token):
    only the leader evaluates it (argmax, or a sample from its own global torch RNG) and
    broadcasts the tokens (`leader_token`, `leader_walk`). The other ranks never draw from their
    RNG, so there is no RNG to keep in step, and with `torch.manual_seed(s)` the leader samples
    exactly what a single-process run with the same seed samples (one draw per committed token).
  * the CaDDTree latency model: only the leader looks at the disk cache; if it has to calibrate,
    every rank joins the timed forwards (they are collectives) and the leader's fit is broadcast
    (`calibrate`). The cache key carries the TP degree.
  * one all-gather per generate() call checks that every rank got the same call (prompt,
    max_length, budget, sampling): a rank with another prompt would otherwise hang the others.

Everything the loop does per rank besides that (stopping criteria on identical ids, cache
compaction of the rank's own KV heads, the drafter's context cache) is deterministic given the
broadcast decisions. Refused before any forward (`check_tensor_parallel`): a drafter that is
itself sharded or not on this rank's target device, a target plan that leaves the logits sharded
over the vocabulary, and `max_time` (a wall-clock stop each rank would take at its own moment).
"""

from __future__ import annotations

import fnmatch
import json
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import calibrate as _cal
from .budget import CaDDTreePolicy, LatencyModel
from .compat import linear_attention_modules, tensor_parallel_process_group, tensor_parallel_size, tp_style_shards_output
from .tree import Tree, _make_tree
from .verify import walk_tensors


@dataclass(frozen=True)
class TPGroup:
    """The TP process group of a target, as the loop needs it."""

    group: Any  # torch.distributed ProcessGroup
    rank: int  # this process's rank within the group
    size: int
    leader: int  # global rank of the group's rank 0 (the `src` of every broadcast)
    device: torch.device  # where broadcast tensors live (cpu for gloo, the target's GPU for nccl)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


def tensor_parallel_group(model) -> TPGroup | None:
    """The TPGroup of a target that transformers sharded with a tp_plan; None for any other model."""
    group = tensor_parallel_process_group(model)
    if group is None:
        return None
    import torch.distributed as dist

    backend = str(dist.get_backend(group))
    device = torch.device("cpu")
    if "gloo" not in backend:  # nccl-only groups take tensors on the rank's GPU
        device = next(model.parameters()).device
    return TPGroup(group, dist.get_rank(group), dist.get_world_size(group), dist.get_global_rank(group, 0), device)


def is_tensor_parallel(model) -> bool:
    return tensor_parallel_size(model) > 1


def _is_sharded(model) -> bool:
    if tensor_parallel_size(model) > 1 or getattr(model, "_device_mesh", None) is not None:
        return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def _output_head_style(target) -> tuple[str, str | None]:
    """(module name of the target's lm_head, its style in the target's tp_plan or None)."""
    head = target.get_output_embeddings()
    name = next((n for n, m in target.named_modules() if m is head), "lm_head")
    plan = dict(getattr(target, "_tp_plan", None) or {})
    if name in plan:
        return name, plan[name]
    for pattern, style in plan.items():
        if fnmatch.fnmatchcase(name, pattern):
            return name, style
    return name, None


def check_tensor_parallel(target, input_ids: torch.Tensor, generation_config, drafters, max_nodes: int,
                          method: str) -> TPGroup | None:
    """Before any forward: None for an ordinary target; for a tensor-parallel one, refuse what cannot
    work (ValueError naming the fix) and check that every rank got the same call. Returns the TPGroup.

    The checks are gathered over the ranks (one all_gather_object per call), so when one rank refuses
    (say its drafter sits on another device) every rank raises, instead of the others waiting in the
    first forward. input_ids: (B, P) this rank's prompt (B = 1 on a tensor-parallel target). drafters: the DFlash drafter(s), None skipped.
    """
    drafters = [d for d in drafters if d is not None]
    for d in drafters:
        if _is_sharded(d):
            raise ValueError(
                "The DFlash drafter is itself sharded (loaded with tp_plan or a device_mesh): hf_ddtree needs a full "
                "copy of the drafter on every rank. Load it without tp_plan, e.g. "
                "AutoModel.from_pretrained(<drafter>, trust_remote_code=True).to(target.device)."
            )
    tp = tensor_parallel_group(target)
    if tp is None:
        return None
    problem = _local_problem(target, generation_config, drafters)
    if problem is None and input_ids.shape[0] != 1:
        problem = (f"a tensor-parallel target decodes one row at a time with hf_ddtree, got batch size {input_ids.shape[0]}: "
                   "call generate() once per prompt (batched DDTree runs on single-process targets).")
    ids = input_ids.detach().to("cpu", torch.int64).contiguous()
    call = (int(ids.shape[1]), zlib.crc32(ids.numpy().tobytes()), int(generation_config.max_length),
            bool(generation_config.do_sample), int(max_nodes), str(method))
    import torch.distributed as dist

    parts: list = [None] * tp.size
    dist.all_gather_object(parts, (problem, call), group=tp.group)
    if problem is not None:
        raise ValueError(problem)
    others = [(r, p) for r, (p, _) in enumerate(parts) if p is not None]
    if others:
        r, p = others[0]
        raise ValueError(f"Rank {r} of the tensor-parallel target refused this generate() call: {p}")
    if any(c != parts[0][1] for _, c in parts):
        fields = ("prompt length", "prompt checksum", "max_length", "do_sample", "tree budget", "method")
        diff = [f for i, f in enumerate(fields) if len({c[i] for _, c in parts}) > 1]
        raise ValueError(
            f"The ranks of the tensor-parallel target called generate() differently ({', '.join(diff)} differ): "
            "every rank must run the same generate() call with the same prompt and arguments."
        )
    return tp


def _local_problem(target, generation_config, drafters) -> str | None:
    """What this rank cannot run on a tensor-parallel target, as an error message (None if nothing)."""
    name, style = _output_head_style(target)
    if style is not None and tp_style_shards_output(style) is not False:
        what = ("leaves the logits split over the vocabulary across ranks" if tp_style_shards_output(style)
                else "hf_ddtree does not know")
        return (f"The target's tp_plan shards its output head {name!r} with style {style!r}, which {what}: every rank "
                "needs the full logits to verify the tree. Use a plan whose lm_head gathers its output, e.g. "
                f"tp_plan={{..., {name!r}: 'colwise_gather_output'}} (tp_plan='auto' does this).")
    if linear_attention_modules(target):
        return ("hf_ddtree does not verify trees on a tensor-parallel hybrid (linear-attention) target yet: its tree "
                "forward of a Gated DeltaNet layer needs the layer's heads whole. Load the target without tp_plan "
                "(device_map='auto' splits it by layers instead).")
    device = next(target.parameters()).device
    for d in drafters:
        ddev = next(d.parameters()).device
        if ddev != device:
            return (f"The DFlash drafter is on {ddev} but this rank's shard of the target is on {device}: on a "
                    "tensor-parallel target each rank needs its own copy of the drafter next to its shard. "
                    "Move it with drafter.to(target.device) on every rank.")
    if getattr(generation_config, "max_time", None) is not None:
        return ("max_time stops generation at a wall-clock moment each rank of a tensor-parallel target would reach "
                "at a different round: drop max_time (use max_new_tokens) with a tensor-parallel target.")
    return None


# ------------------------------------------------------------------------------------------------
# Leader decides, everyone follows
# ------------------------------------------------------------------------------------------------

def _broadcast(tp: TPGroup, t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    t = t.to(tp.device)
    dist.broadcast(t, src=tp.leader, group=tp.group)
    return t.cpu()


def leader_token(tp: TPGroup | None, choose: Callable[[], int]) -> int:
    """`choose()` (argmax or a sample) on the leader only; its token on every rank."""
    if tp is None:
        return choose()
    buf = torch.tensor([choose() if tp.is_leader else 0], dtype=torch.int64)
    return int(_broadcast(tp, buf)[0])


def leader_walk(tp: TPGroup | None, walk: Callable[[], tuple[list[int], int]], max_nodes: int) -> tuple[list[int], int]:
    """`walk()` -> (accepted path, next token) on the leader only; its result on every rank.
    A path has at most max_nodes + 1 entries (the root and every node)."""
    if tp is None:
        return walk()
    buf = torch.zeros(max_nodes + 3, dtype=torch.int64)  # [len(path), next token, path...]
    if tp.is_leader:
        path, nxt = walk()
        buf[0], buf[1] = len(path), nxt
        buf[2:2 + len(path)] = torch.tensor(path, dtype=torch.int64)
    buf = _broadcast(tp, buf)
    k = int(buf[0])
    return buf[2:2 + k].tolist(), int(buf[1])


def leader_accept(tp: TPGroup | None, accept: Callable):
    """`accept(trees, tokens, parents, tree inputs, scores, do_sample)` (`verify.accept_on_device` /
    `accept_on_host`) on the leader only; its (paths, counts, next tokens, packed) on every rank, on the scores' device.
    One broadcast of (B, 2P + 1) int64 rows: the paths, then the packed commit."""
    if tp is None:
        return accept

    def on_leader(trees, tokens, parents, inputs, scores, do_sample):
        B, P = tokens.shape[0], inputs.max_depth + 1
        buf = torch.zeros(B, 2 * P + 1, dtype=torch.int64)
        if tp.is_leader:
            paths, _, _, packed = walk_tensors(accept(trees, tokens, parents, inputs, scores, do_sample))
            buf = torch.cat([paths, packed], 1).cpu()
        buf = _broadcast(tp, buf).to(scores.device)
        paths, packed = buf[:, :P], buf[:, P:]
        return paths, packed[:, 0], packed[:, -1], packed

    return on_leader


def leader_tree(tp: TPGroup | None, tree: Tree) -> Tree:
    """The leader's tree on every rank (the leader keeps its own object). Two broadcasts: the node
    count and max_depth, then (4, n+1) float64 rows tokens, parents, depths, scores (ids are exact in float64)."""
    if tp is None:
        return tree
    head = _broadcast(tp, torch.tensor([tree.num_nodes, tree.max_depth] if tp.is_leader else [0, 0], dtype=torch.int64))
    n, max_depth = head.tolist()  # max_depth too: the accept broadcast's shape (leader_accept) depends on it
    buf = torch.zeros(4, n + 1, dtype=torch.float64)
    if tp.is_leader:
        buf[0], buf[1], buf[2] = tree.tokens.double(), tree.parents.double(), tree.depths.double()
        buf[3] = torch.tensor(tree.scores, dtype=torch.float64)
    buf = _broadcast(tp, buf)
    if tp.is_leader:
        return tree
    ints = buf[:3].to(torch.int64).tolist()
    tree = _make_tree(ints[0][0], ints[0][1:], ints[1][1:], ints[2][1:], buf[3, 1:].tolist())
    tree.max_depth = max_depth  # the leader's bound (build_trees' may exceed the deepest node)
    return tree


def _broadcast_object(tp: TPGroup, obj):
    import torch.distributed as dist

    box = [obj if tp.is_leader else None]
    dist.broadcast_object_list(box, src=tp.leader, group=tp.group, device=tp.device)
    return box[0]


# ------------------------------------------------------------------------------------------------
# CaDDTree: one latency model, calibrated together, decided on the leader
# ------------------------------------------------------------------------------------------------

_MEMO: dict[str, LatencyModel] = {}


def calibrate(target, drafter=None, max_nodes: int = _cal.DEFAULT_MAX_TREE_BUDGET, *,
              past_len: int = _cal.DEFAULT_PAST_LEN, ns=None, reps: int = 5, warmup: int = 1,
              cache_implementation: str | None = None, use_cache: bool = True, progress: bool | None = None,
              method: str = "auto", drafter2=None, compile_config=None) -> LatencyModel:
    """`calibrate.calibrate` for any target. On a tensor-parallel one: the leader alone decides whether a
    cached calibration exists (its disk cache, keyed with the TP degree); if not, every rank runs the
    timed forwards together and the leader's fit is used (and broadcast) everywhere."""
    tp = tensor_parallel_group(target)
    if tp is None:
        return _cal.calibrate(target, drafter, max_nodes, past_len=past_len, ns=ns, reps=reps, warmup=warmup,
                              cache_implementation=cache_implementation, use_cache=use_cache, progress=progress,
                              method=method, drafter2=drafter2, compile_config=compile_config)
    if max_nodes < 0:
        raise ValueError(f"max_nodes must be >= 0, got {max_nodes}.")
    key = _cal.calibration_key(target, drafter, max_nodes, past_len, cache_implementation, method, drafter2,
                               compile_config)
    key["tensor_parallel"] = tp.size
    tag = json.dumps(key, sort_keys=True) + str(_cal.cache_dir())
    model = None
    if tp.is_leader and use_cache:
        model = _MEMO.get(tag) or _cal.load_cached(key)
    if _broadcast_object(tp, model is None):  # the leader has none: calibrate together
        m = _cal.measure_latency(target, drafter, max_nodes, ns=ns, past_len=past_len, reps=reps, warmup=warmup,
                                 cache_implementation=cache_implementation,
                                 progress=progress if tp.is_leader else False, method=method, drafter2=drafter2,
                                 compile_config=compile_config)
        if tp.is_leader:
            model = LatencyModel.from_points(m["ns"], m["times"], m["t_draft"], calibration_s=m["seconds"],
                                             reps=reps, warmup=warmup, tensor_parallel=tp.size)
            _cal.save_cached(key, model)
    blob = _broadcast_object(tp, model.to_dict() if tp.is_leader else None)
    if not tp.is_leader:
        model = LatencyModel.from_dict(blob)
    _MEMO[tag] = model
    return model


def caddtree_policy(target, drafter, max_nodes: int = _cal.DEFAULT_MAX_TREE_BUDGET,
                    latency: LatencyModel | None = None, online: bool = False, calibrate_acceptance: bool = True,
                    **calibrate_kwargs) -> CaDDTreePolicy:
    """`calibrate.caddtree_policy` for any target (calibration through `calibrate` above). On a tensor-parallel
    target every rank gets the same latency model; the budget actually used each round is the leader's
    (its truncated tree is the one `leader_tree` broadcasts)."""
    if not is_tensor_parallel(target):
        return _cal.caddtree_policy(target, drafter, max_nodes, latency=latency, online=online,
                                    calibrate_acceptance=calibrate_acceptance, **calibrate_kwargs)
    if latency is None:
        latency = calibrate(target, drafter, max_nodes, **calibrate_kwargs)
    return CaDDTreePolicy(latency, max_nodes, online=online, calibrate_acceptance=calibrate_acceptance)
