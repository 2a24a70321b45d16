#!/usr/bin/env bash
# GPU check on one H100/H200, in under 8 minutes: the CUDA tests (the static decode engine's CUDA graphs against its
# eager fixed-shape step, the speculative engine's graphs against its scripted rounds, no recapture across skip
# sets), the decode table per engine at a Qwen2-0.5B-class shape
# (24 layers x 896 hidden, 14 heads, 2 KV heads, MLP 4864; built from its config with the embedded tokenizer, no
# hub) in bf16 at 64 and 256 rows, with the bytes read as a fraction of the measured copy bandwidth, and the whole
# RL step.
#
#   pip install -e .  (a CUDA build of torch; flash-attn optional)   then   scripts/gpu_check.sh [OUT_DIR]
#
# Each part's table is written to OUT_DIR (default gpu_check/) and echoed.
set -euo pipefail
out=${1:-gpu_check}
mkdir -p "$out"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"

echo "== CUDA tests (bf16, flash-attention-2 when installed, compaction, chunked head, shared-prompt forward)"
python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.txt"

model="$out/qwen2_0.5b_class"
python - "$model" <<'PY'
import sys
from nested_reft_ds.config import ModelConfig
from nested_reft_ds.model import build_tiny_model
build_tiny_model(ModelConfig(arch="qwen2", num_layers=24, hidden_size=896, num_heads=14, num_kv_heads=2,
                             intermediate_size=4864), sys.argv[1], seed=0)
PY

echo "== decode per engine (CUDA graphs, static (TorchScript loop), static_eager, reference) and transformers' generate (bf16, 64 rows x 256 tokens)"
nested-reft bench decode --model "$model" --batch-size 64 --prompt-length 40 --new-tokens 256 --ratios 0,0.5 \
  --engines static_graphs,static,static_eager,reference --anchors hf-dynamic --repeats 1 --dtype bfloat16 --device cuda \
  2>&1 | tee "$out/decode_64.txt"
echo "== decode at 256 rows: the bandwidth end (bf16, 256 rows x 256 tokens)"
nested-reft bench decode --model "$model" --batch-size 256 --prompt-length 40 --new-tokens 256 --ratios 0,0.5 \
  --engines static_graphs,static --anchors "" --repeats 1 --dtype bfloat16 --device cuda --no-profile \
  2>&1 | tee "$out/decode_256.txt"

echo "== speculative sampling against full and nested decoding (bf16, 2 problems x G = 32): CUDA graphs (the verify"
echo "   forward of g + 1 tokens captured per bucket), then the TorchScript loop"
for engine in static_graphs static; do
  nested-reft bench speculative --model "$model" --ratios 0.5,0.75 --drafts 3,4 --prompts 2 --group-size 32 \
    --repeats 1 --engine "$engine" --device cuda --dtype bfloat16 2>&1 | tee "$out/speculative_$engine.txt"
done

echo "== the whole RL step: each saving alone and all together, skip 0 / 0.25 / 0.5 (bf16, 16 prompts x G=8)"
nested-reft bench step --model "$model" --prompts 16 --group-size 8 --max-new-tokens 256 --micro-batch-size 32 \
  --repeats 1 --set train.precision=bf16 --set model.attn_implementation=auto 2>&1 | tee "$out/bench_step.txt"
