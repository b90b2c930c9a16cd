# Installs the optional peers of bench_layer.py (SonicMoE, ScatterMoE) on a machine without
# network, from a folder carried with the repository (default .whl_sonic, git-ignored):
#   sonic-moe 0.1.2.post1, quack-kernels 0.3.11, nvidia-cutlass-dsl 4.4.2, apache-tvm-ffi,
#   torch-c-dlpack-ext as wheels; nvidia-cutlass-dsl-libs-base 4.4.2 unpacked and repacked
#   as cutlass_dsl_libs_base-4.4.2-unpacked.tar.xz (its wheel is over the 64 MiB carry
#   limit); ScatterMoE's source as scattermoe_src/ (github.com/shawntan/scattermoe).
# Usage, from the repository root:  source benchmarks/peers_env.sh [FOLDER]
#
# SonicMoE's GEMMs (QuACK) autotune per shape, compiling every candidate on a fresh machine
# (minutes per config). With QUACK_CACHE_AUTOTUNING=1 each autotuned function's result is kept
# as a small JSON file under QUACK_CACHE_DIR (with the compiled objects) as soon as it is
# tuned, so a run cut short keeps what it finished: `gpu_check.sh ... peers` packs those JSON
# files into $OUT/quack_autotune.tar.xz; put that file into FOLDER (carried) and this script
# unpacks it into QUACK_CACHE_DIR for the next call, whose autotuner then skips what is
# cached; commit it as benchmarks/peers/quack_autotune_h200.tar.xz to keep it for later
# sessions (the tool's checkouts do not keep ignored folders). QUACK_COMPILE_WORKERS: parallel
# compiles.
_peers_src="${1:-.whl_sonic}"
_peers_dst=/tmp/peers
mkdir -p "$_peers_dst"
"${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --target "$_peers_dst" \
  "$_peers_src"/*.whl || return 1
tar -C "$_peers_dst" -xJf "$_peers_src"/cutlass_dsl_libs_base-4.4.2-unpacked.tar.xz || return 1
# the libs wheel's .pth adds its python_packages folder; --target installs skip .pth files
export PYTHONPATH="$_peers_dst:$_peers_dst/nvidia_cutlass_dsl/python_packages:$PWD/$_peers_src/scattermoe_src:${PYTHONPATH:-}"
export QUACK_CACHE_AUTOTUNING=1
export QUACK_CACHE_DIR="${QUACK_CACHE_DIR:-$PWD/$_peers_src/quack_cache}"
export QUACK_COMPILE_WORKERS="${QUACK_COMPILE_WORKERS:-$(nproc)}"
mkdir -p "$QUACK_CACHE_DIR"
# the committed results (benchmarks/peers/quack_autotune_h200.tar.xz: an H200, these wheels),
# then the carried ones (newer: they overwrite)
for _tuned in benchmarks/peers/quack_autotune_h200.tar.xz "$_peers_src/quack_autotune.tar.xz"; do
  if [ -f "$_tuned" ]; then
    tar -C "$QUACK_CACHE_DIR" -xJf "$_tuned" || return 1
  fi
done
