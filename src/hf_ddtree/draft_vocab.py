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

import torch

# the shortlist format and its use by a drafter live with the drafter (core code that knows no tooling)
from .drafter.vocab import (DRAFT_VOCAB_FILE, attach_draft_vocab, check_draft_vocab, load_draft_vocab,
                            save_draft_vocab, set_draft_vocab)

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
