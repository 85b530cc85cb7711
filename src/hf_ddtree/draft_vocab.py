"""Drafting vocabulary shortlists (FR-Spec style): draft over the S most frequent target tokens only.

A DDTree round needs only each block position's top-k draft tokens, but the drafter's head is the
target's (V, H) lm_head applied to every block position; for a small target that head is most of a
drafter forward. With a shortlist the drafter computes logits for S frequency-ranked tokens only,
renormalises its distribution over them, and the tree is built from those S candidates.
Verification is untouched (the target checks every node with its full vocabulary), so decoding
stays exact; a token outside the shortlist can still be produced, as the target's correction
token after a rejection, it just can never be drafted.

The ranking comes from token counts of text the target itself generated (`response_ids` of the
training JSONL, `hf-ddtree make-responses`), optionally plus tokenised prompt text:

    hf-ddtree draft-vocab --responses runs/x/data/*.jsonl --size 16384 --out DRAFTER_DIR

It ships next to the drafter's weights as `draft_vocab.safetensors` (one int32 tensor
`token_ids`, most frequent first); the drafter's config field `draft_vocab_size` (an int, 0 or
absent = full vocabulary) says how many of the ranked ids the drafter uses. The loaders
(`models.load_default_drafter`, `hub.load_drafter`) attach it to the model as
`drafter.draft_vocab_ids`; `set_draft_vocab(drafter, None)` turns it off.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = [
    "DRAFT_VOCAB_FILE",
    "attach_draft_vocab",
    "build_draft_vocab",
    "check_draft_vocab",
    "count_tokens",
    "load_draft_vocab",
    "rank_tokens",
    "response_token_ids",
    "save_draft_vocab",
    "set_draft_vocab",
]

DRAFT_VOCAB_FILE = "draft_vocab.safetensors"
_KEY = "token_ids"


def count_tokens(sequences: Iterable[Iterable[int]], vocab_size: int) -> torch.Tensor:
    """(V,) int64 occurrence counts of every token id over `sequences` (ids outside [0, V) are an error)."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for seq in sequences:
        ids = torch.as_tensor(list(seq), dtype=torch.int64)
        if ids.numel() == 0:
            continue
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise ValueError(
                f"token id {int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())} is outside the "
                f"vocabulary [0, {vocab_size}): count tokens of the target's own tokenizer, with its vocab_size."
            )
        counts += torch.bincount(ids, minlength=vocab_size)
    return counts


def rank_tokens(counts: torch.Tensor, size: int, always: Iterable[int] = ()) -> torch.Tensor:
    """(S,) int64 token ids: `always` first (in the given order), then the rest by count descending,
    ties broken by the smaller id (deterministic). S = min(size, V)."""
    vocab = counts.numel()
    if size < 1:
        raise ValueError(f"draft vocabulary size must be >= 1, got {size}.")
    forced = list(dict.fromkeys(int(i) for i in always))
    bad = [i for i in forced if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"`always` ids {bad} are outside the vocabulary [0, {vocab}).")
    ids = torch.arange(vocab)
    # sort by (-count, id): a stable sort on id order by descending count keeps ties in id order
    order = torch.sort(counts.to(torch.int64), descending=True, stable=True).indices
    rest = ids[order]
    if forced:
        keep = torch.ones(vocab, dtype=torch.bool)
        keep[forced] = False
        rest = torch.cat([torch.tensor(forced, dtype=torch.int64), rest[keep[rest]]])
    return rest[: min(size, vocab)].clone()


def response_token_ids(paths: Iterable[str | os.PathLike], with_prompts: bool = False) -> Iterable[list[int]]:
    """Token-id lists from response JSONL files (`response_ids`, plus `prompt_ids` if `with_prompts`).
    A torn last line (an interrupted writer) ends that file's records (`training.responses.read_records`)."""
    from .training.responses import read_records

    for path in paths:
        for rec in read_records(path):
            if with_prompts:
                yield rec.get("prompt_ids", [])
            yield rec["response_ids"]


def build_draft_vocab(sequences: Iterable[Iterable[int]], vocab_size: int, size: int,
                      always: Iterable[int] = ()) -> torch.Tensor:
    """(S,) int64 ids of the `size` most frequent tokens of `sequences`, `always` (e.g. EOS) first."""
    return rank_tokens(count_tokens(sequences, vocab_size), size, always)


def check_draft_vocab(ids, vocab_size: int, what: str = "draft vocabulary") -> torch.Tensor:
    """Validate a shortlist: a non-empty 1-D integer tensor of distinct ids in [0, vocab_size).
    Returns it as int64. Raises ValueError naming the problem and the fix."""
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{what} must be a non-empty 1-D integer tensor of token ids, got shape "
                         f"{tuple(ids.shape)} and dtype {ids.dtype}.")
    ids = ids.to(torch.int64)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"{what} holds token id {hi if hi >= vocab_size else lo}, outside the target vocabulary "
            f"[0, {vocab_size}): it was built for another tokenizer. Rebuild it with `hf-ddtree draft-vocab` "
            "for this target, or drop it (`set_draft_vocab(drafter, None)` / remove `draft_vocab_size`)."
        )
    if torch.unique(ids).numel() != ids.numel():
        raise ValueError(f"{what} lists some token ids twice: rebuild it with `hf-ddtree draft-vocab`.")
    return ids


def save_draft_vocab(ids: torch.Tensor, folder: str | os.PathLike) -> Path:
    """Write `ids` (ranked) as int32 tensor `token_ids` to `folder/draft_vocab.safetensors`."""
    from safetensors.torch import save_file

    path = Path(folder) / DRAFT_VOCAB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({_KEY: torch.as_tensor(ids).to(torch.int32).contiguous()}, str(path))
    return path


def load_draft_vocab(path: str | os.PathLike, vocab_size: int | None = None, size: int | None = None) -> torch.Tensor:
    """(S,) int64 ranked ids from a draft_vocab.safetensors file (or a folder holding one); the first
    `size` of them if given. Validated against `vocab_size` when given."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / DRAFT_VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No draft vocabulary at {path}: build one with `hf-ddtree draft-vocab --out "
                                f"{path.parent}`, or remove `draft_vocab_size` from the drafter's config.")
    tensors = load_file(str(path))
    if _KEY not in tensors:
        raise ValueError(f"{path} has no `{_KEY}` tensor (found {sorted(tensors)}): rebuild it with "
                         "`hf-ddtree draft-vocab`.")
    ids = tensors[_KEY].to(torch.int64)
    if size is not None:
        if size < 1 or size > ids.numel():
            raise ValueError(f"draft_vocab_size={size} but {path} ranks {ids.numel()} tokens: use a size in "
                             f"[1, {ids.numel()}] or rebuild the file with a larger --size.")
        ids = ids[:size]
    if vocab_size is not None:
        ids = check_draft_vocab(ids, vocab_size, what=f"draft vocabulary {path}")
    return ids


def set_draft_vocab(drafter, ids) -> None:
    """Use the shortlist `ids` (1-D token ids) in `drafter`'s draft head from now on; None: full vocabulary.
    Checked against the target when generate() validates the pair."""
    drafter.draft_vocab_ids = None if ids is None else torch.as_tensor(ids).to(torch.int64)


def attach_draft_vocab(drafter, folder: str | os.PathLike | None, vocab_size: int | None = None) -> None:
    """If `drafter.config.draft_vocab_size` is a positive int, load that many ranked ids from
    `folder/draft_vocab.safetensors` and attach them (`set_draft_vocab`); else leave the drafter as is."""
    size = getattr(drafter.config, "draft_vocab_size", None)
    if not size:
        return
    if folder is None:
        raise ValueError("the drafter's config sets draft_vocab_size but its folder is unknown: call "
                         "set_draft_vocab(drafter, load_draft_vocab(folder, size=...)) yourself.")
    set_draft_vocab(drafter, load_draft_vocab(folder, vocab_size, int(size)))


def draft_vocab_main(argv=None) -> int:
    """`hf-ddtree draft-vocab`: rank the target's tokens by frequency and write draft_vocab.safetensors."""
    p = argparse.ArgumentParser(prog="hf-ddtree draft-vocab", description=(
        "Build a drafting vocabulary shortlist (FR-Spec): the --size most frequent target tokens in "
        "target-generated responses (--responses JSONL from `hf-ddtree make-responses`) and/or tokenised "
        "training prompts (--sources), written as <out>/draft_vocab.safetensors. Set the drafter config's "
        "draft_vocab_size to use it."))
    p.add_argument("--target", default="smollm2-135m", help="known target or model dir (its tokenizer and vocab)")
    p.add_argument("--responses", nargs="*", default=[], help="response JSONL files (response_ids are counted)")
    p.add_argument("--with-prompts", action="store_true", help="also count the JSONL prompt_ids")
    p.add_argument("--sources", default="", help="comma-separated training prompt sources to tokenise and count")
    p.add_argument("--source-limit", type=int, default=2000, help="prompts per source")
    p.add_argument("--size", type=int, default=16384)
    p.add_argument("--out", required=True, help="folder for draft_vocab.safetensors (the drafter's folder)")
    args = p.parse_args(argv)
    if not args.responses and not args.sources:
        p.error("give --responses and/or --sources")
    from transformers import AutoTokenizer

    from .models import TARGETS, _ensure_converted

    path = str(_ensure_converted(args.target, None)) if args.target in TARGETS else args.target
    tok = AutoTokenizer.from_pretrained(path)
    vocab = len(tok)
    seqs: list[list[int]] = list(response_token_ids(args.responses, args.with_prompts))
    if args.sources:
        from .data import load_training_prompts
        from .training.responses import chat_ids

        for src in args.sources.split(","):
            for pr in load_training_prompts(limit=args.source_limit, source=src.strip()):
                seqs.append(chat_ids(tok, pr.text))
    always = [i for i in (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) if i is not None]
    from transformers import AutoConfig

    vocab = max(vocab, int(AutoConfig.from_pretrained(path).vocab_size))
    counts = count_tokens(seqs, vocab)
    ids = rank_tokens(counts, args.size, always)
    out = save_draft_vocab(ids, args.out)
    covered = counts[ids].sum().item() / max(1, counts.sum().item())
    print(f"{out}: {ids.numel()} ids from {len(seqs)} sequences, {int(counts.sum())} tokens "
          f"({int((counts > 0).sum())} distinct); the shortlist covers {covered:.4f} of them")
    return 0
