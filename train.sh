#!/usr/bin/env bash
# Absolute Zero self-play with the paper's settings (Table 3) on one 8-GPU node.
#
#   bash train.sh                      # Qwen2.5-Coder-3B, 500 steps
#   MODEL=Qwen2.5-Coder-7B bash train.sh
#   MODEL=/path/to/local/hf_dir SEED_FILE=data/7b_coder_seed_io.jsonl bash train.sh
#
# Fitting the model (80 GB GPUs). FSDP2 shards the fp32 weights, gradients and AdamW state over the 8 ranks
# (16 bytes per parameter / 8); each rank also holds a bf16 copy of the full weights for sampling (2 bytes per
# parameter), its KV cache, and activations of one micro-batch (blocks are recomputed in backward). The model
# is loaded in full on each GPU before it is sharded.
#   3B  (Qwen2.5-Coder-3B): fits with room to spare; MICRO_BATCH_TOKENS=32768 is faster.
#   7B  (Qwen2.5-7B, Qwen2.5-Coder-7B, Llama-3.1-8B): fits with the defaults.
#   14B (Qwen2.5-14B, Qwen2.5-Coder-14B): the full fp32 load (59 GB) is the peak, then 7 GB of shards plus a
#       30 GB sampling copy remain; use MICRO_BATCH_TOKENS=8192 (it also shrinks the update's reserve, which
#       leaves more room for the paged KV pool; --kv-cache-gib sets the pool). Not measured here.
# Without SEED_FILE the base model first seeds 256 tasks per buffer (paper Sec. 3.3.1); upstream's released
# seeds are in its repository under data/ (*_seed_io.jsonl and *_code_f_seed_io.jsonl side by side).
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL:-Qwen2.5-Coder-3B}
GPUS=${GPUS:-8}
OUT=${OUT:-runs/$(basename "$MODEL")}
SEED_FILE=${SEED_FILE:-}
MICRO_BATCH_TOKENS=${MICRO_BATCH_TOKENS:-16384}
MAX_RESPONSE_TOKENS=${MAX_RESPONSE_TOKENS:-8096}
EVAL_DATA=${EVAL_DATA:-}

args=(
  --model "$MODEL" --out-dir "$OUT" --device cuda
  --steps 500 --batch-size 64 --n-learnability 8 --k-references 6 --n-induction-inputs 10
  --temperature 1.0 --top-p 1.0 --max-prompt-tokens 6144 --max-response-tokens "$MAX_RESPONSE_TOKENS"
  --lr 1e-6 --weight-decay 0.01 --grad-clip 1.0 --clip-ratio 0.2 --entropy-coef 0.001
  --trivial-proposal-reward 0.0 --exec-timeout 10 --buffer-cap 16384
  --micro-batch-tokens "$MICRO_BATCH_TOKENS" --save-every 10 --resume auto
)
[ -n "$SEED_FILE" ] && args+=(--seed-file "$SEED_FILE")
[ -n "$EVAL_DATA" ] && args+=(--eval-every 10 --eval-data "$EVAL_DATA")

# One executor per node lives on rank 0; give it the CPU cores.
torchrun --standalone --nproc_per_node "$GPUS" azr.py "${args[@]}" "$@"
