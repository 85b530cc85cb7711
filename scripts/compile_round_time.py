"""Eager vs compiled (inductor) round time on the embedded pair: stock AR (dynamic eager, static compiled) and
ddtree:8 eager vs compiled, interleaved in one process. Usage: PYTHONPATH=src python scripts/compile_round_time.py NEW REPS"""
import statistics, sys, time
import torch
from transformers import CompileConfig, GenerationMixin
import hf_ddtree
from hf_ddtree.models import load_default_pair
from hf_ddtree.data import load_prompts, to_chat_ids

torch.set_num_threads(2)
NEW = int(sys.argv[1]) if len(sys.argv) > 1 else 48
REPS = int(sys.argv[2]) if len(sys.argv) > 2 else 2
target, tok, drafter = load_default_pair()
hf_ddtree.enable(target)
p = load_prompts("humaneval", limit=1)[0]
ids = to_chat_ids(tok, p.text)
print("prompt tokens", ids.shape[1], flush=True)
cc = CompileConfig(); cc._compile_all_devices = True
STATIC = dict(cache_implementation="static", compile_config=cc)

def ar(n, compiled):
    kw = STATIC if compiled else {}
    t0 = time.perf_counter(); out = GenerationMixin.generate(target, ids, do_sample=False, max_new_tokens=n, **kw)
    return time.perf_counter() - t0, out

def dd(budget, compiled):
    kw = STATIC if compiled else {}
    t0 = time.perf_counter()
    out = target.generate(ids, assistant_model=drafter, tree_budget=budget, do_sample=False, max_new_tokens=NEW,
                          return_dict_in_generate=True, collect_timing=True, **kw)
    dt = time.perf_counter() - t0
    s = out.stats; r = len(out.acceptance_lengths)
    return dict(round=(dt - s.prefill_s) / r, draft=s.draft_s / r, verify=s.verify_s / r, rounds=r, seq=out.sequences)

configs = [("ar", False), ("ar", True), (8, False), (8, True)]
res = {c: [] for c in configs}
ref = ar(NEW, False)[1]
for c in configs:  # warm-up / compile, untimed
    t0 = time.perf_counter()
    if c[0] == "ar":
        ar(NEW, c[1]); ar(1, c[1])
    else:
        o = dd(c[0], c[1]); assert torch.equal(o["seq"], ref), c
    print("warm", c, f"{time.perf_counter() - t0:.0f}s", flush=True)
for rep in range(REPS):
    for c in configs:
        if c[0] == "ar":
            t_full, out = ar(NEW, c[1]); t_one, _ = ar(1, c[1])
            assert torch.equal(out, ref), c
            res[c].append(dict(round=(t_full - t_one) / (NEW - 1)))
            print(c, res[c][-1], flush=True)
        else:
            o = dd(c[0], c[1]); assert torch.equal(o["seq"], ref), c
            res[c].append(o)
            print(c, {k: v for k, v in o.items() if k != "seq"}, flush=True)
    print("rep", rep, flush=True)
med = lambda c, k: statistics.median(x[k] for x in res[c])
ar_e, ar_c = med(("ar", False), "round"), med(("ar", True), "round")
print(f"AR step eager {ar_e*1e3:.1f} ms, compiled static {ar_c*1e3:.1f} ms (compiled/eager {ar_c/ar_e:.2f})")
for b in (8,):
    for comp in (False, True):
        c = (b, comp); unit = ar_c if comp else ar_e
        print(f"ddtree:{b} {'compiled' if comp else 'eager   '}: round {med(c,'round')*1e3:.1f} ms = {med(c,'round')/unit:.2f} AR steps "
              f"(same setting) / {med(c,'round')/ar_e:.2f} eager AR steps; draft {med(c,'draft')*1e3:.1f} ms, "
              f"verify {med(c,'verify')*1e3:.1f} ms, rounds {res[c][0]['rounds']}")
