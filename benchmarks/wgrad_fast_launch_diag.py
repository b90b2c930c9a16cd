"""Diagnostic for the bf16 Gluon weight-gradient kernel (session 34's lead): in
``test_gluon_fast_launch_equals_plain[wgrad_down]`` (after other Gluon launches, blocking
launches) dW_down held values such as 1e-39 / -2e22 in the last expert's last row on the plain
path and on fast launch, for one of two inputs of the same shapes; without blocking launches
the test hit an illegal memory access.

Here dW_down of that test's routing and shapes (n 700, k 2, E 6, F 192, D 320 / 328), on the
plain path and on fast launch, several times, with:
  * the operands inside NaN-filled buffers (an out-of-bounds read shows up as NaN),
  * the output ``c`` a view inside a NaN-filled buffer with guard experts before and after
    (an unwritten element stays NaN; a write outside ``c`` changes a guard),
  * against the Triton segment kernel on the same operands.

    python benchmarks/wgrad_fast_launch_diag.py      (on a Hopper GPU; ~1 min)
"""
import sys

import torch

sys.path.insert(0, "tests")
from test_gpu import _ragged_meta  # noqa: E402

from moe_plugin.kernels import gluon_gemm as GF, grouped_gemm as G, tuning  # noqa: E402
from moe_plugin.kernels.codes import Accum  # noqa: E402

CUDA = "cuda"
g = torch.Generator().manual_seed(29)
n, k, e, f = 700, 2, 6, 192
meta = _ragged_meta(g, n, k, e)
s = meta.sorted_slot.numel()
print("counts", meta.counts.tolist(), "slots", s, "used", int(meta.offsets[-1]), flush=True)
NAN = float("nan")


def padded(rows, cols, pad=256):
    big = torch.full((rows + 2 * pad, cols), NAN, device=CUDA, dtype=torch.bfloat16)
    t = big[pad:pad + rows]
    t.copy_(torch.randn(rows, cols, generator=g).to(CUDA, torch.bfloat16))
    return t


def guarded_out(d):
    big = torch.full((e + 4, d, f), NAN, device=CUDA, dtype=torch.bfloat16)
    return big, big[2:2 + e]


def check(tag, big, got, ref):
    nan = torch.isnan(got)
    guards_written = int((~torch.isnan(big[:2])).sum() + (~torch.isnan(big[2 + e:])).sum())
    wrong = (got != ref) & ~nan
    where = nan.nonzero()
    print(f"{tag}: unwritten (NaN) {int(nan.sum())} at experts "
          f"{sorted(set(where[:, 0].tolist()))}, rows {sorted(set(where[:, 1].tolist()))[:6]}; "
          f"unequal {int(wrong.sum())}; guard elements written {guards_written}", flush=True)


for d in (320, 328):
    for fast in (False, True, True):
        dout, hw = padded(n, d), padded(s, f)
        with tuning.override(gluon_bf16_wgrad=False):
            ref = G.wgrad_down(dout, hw, meta)
        for rep in range(2):
            big, c = guarded_out(d)
            with tuning.override(fast_launch=fast):
                GF.segment_mm_direct(tuning.current(), dout, hw, c, meta, Accum.STORE,
                                     a_gather=True, b_gather=False)
            torch.cuda.synchronize()
            check(f"d={d} fast={fast} rep={rep}", big, c, ref)
        # the public entry point (its own output allocation) as the test calls it
        with tuning.override(fast_launch=fast):
            got = G.wgrad_down(dout, hw, meta)
        torch.cuda.synchronize()
        print(f"d={d} fast={fast} wgrad_down: equal to Triton {torch.equal(got, ref)}, "
              f"non-finite {int((~torch.isfinite(got)).sum())}", flush=True)
