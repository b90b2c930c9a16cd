#!/bin/bash
# One device call's worth of GPU checks of the bf16 expert path, each step's log under OUT_DIR
# (on the device tool's machine: $OUT). Steps run in the order given; each has its own time
# limit (seconds, environment), so one that hangs does not eat the call.
#
#   bash benchmarks/gpu_check.sh OUT_DIR STEP...
#
# The device tool brings back at most 8 files from $OUT: for more than one or two steps pass a
# scratch OUT_DIR and pack it, e.g. `bash benchmarks/gpu_check.sh /tmp/o gluon layer;
# tar -C /tmp/o -cJf $OUT/o.tar.xz .`
#
# Steps:
#   suite     pytest -m gpu tests (SUITE_S, 540; SUITE_TESTS, default tests; megatron-core from
#             the newest .whl/megatron_core-*.whl when megatron is not importable)
#   gluon     the Gluon kernels' GPU tests against the Triton kernels / the split form
#             (GLUON_S, 300)
#   gemms     bench_gemms.py: the row-grouped GEMMs against the Triton ones and the weight
#             gradients under SEG_VARIANTS (GEMMS_S, 240; CONFIGS, default fine_30b mixtral)
#   shapes    bench_gemms.py: each GEMM of the pass at the defaults beside cuBLAS on its shapes,
#             rows spread evenly over the experts (torch.bmm, --bmm) (GEMMS_S; CONFIGS)
#   fused_dh  bench_gemms.py: the bf16 dh' with the activation backward in its epilogue against
#             the split form (GEMMS_S; CONFIGS)
#   wgrad_swap  bench_gemms.py: dW_up computed transposed (gluon_bf16_wgrad_swap, the default)
#             against the untransposed kernel, LAYER_CONFIGS (GEMMS_S)
#   tma_store bench_gemms.py: GEMM2, dx, dh' with the tile stored by TMA (gluon_bf16_config
#             TMA_STORE: 4 = four column parts through small buffers, 4 slots, the default;
#             True = the whole tile staged, 3 slots; 0 = by registers) against the default,
#             LAYER_CONFIGS
#   pingpong  bench_gemms.py: GEMM2, dx, dh' with the consumers on whole 128 x 128 tiles in
#             turn (gluon_bf16_config PINGPONG; 5 and 6 slots) against the default and the
#             cooperative 128 x 128 tile, LAYER_CONFIGS (GEMMS_S)
#   defer     GEMM2 and dx with half of each tile's stores under the next tile's first MMA
#             (tuning.GLUON_BF16_DEFER): its GPU tests beside the default's (GLUON_S), the
#             kernels with it against the defaults (GEMMS_S; LAYER_CONFIGS), the layer with it
#             against the defaults, one process (LAYER_S), and, where ncu is installed, its
#             fine_30b kernels' counters at T 8192 (NCU_S, 90; spill requests: none expected)
#   router    the router's split-form backward GEMMs timed and their rounding checked
#             (router_dx_check.py: pieces_dx / pieces_dw tilings against torch.mm) and the
#             fine_30b layer with its router profiled per kernel (profile_kernels.py --router)
#             (ROUTER_S, 100 each)
#   layer     bench_layer.py: moe_plugin (defaults) against LAYER_IMPLS (default
#             moe_plugin_triton_grouped moe_plugin_plain_launch), one process (LAYER_S, 300;
#             LAYER_CONFIGS, default all five of issue 21), JSON + md
#   triton39  the gluon step's tests and the gemms step's timings under Triton 3.9 (carried as
#             .whl_triton39: benchmarks/triton39_bundle.sh), MOE_PLUGIN_GLUON_UNVERIFIED=1
#   cluster   under Triton 3.9 as triton39 (its Gluon has TMA multicast; 3.6's has not): the
#             GPU tests of the row-grouped GEMMs launched as clusters of two CTAs (GLUON_S),
#             bench_gemms for GEMM1, GEMM2, dh', dx against one CTA a tile, LAYER_CONFIGS
#             (GEMMS_S), and bench_layer's moe_plugin_cluster against the defaults (LAYER_S)
#   peers     bench_layer.py with SonicMoE and ScatterMoE (benchmarks/peers_env.sh; .whl_sonic
#             carried), PEER_CONFIGS (default fine_30b) one at a time (PEERS_S per config,
#             540); QuACK's autotuning results are packed into OUT_DIR/quack_autotune.tar.xz
#             afterwards (commit it as benchmarks/peers/quack_autotune_h200.tar.xz, which
#             peers_env.sh unpacks, so that the next call's autotuner skips what is done);
#             PEER_ROUTER=1 also times the router-included layers (bench_layer --router);
#             PEER_IMPLS: more of ours beside the defaults (e.g. moe_plugin_cluster);
#             PEER_SET: the peers (default "sonicmoe scattermoe grouped_mm");
#             PEER_QUACK_TOP=N: SonicMoE's autotuner times per GEMM role only the N fastest
#             candidates of each committed tuning result (bench_layer.py --quack-top; a
#             fresh config's full tuning does not fit a call);
#             PEER_TRITON39=1: under Triton 3.9 (the triton39 step's bundle, already unpacked
#             by a call right before this one: both bundles do not fit one carry);
#             then benchmarks/peer_targets.py's verdicts into OUT_DIR/targets.md
#   peer_kernels  profile_kernels.py per kernel at the configs' full T, ours and SonicMoE's
#             (--impl sonicmoe, PEER_QUACK_TOP default 3; .whl_sonic carried), routing given
#             and with the routers (--router), PEER_CONFIGS (default fine_30b mixtral)
#             (ROUTER_S per run, 100; SonicMoE's first run compiles)
set -o pipefail
OUT=${1:?usage: gpu_check.sh OUT_DIR STEP...}
shift
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
CONFIGS=${CONFIGS:-fine_30b mixtral}
LAYER_CONFIGS=${LAYER_CONFIGS:-fine_7b fine_30b coarse_120b mixtral qwen3_30b_a3b}
SEG_VARIANTS=${SEG_VARIANTS:-'[{"BN":256,"STAGES":3,"LOAD_REGS":72,"MMA_REGS":216,"MAXNREG":168}]'}

nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,temperature.gpu --format=csv \
  | tee "$OUT/smi.txt"
# which code ran: the device copy's .git may be stale, so a hash of the package's and the
# tests' files (compare with the same command in a checkout)
find moe_plugin tests benchmarks -name '*.py' | LC_ALL=C sort | xargs cat | sha1sum | tee "$OUT/tree.txt"

# the gluon step's tests and the gemms step's timings (also run by the triton39 step), their
# logs under the name given
gluon_tests() {
  timeout "${GLUON_S:-300}" python -m pytest -q -m gpu tests/test_gpu.py tests/test_quant.py \
    -k "gluon or fused_act_bwd" -p no:cacheprovider 2>&1 | tee "$OUT/$1" | tail -8
}
gemm_timings() {
  timeout "${GEMMS_S:-240}" python benchmarks/bench_gemms.py --configs $CONFIGS \
    --against gluon_bf16_grouped gluon_bf16_wgrad --seg-variants "$SEG_VARIANTS" \
    2>&1 | tee "$OUT/$1" | grep -v '^ ' | cut -c1-220
}

# Triton 3.9 for the rest of the (sub)shell: the bundle carried as .whl_triton39 (made by
# benchmarks/triton39_bundle.sh) unpacked once, its CUDA 12.9 ptxas for sm_90, the Gluon
# kernels allowed under it; fails (1) without the bundle
triton39() {
  if [ ! -d /tmp/t39site/triton ]; then
    mkdir -p /tmp/t39site && tar -C /tmp/t39site -xJf .whl_triton39/triton-3.9.0-pruned.tar.xz \
      || { echo "no .whl_triton39 bundle"; return 1; }
  fi
  # the bundle has no AMD backend: the backends found by folder, not by the installed Triton
  # 3.6's entry points
  export PYTHONPATH="/tmp/t39site:$PYTHONPATH" MOE_PLUGIN_GLUON_UNVERIFIED=1 \
    TRITON_BACKENDS_IN_TREE=1 TRITON_CACHE_DIR=/tmp/triton39_cache \
    TRITON_PTXAS_BLACKWELL_PATH=/tmp/t39site/triton/backends/nvidia/bin/ptxas
  python -c "import triton; print('triton', triton.__version__)" | tee -a "$OUT/triton39.txt"
}

for step in "$@"; do
  echo "=== $step"
  case $step in
    suite)
      # the newest megatron-core wheel carried (one: two versions of a package conflict)
      whl=$(ls .whl/megatron_core-*.whl 2>/dev/null | sort -V | tail -1)
      if ! python -c "import megatron.core" 2>/dev/null && [ -n "$whl" ]; then
        pip install -q --no-index --no-deps --target /tmp/site "$whl" 2>&1 | tail -1
        export PYTHONPATH="/tmp/site:$PYTHONPATH"
      fi
      timeout "${SUITE_S:-540}" python -m pytest -q -rs -m gpu ${SUITE_TESTS:-tests} \
        -p no:cacheprovider --durations=10 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40 ;;
    gluon)
      gluon_tests pytest_gluon.log ;;
    gemms)
      gemm_timings gemms.log ;;
    router)
      timeout "${ROUTER_S:-100}" python benchmarks/router_dx_check.py 2>&1 \
        | tee "$OUT/router_dx.log" | tail -30
      timeout "${ROUTER_S:-100}" python benchmarks/profile_kernels.py --configs fine_30b \
        --router --steps 3 2>&1 | tee "$OUT/profile_router.log" | head -30 ;;
    shapes)
      timeout "${GEMMS_S:-240}" python benchmarks/bench_gemms.py --configs $CONFIGS \
        --kernels up down dh dx wgrad_down wgrad_up --against --bmm \
        2>&1 | tee "$OUT/gemms_shapes.log" | grep -v '^ ' | cut -c1-220 ;;
    fused_dh)
      timeout "${GEMMS_S:-240}" python benchmarks/bench_gemms.py --configs $CONFIGS \
        --kernels dh --enable gluon_bf16_fuse_act_bwd --against gluon_bf16_fuse_act_bwd \
        2>&1 | tee "$OUT/gemms_fused_dh.log" | grep -v '^ ' | cut -c1-220 ;;
    wgrad_swap)
      timeout "${GEMMS_S:-240}" python benchmarks/bench_gemms.py --configs $LAYER_CONFIGS \
        --kernels wgrad_up --against gluon_bf16_wgrad_swap \
        2>&1 | tee "$OUT/gemms_wgrad_swap.log" | grep -v '^ ' | cut -c1-220 ;;
    tma_store)
      timeout "${GEMMS_S:-240}" python benchmarks/bench_gemms.py --configs $LAYER_CONFIGS \
        --kernels down dx dh --against \
        --grouped-variants '[{"TMA_STORE": 0}, {"TMA_STORE": true, "STAGES": 3}, {"TMA_STORE": 0, "STAGES": 3}]' \
        2>&1 | tee "$OUT/gemms_tma_store.log" | grep -v '^ ' | cut -c1-220 ;;
    defer)
      timeout "${GLUON_S:-300}" python -m pytest -q -m gpu tests/test_gpu.py \
        -k "grouped_equals_triton and (defer or tma_parts)" -p no:cacheprovider 2>&1 \
        | tee "$OUT/pytest_defer.log" | tail -4
      timeout "${GEMMS_S:-240}" python benchmarks/bench_gemms.py --configs $LAYER_CONFIGS \
        --kernels down dx --against \
        --grouped-variants '[{"DEFER": true}]' \
        2>&1 | tee "$OUT/gemms_defer.log" | grep -v '^ ' | cut -c1-220
      timeout "${LAYER_S:-300}" python benchmarks/bench_layer.py \
        --impls moe_plugin moe_plugin_defer --configs $LAYER_CONFIGS \
        --json "$OUT/layer_defer.json" --md "$OUT/layer_defer.md" 2>&1 \
        | tee "$OUT/layer_defer.log" | tail -8
      # its kernels' hardware counters (spill requests: none expected), where ncu is installed
      if command -v ncu >/dev/null; then
        timeout "${NCU_S:-90}" ncu --profile-from-start off --clock-control none \
          --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis \
          -k regex:'_grouped_mm_ws' python benchmarks/ncu_layer.py --config fine_30b \
          --impl moe_plugin_defer --tokens 8192 > "$OUT/ncu_defer.log" 2>&1
        grep -E "Duration|SM Busy|Local Memory Spilling Requests " "$OUT/ncu_defer.log"
      fi ;;
    pingpong)
      timeout "${GEMMS_S:-240}" python benchmarks/bench_gemms.py --configs $LAYER_CONFIGS \
        --kernels down dx dh --against \
        --grouped-variants '[{"PINGPONG": true, "BN": 128, "STAGES": 5, "TMA_STORE": 0}, {"PINGPONG": true, "BN": 128, "STAGES": 6, "TMA_STORE": 0}, {"BN": 128, "STAGES": 5, "TMA_STORE": 0}]' \
        2>&1 | tee "$OUT/gemms_pingpong.log" | grep -v '^ ' | cut -c1-220 ;;
    layer)
      timeout "${LAYER_S:-300}" python benchmarks/bench_layer.py \
        --impls moe_plugin ${LAYER_IMPLS:-moe_plugin_triton_grouped moe_plugin_plain_launch} \
        --configs $LAYER_CONFIGS \
        --json "$OUT/layer.json" --md "$OUT/layer.md" 2>&1 | tee "$OUT/layer.log" | tail -14 ;;
    peers)
      # shellcheck disable=SC1091
      # (the folder named: a sourced script without arguments sees this script's)
      source benchmarks/peers_env.sh .whl_sonic || { echo "peers_env.sh failed"; continue; }
      if [ "${PEER_TRITON39:-0}" = 1 ]; then triton39 || continue; fi
      # PEER_QUACK_TOP=N: SonicMoE's autotuning on shortlists (bench_layer.py --quack-top)
      _top=${PEER_QUACK_TOP:+--quack-top $PEER_QUACK_TOP}
      for c in ${PEER_CONFIGS:-fine_30b}; do
        timeout "${PEERS_S:-540}" python benchmarks/bench_layer.py $_top \
          --impls moe_plugin ${PEER_IMPLS:-} ${PEER_SET:-sonicmoe scattermoe grouped_mm} \
          --configs "$c" \
          --json "$OUT/peers_$c.json" --md "$OUT/peers_$c.md" 2>&1 \
          | tee "$OUT/peers_$c.log" | tail -8
        if [ "${PEER_ROUTER:-0}" = 1 ]; then  # the router-included layers, same process
          timeout "${PEERS_S:-540}" python benchmarks/bench_layer.py --router $_top \
            --impls moe_plugin sonicmoe --configs "$c" --json "$OUT/peers_router_$c.json" \
            2>&1 | tee "$OUT/peers_router_$c.log" | tail -6
        fi
      done
      # issue 21's targets from this call's runs (each ratio within one run)
      python benchmarks/peer_targets.py "$OUT"/peers_*.json --md "$OUT/targets.md" \
        | grep -v "not measured" | head -30
      # the autotuning results only (JSON; the compiled candidates are rebuilt on demand), one
      # small file: the device tool brings back at most 8 files of 16 MiB
      (cd "$QUACK_CACHE_DIR" && find . -name '*.json' -print0 \
         | tar -cJf "$OUT/quack_autotune.tar.xz" --null -T -) ;;
    peer_kernels)
      # shellcheck disable=SC1091
      source benchmarks/peers_env.sh .whl_sonic || { echo "peers_env.sh failed"; continue; }
      for c in ${PEER_CONFIGS:-fine_30b mixtral}; do
        for run in "" "--router" "--impl sonicmoe" "--impl sonicmoe --router"; do
          tag=$(echo "${run:-ours}" | tr -d ' -')
          # shellcheck disable=SC2086
          timeout "${ROUTER_S:-100}" python benchmarks/profile_kernels.py --configs "$c" \
            --steps 3 --quack-top "${PEER_QUACK_TOP:-3}" $run 2>&1 \
            | tee "$OUT/profile_${c}_$tag.log" | grep -E '"(config|kernel)"' | head -14
        done
      done ;;
    triton39)
      # the Gluon GPU tests and the gemms step's timings under Triton 3.9, in a subshell so
      # that later steps run under the device's own Triton
      (
        triton39 || exit 0
        gluon_tests pytest_gluon_triton39.log
        gemm_timings gemms_triton39.log
      ) ;;
    cluster)
      (
        triton39 || exit 0
        timeout "${GLUON_S:-300}" python -m pytest -q -m gpu tests/test_gpu.py \
          -k "(grouped_equals_triton or up_equals_triton) and cluster" -p no:cacheprovider 2>&1 \
          | tee "$OUT/pytest_cluster.log" | tail -8
        timeout "${GEMMS_S:-240}" python benchmarks/bench_gemms.py --configs $LAYER_CONFIGS \
          --kernels up down dh dx --against \
          --grouped-variants '[{"CLUSTER": 2, "TMA_STORE": 0}, {"CLUSTER": 2, "BN": 128, "STAGES": 6, "TMA_STORE": 0}, {"CLUSTER": 2, "PINGPONG": true, "BN": 128, "STAGES": 5, "TMA_STORE": 0}]' \
          2>&1 | tee "$OUT/gemms_cluster.log" | grep -v '^ ' | cut -c1-220
        timeout "${LAYER_S:-300}" python benchmarks/bench_layer.py \
          --impls moe_plugin moe_plugin_cluster --configs $LAYER_CONFIGS \
          --json "$OUT/layer_cluster.json" --md "$OUT/layer_cluster.md" 2>&1 \
          | tee "$OUT/layer_cluster.log" | tail -14
      ) ;;
    *)
      echo "unknown step: $step" >&2; exit 2 ;;
  esac
done
