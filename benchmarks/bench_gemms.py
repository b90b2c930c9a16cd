"""Per-GEMM timing of the bf16 expert pass: each GEMM of a forward + backward (``tune_kernels.
Stages``) with the default tuning, against the same GEMM with a kernel family switched off
(``--against``: fields of ``Tuning`` set to False, e.g. ``gluon_bf16_wgrad`` = the Triton
segment kernel), and optionally the Gluon weight gradient under other configurations
(``--seg-variants``) and the Gluon row-grouped GEMMs under others (``--grouped-variants``: dicts
over ``gluon_bf16_config``, or over the field a dict's ``"_field"`` names). ``--enable``: fields
set True in every run. The dense bf16 matmul rate of the same run is printed as the ceiling;
``--bmm`` also times, in the same rounds, cuBLAS on each GEMM's problem with the rows spread
evenly over the experts (``torch.bmm`` of E GEMMs of the same M / E, N and K; the weight
gradients E GEMMs of K = M / E): a ceiling of the same shapes. Outputs of each pair are
compared bitwise (``equal``; the bmm run is not compared).

    python benchmarks/bench_gemms.py --configs fine_30b mixtral --kernels wgrad_up wgrad_down
    python benchmarks/bench_gemms.py --enable gluon_bf16_grouped --against gluon_bf16_grouped \
        --kernels up down dh dx
"""
import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from tune_kernels import Stages  # noqa: E402

from moe_plugin.kernels import tuning  # noqa: E402


def _dense_rate() -> float:
    """TFLOP/s of a dense bf16 8192³ matmul on this GPU now."""
    from triton.testing import do_bench
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = do_bench(lambda: m @ m, warmup=10, rep=200, return_mode="median")
    return 2 * 8192 ** 3 / t / 1e9


def main():
    from triton.testing import do_bench
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=["fine_30b", "mixtral"])
    ap.add_argument("--kernels", nargs="*", default=None)
    ap.add_argument("--against", nargs="*", default=["gluon_bf16_wgrad"])
    ap.add_argument("--seg-variants", default=None,
                    help="JSON list of dicts applied over gluon_bf16_seg_config")
    ap.add_argument("--grouped-variants", default=None,
                    help="JSON list of dicts applied over gluon_bf16_config (or '_field')")
    ap.add_argument("--tune-variants", default=None,
                    help="JSON list of dicts of Tuning fields, each run as given (lists become "
                         "tuples), e.g. '[{\"act_bwd_block\": [64, 128, 8]}]'")
    ap.add_argument("--enable", nargs="*", default=[])
    ap.add_argument("--bmm", action="store_true",
                    help="also cuBLAS on each GEMM's shapes, rows spread evenly (torch.bmm)")
    ap.add_argument("--rep-ms", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3,
                    help="the runs of a GEMM timed in turn this many times (A B A B ...): the "
                         "median over rounds is reported with the rounds' spread (power and "
                         "clock drift move a single timing by up to ~15%% on the H200)")
    args = ap.parse_args()
    print(json.dumps({"ceiling_tflops": round(_dense_rate(), 1)}), flush=True)
    variants = json.loads(args.seg_variants) if args.seg_variants else []
    gvariants = json.loads(args.grouped_variants) if args.grouped_variants else []
    tvariants = [{k: tuple(x) if isinstance(x, list) else x for k, x in v.items()}
                 for v in (json.loads(args.tune_variants) if args.tune_variants else [])]
    enabled = {f: True for f in args.enable}
    for name in args.configs:
        st = Stages(name)
        for kind, (flops, fn) in st.gemms.items():
            if args.kernels and kind not in args.kernels:
                continue
            runs = [("default", {})] + [(f"{f}=False", {f: False}) for f in args.against]
            if kind.startswith("wgrad"):
                base = tuning.current().gluon_bf16_seg_config
                runs += [(json.dumps(v), {"gluon_bf16_seg_config": {**base, **v}})
                         for v in variants]
            elif kind in ("up", "down", "dh", "dx"):
                for v in gvariants:
                    v = dict(v)
                    field = v.pop("_field", "gluon_bf16_config")
                    base = getattr(tuning.current(), field)
                    runs.append((f"{field}:{json.dumps(v)}", {field: {**base, **v}}))
            runs += [(f"tune:{json.dumps(v)}", v) for v in tvariants]
            runs = [(label, {**enabled, **changes}) for label, changes in runs]
            fns = dict.fromkeys((label for label, _ in runs), fn)
            if args.bmm:
                runs.append(("cublas_bmm", {}))
                fns["cublas_bmm"] = bmm_of(st, kind)
            ref = None
            times = {}  # label -> per-round medians
            equal = {}
            for label, changes in runs:  # correctness once, before the timing
                with tuning.override(**changes):
                    try:
                        out = fns[label]()
                    except Exception as ex:  # out of shared memory etc.
                        print(json.dumps({"config": name, "kernel": kind, "run": label,
                                          "error": repr(ex)[:300]}), flush=True)
                        continue
                first = out[0] if isinstance(out, tuple) else out
                eq = None
                if label == "cublas_bmm":
                    pass  # another problem's values
                elif ref is None:
                    ref = first.clone() if torch.is_tensor(first) else None
                elif torch.is_tensor(first):
                    eq = bool(torch.equal(first, ref))
                equal[label] = eq
                times[label] = []
                del out, first
            for _ in range(max(1, args.rounds)):
                for label, changes in runs:
                    if label in times:
                        with tuning.override(**changes):
                            times[label].append(do_bench(fns[label], warmup=5,
                                                         rep=args.rep_ms, return_mode="median"))
            for label, ts in times.items():
                t = statistics.median(ts)
                print(json.dumps({"config": name, "kernel": kind, "run": label,
                                  "ms": round(t, 4), "tflops": round(flops / t / 1e9, 1),
                                  "spread": round((max(ts) - min(ts)) / t, 3),
                                  "equal": equal[label]}), flush=True)
        del st
        torch.cuda.empty_cache()


def bmm_of(st, kind):
    """cuBLAS on GEMM ``kind``'s shapes with the slots spread evenly over the E experts:
    ``torch.bmm`` of E problems of M / E rows (row-grouped GEMMs: [M / E, K] x [K, N]; weight
    gradients: [N_out, M / E] x [M / E, D]), operands random."""
    T, D, F, E, k = st.shape
    rows = T * k // E
    mnk = {"up": (rows, 2 * F, D), "down": (rows, D, F), "dh": (rows, F, D),
           "up_bwd": (rows, F, D), "dx": (rows, D, 2 * F),
           "wgrad_down": (F, D, rows), "wgrad_up": (2 * F, D, rows)}[kind]
    m, n, kk = mnk
    a = torch.randn(E, m, kk, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(E, kk, n, device="cuda", dtype=torch.bfloat16)
    return lambda: torch.bmm(a, b)


if __name__ == "__main__":
    main()
