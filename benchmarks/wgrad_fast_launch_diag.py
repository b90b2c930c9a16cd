"""Diagnostic (session 34): does the bf16 Gluon weight-gradient kernel (dW_down, the form of
``test_gluon_fast_launch_equals_plain[wgrad_down]``) leave output unwritten or read outside its
operands, on the plain path and on fast launch? Output pre-filled with NaN; operands inside
NaN-padded buffers; against the Triton kernel."""
import sys

import torch

sys.path.insert(0, "tests")
from test_gpu import _ragged_meta  # noqa: E402

from moe_plugin.kernels import grouped_gemm as G, tuning  # noqa: E402

CUDA = "cuda"
g = torch.Generator().manual_seed(29)
n, k, e, f = 700, 2, 6, 192
meta = _ragged_meta(g, n, k, e)
s = meta.sorted_slot.numel()
print("counts", meta.counts.tolist(), "slots", s, "used", int(meta.offsets[-1]))


def padded(rows, cols, pad=256):
    big = torch.full((rows + 2 * pad, cols), float("nan"), device=CUDA, dtype=torch.bfloat16)
    t = big[pad:pad + rows]
    t.copy_(torch.randn(rows, cols, generator=g).to(CUDA, torch.bfloat16))
    return t


def report(tag, got, ref):
    nan = torch.isnan(got)
    bad = (got != ref) & ~nan
    where = nan.nonzero()
    print(f"{tag}: nan {int(nan.sum())} (experts {sorted(set(where[:, 0].tolist()))[:8]}), "
          f"unequal {int(bad.sum())}, equal {torch.equal(got, ref)}", flush=True)


for d in (320, 328):
    for fast in (False, True):
        outs = []
        for rep in range(3):
            dout, hw = padded(n, d), padded(s, f)
            with tuning.override(gluon_bf16_wgrad=False):
                ref = G.wgrad_down(dout, hw, meta)
            c = torch.full((e, d, f), float("nan"), device=CUDA, dtype=torch.bfloat16)
            with tuning.override(fast_launch=fast):
                got = G.wgrad_down(dout, hw, meta)
            torch.cuda.synchronize()
            report(f"d={d} fast={fast} rep={rep} (fresh out)", got, ref)
            # the same with an output whose memory held NaN just before
            del got
            c.fill_(float("nan"))
            del c
            with tuning.override(fast_launch=fast):
                got = G.wgrad_down(dout, hw, meta)
            torch.cuda.synchronize()
            report(f"d={d} fast={fast} rep={rep} (out over freed NaN)", got, ref)
