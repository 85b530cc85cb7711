#!/usr/bin/env bash
# The CPU training campaign for the embedded drafter (docs/models.md, "Training campaign"): run it in the
# background while doing other work; every stage is resumable and time-bounded, and it warm-starts from the
# shipped drafter. Nothing is shipped automatically: compare held-out tau of the new and the shipped drafter
# first (`python benchmarks/gpu_run.py eval`, see docs/models.md).
#
#   nice -n 19 bash scripts/train_campaign.sh RUN_DIR RESPONSE_MINUTES TRAIN_MINUTES [SEED]
#
# 1. responses: the target answers new prompts from the three training sources (one process per source,
#    1 thread each, fp32, batched), for RESPONSE_MINUTES (killed then; the JSONL keeps every finished batch);
# 2. features + training: warm-start from the shipped drafter on everything collected (plus the responses of
#    earlier campaigns listed in EARLIER, space-separated JSONL paths; their prompts are not answered again), for
#    TRAIN_MINUTES. Distillation on the target's top-K log-probs is DISTILL_TOPK=K (stored with the features) plus
#    DISTILL_ALPHA=A > 0; off by default: in campaign 3's A/B it trailed hard labels in held-out chain tau
#    (docs/models.md, "Distillation").
#
# FEATURES=DIR: the feature cache to extend (default RUN/drafter/features); pointing it at the previous campaign's
# cache extracts features for the new records only (in that cache's format: with top-K log-probs if it has them).
#
#   EARLIER="runs/campaign2/data/all.jsonl runs/campaign3/data/new_only.jsonl" FEATURES=runs/campaign3/features \
#       nice -n 19 bash scripts/train_campaign.sh runs/campaign4 45 55 4
set -euo pipefail
RUN=${1:?run dir}; RESP_MIN=${2:?response minutes}; TRAIN_MIN=${3:?train minutes}; SEED=${4:-1}
mkdir -p "$RUN/data"
SHIPPED=$(python -c "import hf_ddtree, os; print(os.path.join(os.path.dirname(hf_ddtree.__file__), 'assets/drafters/smollm2-135m'))")
resp() {  # source limit max_new batch
    timeout --signal=INT "${RESP_MIN}m" hf-ddtree make-responses --target smollm2-135m --source "$1" --limit "$2" \
        --seed "$SEED" --modes greedy --max-new-tokens "$3" --batch-size "$4" --dtype fp32 --threads 1 \
        --out "$RUN/data/responses_$1.jsonl" --skip-answered ${EARLIER:-} > "$RUN/data/responses_$1.log" 2>&1 || true
}
resp sharegpt 2000 192 32 &
resp synthetic-math 2000 256 48 &
resp python-stubs 2000 256 48 &
wait
cat ${EARLIER:-} "$RUN"/data/responses_{sharegpt,synthetic-math,python-stubs}.jsonl > "$RUN/data/all.jsonl"
echo "responses: $(wc -l < "$RUN/data/all.jsonl") records"
hf-ddtree train-drafter --target smollm2-135m --target-dtype fp32 --responses "$RUN/data/all.jsonl" --out "$RUN/drafter" \
    --features-dir "${FEATURES:-$RUN/drafter/features}" \
    --layers 2 --block-size 8 --target-layer-ids 1,10,18,27 --init-from-drafter "$SHIPPED" --epochs 2 \
    --batch-tokens 4096 --anchors-per-seq 32 --lr 8e-4 --warmup-steps 5 --threads 2 --seed "$SEED" \
    --eval-every 60 --val-anchors 16 --save-every 30 --max-minutes "$TRAIN_MIN" \
    ${DISTILL_TOPK:+--distill-topk "$DISTILL_TOPK"} --distill-alpha "${DISTILL_ALPHA:-0}" > "$RUN/train.log" 2>&1
echo "done: $RUN/drafter"
