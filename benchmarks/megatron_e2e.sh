#!/bin/bash
# End-to-end benchmark of issue 7 on GPUs: the same Megatron-Core GPT-MoE model trained with
# stock Megatron-Core MoE (local spec, SequentialMLP experts) and with moe_plugin, one after the
# other in one job, then compared by benchmarks/compare_pretrain_runs.py (tokens/s, TFLOP/s per
# GPU, peak memory, loss curves in one PNG).
#
#   bash benchmarks/megatron_e2e.sh OUT_DIR [NPROC] [EP]      # defaults: 1 GPU, EP 1
#   ITERS=200 EXTRA="--moe-plugin-quant fp8_block" bash benchmarks/megatron_e2e.sh out 1 1
#
# Model (issue 7): d_model 1024, 16 heads, 24 layers (the first dense with FFN 4096, the rest
# MoE), 8 routed experts of FFN 1536 + 1 shared expert of FFN 1536, top-2 softmax, vocab 50304,
# sequence 1024, micro-batch 8. Environment: ITERS (200), LOG_INTERVAL (20), TLIM (seconds per
# run, 280), PORT (29511), EXTRA (more flags for the plugin run only), ATTENTION (sdpa:
# PyTorch's fused attention for both runs; megatron: Megatron's unfused DotProductAttention),
# PROFILE=1 (each run also writes a torch.profiler table of two iterations, ${impl}_profile.txt),
# BOTH (more flags for every run, e.g. "--cross-entropy-fusion"), GRAPH=1 (a third run:
# moe_plugin with --cuda-graph, each micro-batch's forward + backward replayed as one graph).
set -o pipefail
OUT=${1:?usage: megatron_e2e.sh OUT_DIR [NPROC] [EP]}
NPROC=${2:-1}
EP=${3:-1}
mkdir -p "$OUT"
HERE=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1
ITERS=${ITERS:-200}
GBS=$((8 * NPROC))
COMMON="--num-layers 24 --hidden-size 1024 --num-attention-heads 16 --first-dense-layers 1
 --ffn-hidden-size 4096 --num-experts 8 --moe-ffn-hidden-size 1536
 --moe-shared-expert-intermediate-size 1536 --moe-router-topk 2 --vocab-size 50304
 --seq-length 1024 --micro-batch-size 8 --global-batch-size $GBS --train-iters $ITERS
 --log-interval ${LOG_INTERVAL:-20} --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 20
 --expert-model-parallel-size $EP"
IMPLS="stock plugin"
[ -n "${GRAPH:-}" ] && IMPLS="$IMPLS plugin_graph"
for impl in $IMPLS; do
  flags="--attention ${ATTENTION:-sdpa} ${BOTH:-}"
  [ "$impl" != stock ] && flags="$flags --moe-use-plugin ${EXTRA:-}"
  [ "$impl" = plugin_graph ] && flags="$flags --cuda-graph"
  [ -n "${PROFILE:-}" ] && flags="$flags --profile $OUT/${impl}_profile.txt"
  # shellcheck disable=SC2086
  timeout "${TLIM:-280}" torchrun --nproc_per_node="$NPROC" --master_addr=127.0.0.1 \
      --master_port="${PORT:-29511}" "$HERE/examples/pretrain_gpt_moe.py" $flags $COMMON \
      --log-json "$OUT/${impl}.json" --plot "$OUT/${impl}.png" 2>&1 | tr '\r' '\n' \
      | grep -v '^\[#*\.*\]' | tee "$OUT/${impl}.log" | grep -E "^iter|Error|error" | tail -12
done
RUNS="stock=$OUT/stock.json moe_plugin=$OUT/plugin.json"
[ -n "${GRAPH:-}" ] && RUNS="$RUNS moe_plugin_cuda_graph=$OUT/plugin_graph.json"
# shellcheck disable=SC2086
python3 "$HERE/benchmarks/compare_pretrain_runs.py" $RUNS --md "$OUT/e2e.md" \
    --png "$OUT/e2e_loss.png"
