"""A multi-turn chat with DDTree, as a transformers user writes one: the chat template, the cache
carried from turn to turn (each turn prefills only the new message), the answer streamed with
`TextStreamer`, and sampling. Runs offline on the embedded SmolLM2-135M pair:

    python examples/chat.py                      # three canned user turns, sampled
    python examples/chat.py --greedy --max-new-tokens 64 "Hi!" "Tell me more."

With a Hub pair, swap the two loads for
    target = AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-8B", dtype="auto", attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen3-8B")
    drafter = AutoModel.from_pretrained("z-lab/Qwen3-8B-DFlash-b16", trust_remote_code=True, dtype="auto")
"""

import argparse

import torch
from transformers import TextStreamer

import hf_ddtree
from hf_ddtree.compat import CACHE_FIELD  # "cache" from transformers 5.24 (past_key_values= warns there), else "past_key_values"
from hf_ddtree.models import load_default_pair

TURNS = ["Give me three tips for writing clean Python code.",
         "Show the second tip as a short code example.",
         "Summarise our conversation in one sentence."]


def next_turn(tokenizer, conversation_ids, messages):
    """The conversation's ids so far (what the cache holds is their prefix), then the chat template's tokens
    for the new user message and the assistant prompt. The last answer is closed with the template's
    end-of-turn token when generation stopped before it (max_new_tokens)."""
    before = tokenizer.apply_chat_template(messages[:-1], tokenize=False)  # ... answer<|im_end|>\n
    after = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert after.startswith(before), "this chat template re-renders earlier turns; pass the whole text instead"
    end = tokenizer.eos_token  # where the template closes the assistant's turn
    text = before[before.rindex(end) + len(end):] + after[len(before):]  # "\n<|im_start|>user\n...assistant\n"
    close = [] if conversation_ids[0, -1] == tokenizer.eos_token_id else [tokenizer.eos_token_id]
    new = close + tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.cat([conversation_ids, torch.tensor([new], dtype=torch.long)], dim=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("turns", nargs="*", help="the user's messages, one per turn (default: three canned ones)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--tree-budget", type=int, default=16)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    target, tokenizer, drafter = load_default_pair()  # embedded SmolLM2-135M-Instruct + its DFlash drafter, fp32
    hf_ddtree.enable(target)
    torch.manual_seed(args.seed)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = dict(do_sample=False) if args.greedy else dict(do_sample=True, temperature=0.7, top_p=0.9)

    messages, cache, ids, turns = [], None, None, []
    for user in args.turns or TURNS:
        messages.append({"role": "user", "content": user})
        print(f"\n>>> {user}")
        if ids is None:  # turn 1: the template's tokens
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
        else:  # later turns: the conversation so far (its tokens are in the cache) plus the new message
            ids = next_turn(tokenizer, ids, messages)
        out = target.generate(
            ids, assistant_model=drafter, tree_budget=args.tree_budget, max_new_tokens=args.max_new_tokens,
            **sampling, streamer=streamer, return_dict_in_generate=True,
            **{CACHE_FIELD: cache},  # None on turn 1; then the cache the previous turn returned
        )
        cache = getattr(out, CACHE_FIELD)
        answer = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": answer})
        tau = sum(out.acceptance_lengths) / max(1, len(out.acceptance_lengths))  # tokens per target forward
        turns.append((ids, out.sequences, tau))
        ids = out.sequences

    print()
    for turn, (prompt, full, tau) in enumerate(turns, 1):
        print(f"turn {turn}: {prompt.shape[1]} tokens in, {full.shape[1] - prompt.shape[1]} new, "
              f"{tau:.2f} tokens per target forward")
    return turns


if __name__ == "__main__":
    main()
