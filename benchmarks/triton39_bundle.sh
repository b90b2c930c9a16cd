#!/bin/bash
# Packs Triton 3.9 for the device machine (Python 3.12, Triton 3.6 installed, no network), where
# `gpu_check.sh ... triton39` runs the Gluon kernels' GPU tests and GEMM timings under it. The
# cp312 wheel is 273 MiB (its libtriton.so carries debug information), over the device tool's
# 64 MiB carry limit; this keeps what compiling and launching for an NVIDIA GPU needs: the
# Python package, libtriton.so stripped of its debug information, the CUDA headers, libdevice
# and the CUDA 12.9 `ptxas` (the CUDA 13 `ptxas-blackwell` that 3.9 uses for sm_90 and above
# is left out: gpu_check points TRITON_PTXAS_BLACKWELL_PATH at the 12.9 one, whose cubins load
# under the device's CUDA 13.0 driver), without the AMD backend (so TRITON_BACKENDS_IN_TREE=1:
# the installed Triton's entry points name it), Proton and CUPTI. About 47 MiB as .tar.xz. Run here (network), from the repository root; carry the folder:
#
#   bash benchmarks/triton39_bundle.sh [FOLDER]      # default .whl_triton39 (git-ignored)
set -euo pipefail
DST=${1:-.whl_triton39}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  -d "$WORK/whl" "triton==3.9.0"
mkdir -p "$WORK/site"
(cd "$WORK/site" && unzip -q "$WORK"/whl/triton-3.9.0-*.whl)
T="$WORK/site/triton"
rm -rf "$T/backends/amd" "$T/instrumentation" "$T/backends/nvidia/lib/cupti" \
  "$T/backends/nvidia/lib/cupti-blackwell" "$T/backends/nvidia/bin/ptxas-blackwell" \
  "$T/backends/nvidia/bin/cuobjdump" "$T/backends/nvidia/bin/nvdisasm" "$T/_C/libproton.so"
strip --strip-unneeded "$T/_C/libtriton.so"
mkdir -p "$DST"
(cd "$WORK/site" && tar -cf - triton triton-3.9.0.dist-info) | xz -T0 -9 > "$DST/triton-3.9.0-pruned.tar.xz"
ls -la "$DST/triton-3.9.0-pruned.tar.xz"
