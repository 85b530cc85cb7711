"""Stage 2 of drafter training: cache the target's hidden states for every training sequence.

The DFlash drafter reads the target's hidden states at a few layers (`target_layer_ids`). They are
fixed (the target is frozen), so they are computed once here and reused for every epoch:

    extract_features(target, records, "feats/", layer_ids=[1, 14, 27])
    store = FeatureStore("feats/")
    feats, ids, prompt_len = store.get(0)      # (T, len(layer_ids) * H) bf16, (T,) long, int

Each record (one JSONL line of the responses stage: `{"id", "prompt_ids", "response_ids", ...}`)
is run once through the target as `prompt_ids + response_ids` (batch of one, no padding, no grad),
asking for `output_hidden_states=[i + 1 for i in layer_ids]` exactly as `decoding.py` does at
inference (through `compat.hidden_states_request`). The selected layers are concatenated to (T, len(layer_ids) * H) and stored in `dtype`
(bf16 by default, half the disk of fp32).

Disk: T tokens take T * len(layer_ids) * H * 2 bytes in bf16. For SmolLM2-135M with 3 layers that
is 3 x 576 x 2 = 3456 bytes per token, i.e. about 3.5 GB per 1M tokens (fp32 would be 6.9 GB);
for Qwen2.5-0.5B (H=896) 5.4 GB per 1M tokens.

Layout of `out_dir`:
  * `features-00000.safetensors`, ... : one tensor `features` (N, F) per shard; a shard is written
    once at least `shard_tokens` tokens are buffered (and at the end), then never touched again.
  * `index.json`: the model identity, the layer ids, the feature width and dtype, the shard list,
    and per record `{id, shard, offset, length, prompt_len, input_ids}`. It is rewritten
    atomically after every shard, so an interrupted run loses at most the unflushed buffer.

Distillation targets (`topk=K > 0`): the same forward also gives the target's next-token
distribution at every position; its K most likely tokens and their log-probs (full-vocabulary
log-softmax, fp32) are stored next to the features as `topk_ids` (N, K) int32 and `topk_logprobs`
(N, K) float32, row t being the distribution of token t+1. 8 bytes per token per k: K=8 adds 64
bytes to the ~4.6 KB of features per token. `store.topk(i)` reads them back.

Resumable: records whose id is already in the index are skipped (same id with different tokens is
an error). A cache made for another model or other layer ids is refused with a ValueError instead of
being mixed with new features.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..compat import gather_features, hidden_states_request
from .responses import read_records  # noqa: F401  (kept importable from here)

FORMAT = "hf_ddtree-features/1"
INDEX = "index.json"

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _dtype_name(dtype: torch.dtype) -> str:
    for k, v in _DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"unsupported feature dtype {dtype}: use torch.bfloat16, torch.float16 or torch.float32")


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_identity(target) -> dict[str, Any]:
    """What the cache must match: architecture sizes, name and a fingerprint of the embedding weights.

    The fingerprint hashes a few embedding rows rounded to bf16, so the same checkpoint loaded in
    fp32 or bf16 gives the same value while a different checkpoint (or a re-initialised model) does not.
    """
    cfg = _text_config(target.config)
    emb = target.get_input_embeddings().weight.detach()
    rows = emb[: min(16, emb.shape[0])].to(torch.bfloat16).float().cpu().contiguous()
    digest = hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:16]
    return {
        "name_or_path": str(getattr(target.config, "_name_or_path", "") or ""),
        "model_type": str(getattr(cfg, "model_type", "")),
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "hidden_size": int(emb.shape[1]),
        "vocab_size": int(emb.shape[0]),
        "fingerprint": digest,
    }


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def load_index(out_dir: str | os.PathLike) -> dict | None:
    path = Path(out_dir) / INDEX
    if not path.exists():
        return None
    with path.open() as f:
        index = json.load(f)
    if index.get("format") != FORMAT:
        raise ValueError(f"{path} is not an hf_ddtree feature index (format {index.get('format')!r}, expected {FORMAT!r}).")
    return index


def check_index(index: Mapping, *, layer_ids, identity: Mapping | None = None, path: str = "") -> None:
    """Raise ValueError if a cached index was made for other layers or another model."""
    where = f" in {path}" if path else ""
    if [int(i) for i in index["layer_ids"]] != [int(i) for i in layer_ids]:
        raise ValueError(
            f"The feature cache{where} holds target layers {index['layer_ids']} but layers {list(layer_ids)} were "
            "asked for. Use another --features-dir (or delete this one) to extract features for these layers."
        )
    if identity is not None:
        cached = index["model"]
        diff = [k for k in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size", "fingerprint")
                if cached.get(k) != identity.get(k)]
        if diff:
            raise ValueError(
                f"The feature cache{where} was made with another target model ({cached.get('name_or_path')!r}; "
                f"differs in {', '.join(diff)}) than the one given ({identity.get('name_or_path')!r}). "
                "Use another --features-dir (or delete this one)."
            )


@torch.no_grad()
def target_features(target, input_ids: torch.Tensor, layer_ids, topk: int = 0):
    """(T,) token ids -> (T, len(layer_ids) * H) hidden states of the selected target layers (model dtype).

    With topk=K > 0 returns (features, topk_ids (T, K) long, topk_logprobs (T, K) fp32) instead: row t
    is the target's distribution of token t+1 (full-vocabulary log-softmax in fp32, its K largest).
    """
    sel = [int(i) + 1 for i in layer_ids]
    device = next(target.parameters()).device
    ids = input_ids.to(device)[None]
    out = target(input_ids=ids, position_ids=torch.arange(ids.shape[1], device=device)[None],
                 output_hidden_states=hidden_states_request(sel), use_cache=False,
                 logits_to_keep=0 if topk else 1)
    feats = gather_features(out, sel)[0]
    if not topk:
        return feats
    logp = torch.log_softmax(out.logits[0].float(), dim=-1)  # (T, V)
    top = logp.topk(int(topk), dim=-1)
    return feats, top.indices, top.values


def _record_ids(rec: Mapping) -> tuple[list[int], int]:
    prompt = [int(t) for t in rec["prompt_ids"]]
    response = [int(t) for t in rec["response_ids"]]
    return prompt + response, len(prompt)


def extract_features(
    target,
    records: Iterable[Mapping],
    out_dir: str | os.PathLike,
    layer_ids,
    *,
    shard_tokens: int = 1 << 20,
    dtype: torch.dtype = torch.bfloat16,
    max_length: int | None = None,
    topk: int | None = None,
    progress: bool = True,
) -> dict:
    """Run `target` once over each record's prompt+response and cache the selected layers in `out_dir`.

    records: mappings with `id`, `prompt_ids`, `response_ids` (the responses stage's JSONL lines).
    layer_ids: target decoder layers to keep (the drafter's `target_layer_ids`).
    shard_tokens: tokens per safetensors shard (1M tokens of SmolLM2 x 3 layers ~ 3.5 GB in bf16).
    max_length: truncate longer sequences to this many tokens (None: keep all).
    topk: also store the target's K most likely next tokens and their log-probs per position (the
    distillation targets, see the module docstring). None: what an existing cache holds (0 for a new one),
    so a cache is extended in its own format; an explicit K that differs from the cache's is refused.
    Returns the index dict (also written to `out_dir/index.json`). Records already in the index
    are skipped; a cache for other layers or another model raises ValueError.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layer_ids = [int(i) for i in layer_ids]
    identity = model_identity(target)
    n_layers = identity["num_hidden_layers"]
    bad = [i for i in layer_ids if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layer ids {bad} are out of range for a target with {n_layers} layers.")
    index = load_index(out)
    if topk is None:
        topk = int(index.get("topk", 0)) if index is not None else 0
    if index is None:
        index = {
            "format": FORMAT,
            "model": identity,
            "layer_ids": layer_ids,
            "hidden_size": identity["hidden_size"],
            "feature_dim": len(layer_ids) * identity["hidden_size"],
            "dtype": _dtype_name(dtype),
            "topk": int(topk),
            "shards": [],
            "records": [],
        }
    else:
        check_index(index, layer_ids=layer_ids, identity=identity, path=str(out))
        if index["dtype"] != _dtype_name(dtype):
            raise ValueError(f"The feature cache in {out} is stored as {index['dtype']}, not {_dtype_name(dtype)}.")
        if int(index.get("topk", 0)) != int(topk):
            raise ValueError(f"The feature cache in {out} holds the target's top-{index.get('topk', 0)} log-probs per "
                             f"token, not top-{int(topk)}: use another --features-dir (or the same --distill-topk).")

    known = {r["id"]: r for r in index["records"]}
    todo = []
    seen = set()
    for rec in records:
        rid = str(rec["id"])
        ids, plen = _record_ids(rec)
        if max_length is not None:
            ids = ids[:max_length]
        if rid in known:
            if known[rid]["input_ids"] != ids:
                raise ValueError(f"record {rid!r} is cached with other tokens than given now: the responses file changed. "
                                 "Use another --features-dir.")
            continue
        if rid in seen:
            continue
        seen.add(rid)
        if len(ids) < 2 or plen >= len(ids):
            continue  # nothing to learn from: no response token
        todo.append((rid, ids, plen))

    buf: list[torch.Tensor] = []
    buf_ids: list[torch.Tensor] = []
    buf_lp: list[torch.Tensor] = []
    buf_meta: list[dict] = []
    buf_tokens = 0

    def flush():
        nonlocal buf, buf_ids, buf_lp, buf_meta, buf_tokens
        if not buf:
            return
        shard_id = len(index["shards"])
        name = f"features-{shard_id:05d}.safetensors"
        tensors = {"features": torch.cat(buf, 0).contiguous()}
        if topk:
            tensors["topk_ids"] = torch.cat(buf_ids, 0).to(torch.int32).contiguous()  # (N, K)
            tensors["topk_logprobs"] = torch.cat(buf_lp, 0).contiguous()  # (N, K) fp32
        save_file(tensors, str(out / name), metadata={"format": FORMAT})
        index["shards"].append(name)
        for m in buf_meta:
            m["shard"] = shard_id
            index["records"].append(m)
        _atomic_write_json(out / INDEX, index)
        buf, buf_ids, buf_lp, buf_meta, buf_tokens = [], [], [], [], 0

    total = sum(len(ids) for _, ids, _ in todo)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="target features", disable=not progress or not todo)
    was_training = target.training
    target.eval()
    t0 = time.perf_counter()
    try:
        for rid, ids, plen in todo:
            got = target_features(target, torch.tensor(ids, dtype=torch.long), layer_ids, topk)
            if topk:
                got, top_ids, top_lp = got
                buf_ids.append(top_ids.cpu())
                buf_lp.append(top_lp.cpu())
            feats = got.to("cpu", dtype)
            buf_meta.append({"id": rid, "offset": buf_tokens, "length": len(ids), "prompt_len": plen, "input_ids": ids})
            buf.append(feats)
            buf_tokens += len(ids)
            bar.update(len(ids))
            if buf_tokens >= shard_tokens:
                flush()
        flush()
    finally:
        bar.close()
        target.train(was_training)
    index["last_run"] = {"records": len(todo), "tokens": total, "seconds": round(time.perf_counter() - t0, 3)}
    _atomic_write_json(out / INDEX, index)
    return index


class FeatureStore:
    """Read access to an `extract_features` cache: `store.get(i) -> (features (T, F), input_ids (T,), prompt_len)`."""

    def __init__(self, out_dir: str | os.PathLike, *, layer_ids=None, identity: Mapping | None = None):
        self.dir = Path(out_dir)
        index = load_index(self.dir)
        if index is None:
            raise FileNotFoundError(f"no feature cache in {self.dir} (missing {INDEX}): run extract_features first.")
        if layer_ids is not None:
            check_index(index, layer_ids=layer_ids, identity=identity, path=str(self.dir))
        self.index = index
        self.records = index["records"]
        self.layer_ids = [int(i) for i in index["layer_ids"]]
        self.feature_dim = int(index["feature_dim"])
        self.topk_k = int(index.get("topk", 0))  # 0: no distillation targets in this cache
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.records]

    def _handle(self, shard: int):
        h = self._handles.get(shard)
        if h is None:
            h = safe_open(str(self.dir / self.index["shards"][shard]), framework="pt")
            self._handles[shard] = h
        return h

    def features(self, i: int) -> torch.Tensor:
        r = self.records[i]
        return self._handle(r["shard"]).get_slice("features")[r["offset"]: r["offset"] + r["length"]]

    def topk(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Record i's distillation targets: ((T, K) token ids (long), (T, K) fp32 log-probs); row t is token t+1."""
        if not self.topk_k:
            raise ValueError(f"the feature cache in {self.dir} holds no target top-k log-probs: extract features "
                             "with topk > 0 (`hf-ddtree train-drafter --distill-topk K`) into a new --features-dir.")
        r = self.records[i]
        h = self._handle(r["shard"])
        rows = slice(r["offset"], r["offset"] + r["length"])
        return h.get_slice("topk_ids")[rows].long(), h.get_slice("topk_logprobs")[rows]

    def input_ids(self, i: int) -> torch.Tensor:
        return torch.tensor(self.records[i]["input_ids"], dtype=torch.long)

    def prompt_len(self, i: int) -> int:
        return int(self.records[i]["prompt_len"])

    def get(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.features(i), self.input_ids(i), self.prompt_len(i)

    def num_tokens(self) -> int:
        return sum(int(r["length"]) for r in self.records)
