"""What a drafting vocabulary shortlist costs in acceptance, on the embedded pair.

    PYTHONPATH=src python benchmarks/shortlist_acceptance.py --per-set 2 --max-new-tokens 64 \
        --sizes 4096,8192,16384 [--vocab-file DIR_OR_FILE] [--threads 1]

For a few prompts of each bench set (humaneval, gsm8k, mt-bench; greedy), DDTree at --budget with the
full vocabulary and with the first S ids of the ranked shortlist (default: the shipped drafter's
draft_vocab.safetensors). Prints the mean acceptance length per configuration, the fraction of the
target's generated tokens outside each shortlist, and checks every output is token-identical to the
full-vocabulary run (itself identical to stock greedy, see tests/test_lossless.py).
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-set", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--budget", type=int, default=16)
    p.add_argument("--sizes", default="4096,8192,16384")
    p.add_argument("--vocab-file", default=None, help="draft_vocab.safetensors (or its folder); default: shipped")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import hf_ddtree
    from hf_ddtree.data import load_prompts, to_chat_ids
    from hf_ddtree.draft_vocab import load_draft_vocab, set_draft_vocab
    from hf_ddtree.models import default_drafter_dir, load_default_pair

    target, tokenizer, drafter = load_default_pair()
    hf_ddtree.enable(target)
    ranked = load_draft_vocab(args.vocab_file or default_drafter_dir(), target.config.vocab_size)
    sizes = [int(s) for s in args.sizes.split(",")]
    prompts = [pr for name in ("humaneval", "gsm8k", "mt-bench") for pr in load_prompts(name, limit=args.per_set)]
    configs = ["full"] + [f"S={s}" for s in sizes]
    acc = {c: [] for c in configs}
    secs = {c: 0.0 for c in configs}
    generated: list[int] = []
    for pr in prompts:
        ids = to_chat_ids(tokenizer, pr.text)
        ref = None
        for c in configs:
            set_draft_vocab(drafter, None if c == "full" else ranked[: int(c[2:])])
            t0 = time.perf_counter()
            out = target.generate(ids, assistant_model=drafter, tree_budget=args.budget, do_sample=False,
                                  max_new_tokens=args.max_new_tokens, return_dict_in_generate=True)
            secs[c] += time.perf_counter() - t0
            acc[c].extend(out.acceptance_lengths)
            if ref is None:
                ref = out.sequences
                generated.extend(ref[0, ids.shape[1]:].tolist())
            elif not torch.equal(out.sequences, ref):
                raise AssertionError(f"{pr.id}: {c} output differs from the full-vocabulary output")
        print(f"{pr.id}: " + ", ".join(f"{c} tau={sum(acc[c]) / len(acc[c]):.3f}" for c in configs), flush=True)
    set_draft_vocab(drafter, None)
    gen = torch.tensor(generated)
    print(f"\n{len(prompts)} prompts, {gen.numel()} generated tokens, budget {args.budget}, greedy; all outputs identical")
    print(f"{'config':>8s} {'mean acceptance (tokens/round)':>32s} {'rounds':>7s} {'outside shortlist':>18s} {'wall s':>8s}")
    for c in configs:
        if c == "full":
            out_frac = 0.0
        else:
            inside = torch.zeros(target.config.vocab_size, dtype=torch.bool)
            inside[ranked[: int(c[2:])]] = True
            out_frac = float((~inside[gen]).float().mean())
        # acceptance_lengths: tokens committed per round (accepted nodes + the target's own token)
        tau = sum(acc[c]) / len(acc[c])
        print(f"{c:>8s} {tau:32.3f} {len(acc[c]):7d} {out_frac:18.4f} {secs[c]:8.1f}")


if __name__ == "__main__":
    main()
