"""The router's split-form dx with the experts' dx added (``routing.pieces_dx``) against
``torch.addmm(dx_experts, [d1 d2 d3], [W; W; W])`` on a GPU: rounding (largest error in units
of the bf16 ulp of the exact sum, and how many elements differ from one rounding of the fp32
sum) and time per call on a layer's shape; likewise the split form's weight gradient
(``routing.pieces_dw``, ``tuning.router_dw_kernel``) against the ``torch.mm`` of the stacked
pieces it would replace; with ``--fused-only`` the layer's dx with the router's product
(``pieces_gather_reduce``) against two passes; with ``--layer`` the router-included layer as
one Function and as separate Functions against the experts alone, interleaved in one process
(``layer_ab``). Prints JSON lines."""
import argparse
import json

import torch
import triton.testing

from moe_plugin.autograd.router import split_dw
from moe_plugin.kernels import routing, tuning


def rounding(n, d, e, dev):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(e, d, generator=g) / d ** 0.5).to(dev, torch.bfloat16)
    dl = (torch.randn(n, e, generator=g) * torch.logspace(-6, 2, e)).to(dev)
    c = torch.randn(n, d, generator=g).to(dev, torch.bfloat16)
    p3 = routing.split_bf16_pieces(dl, 3)
    exact = c.double() + p3.double().view(n, 3, e).sum(1) @ w.double()
    ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp(min=1e-30))) - 7)
    one = exact.to(torch.bfloat16)  # one rounding of (nearly) the exact sum
    runs = {"pieces_dx": routing.pieces_dx(p3, w, c),
            "addmm": torch.addmm(c, p3, w.repeat(3, 1)),
            "mm_then_add": torch.mm(p3, w.repeat(3, 1)) + c}
    x = torch.randn(n, d, generator=g).to(dev, torch.bfloat16)
    exact_dw = p3.double().view(n, 3, e).sum(1).t() @ x.double()
    ulp_dw = 2.0 ** (torch.floor(torch.log2(exact_dw.abs().clamp(min=1e-30))) - 7)
    with tuning.override(router_dw_block=(128, 128, 64, 8, 2, 512)):  # 4 partial sums
        dw_runs = {"pieces_dw": routing.pieces_dw(p3, x, 3, torch.bfloat16),
                   "mm_sum": dw_mm(p3, x)}
    for name, got in dw_runs.items():
        r = ((got.double() - exact_dw).abs() / ulp_dw)
        one_dw = exact_dw.to(got.dtype)
        print(json.dumps(dict(check="rounding_dw", impl=name,
                              max_err_ulp=round(r.max().item(), 3),
                              over_1ulp=int((r > 1).sum().item()),
                              differ_from_one_rounding=int((got != one_dw).sum().item()),
                              elements=e * d)), flush=True)
    for name, got in runs.items():
        r = ((got.double() - exact).abs() / ulp)
        print(json.dumps(dict(check="rounding", impl=name, max_err_ulp=round(r.max().item(), 3),
                              over_1ulp=int((r > 1).sum().item()),
                              differ_from_one_rounding=int((got != one).sum().item()),
                              elements=n * d)), flush=True)


def dw_mm(p3, x):
    """The router backward's weight gradient without ``router_dw_kernel``."""
    with tuning.override(router_dw_kernel=False):
        return split_dw(p3, x, x.dtype)


def _time(check, shape, runs, rate):
    """Times each of ``runs`` (name: function) and prints it with ``rate(ms)`` (a dict)."""
    for name, fn in runs.items():
        try:
            ms = triton.testing.do_bench(fn, warmup=25, rep=200)
        except Exception as ex:  # e.g. a block too large for shared memory
            print(json.dumps(dict(check=check, impl=name, error=str(ex)[:160])), flush=True)
            continue
        print(json.dumps(dict(check=check, shape=shape, impl=name, ms=round(ms, 4),
                              **rate(ms))), flush=True)


def timing_dw(n, d, e, dev, blocks):
    x = torch.randn(n, d, device=dev, dtype=torch.bfloat16)
    p3 = torch.randn(n, 3 * e, device=dev, dtype=torch.bfloat16)
    runs = {"dw_mm_sum": lambda: dw_mm(p3, x),
            "dw_mm_only": lambda: torch.mm(p3.t(), x, out_dtype=torch.float32)}
    for b in blocks:
        def f(b=b):
            with tuning.override(router_dw_block=tuple(b)):
                return routing.pieces_dw(p3, x, 3, torch.bfloat16)
        runs[f"pieces_dw{tuple(b)}"] = f
    _time("time_dw", [n, d, e], runs,
          lambda ms: dict(tflops=round(2 * n * 3 * e * d / ms / 1e9, 1)))


def timing(n, d, e, dev, blocks):
    w = torch.randn(e, d, device=dev, dtype=torch.bfloat16)
    p3 = torch.randn(n, 3 * e, device=dev, dtype=torch.bfloat16)
    c = torch.randn(n, d, device=dev, dtype=torch.bfloat16)
    w3 = w.repeat(3, 1)
    runs = {"addmm": lambda: torch.addmm(c, p3, w3), "mm": lambda: torch.mm(p3, w3)}
    for b in blocks:
        def f(b=b):
            with tuning.override(pieces_dx_block=tuple(b)):
                return routing.pieces_dx(p3, w, c)
        runs[f"pieces_dx{tuple(b)}"] = f
    _time("time", [n, d, e], runs, lambda ms: dict(gb_s=round((2 * n * d * 2) / ms / 1e6, 1)))


def timing_fused(n, d, e, k, dev, blocks):
    """The layer's dx when router and experts share their input: the experts' ``gather_reduce``
    then ``pieces_dx`` adding the router's product (two passes, the path of separate autograd
    Functions) against ``pieces_gather_reduce`` (one pass) at ``blocks`` (``tuning.pieces_reduce_block``:
    BM, BN, BK, warps, stages, programs per SM); also the reduction alone (the floor of the fused kernel's memory traffic)."""
    from moe_plugin.kernels.permute import gather_reduce, permute_metadata
    g = torch.Generator(device=dev).manual_seed(2)
    ids = torch.rand(n, e, device=dev, generator=g).topk(k, dim=1).indices.int()
    meta = permute_metadata(ids, e)
    y = torch.randn(n * k, d, device=dev, dtype=torch.bfloat16)
    w = torch.randn(e, d, device=dev, dtype=torch.bfloat16) / d ** 0.5
    p3 = routing.split_bf16_pieces(torch.randn(n, e, device=dev), 3)
    ref = routing.pieces_dx(p3, w, gather_reduce(y, meta, None, out_dtype=torch.float32))
    runs = {"gather_reduce_only": lambda: gather_reduce(y, meta, None),
            "gather_reduce+pieces_dx": lambda: routing.pieces_dx(p3, w, gather_reduce(y, meta,
                                                                                        None))}
    for b in blocks:
        def f(b=b):
            with tuning.override(pieces_reduce_block=tuple(b)):
                return routing.pieces_gather_reduce(y, meta, p3, w, torch.bfloat16)
        try:
            got = f()
        except Exception as ex:
            print(json.dumps(dict(check="time_fused", impl=f"fused{tuple(b)}",
                                  error=str(ex)[:160])), flush=True)
            continue
        err = ((got.float() - ref).abs() / ref.abs().clamp(min=1e-3)).max().item()
        print(json.dumps(dict(check="fused_vs_two_pass", blocks=b, max_rel_err=err)),
              flush=True)
        runs[f"fused{tuple(b)}"] = f
    _time("time_fused", [n, d, e, k], runs,
          lambda ms: dict(gb_s=round((n * k * d * 2 + n * d * 2) / ms / 1e6, 1)))


def layer_ab(config, rounds, dev):
    """fused_moe's forward+backward on ``config`` (bench_layer's inputs and gate) with the
    router and experts as one Function (``tuning.router_fused_dx``) and as separate
    Functions, and the experts alone on the same routing, interleaved for ``rounds`` rounds in
    one process (the order rotating), so that drift over the process hits all three alike;
    prints each timing, then the medians and the router's share of each layer."""
    import statistics

    import moe_plugin
    from bench_layer import CONFIGS, make_inputs
    T, D, F, E, k = CONFIGS[config]
    x, _, _, w_up, w_down = make_inputs(T, D, F, E, k)
    g = torch.Generator(device=dev).manual_seed(1)
    gate = torch.randn(E, D, device=dev, dtype=x.dtype, generator=g) / D ** 0.5
    with torch.no_grad():
        _, info = moe_plugin.fused_moe(x, gate, w_up, w_down, k, activation="swiglu")
    ids, weights = info["topk_ids"], info["topk_weights"].clone()
    dout = torch.randn_like(x)
    params = [p.requires_grad_(True) for p in (x, gate, w_up, w_down, weights)]

    def layer():
        moe_plugin.fused_moe(x, gate, w_up, w_down, k, activation="swiglu")[0].backward(dout)

    def experts():
        moe_plugin.fused_experts(x, ids, weights, w_up, w_down, "swiglu",
                                 validate_ids=False).backward(dout)
    runs = {"fused": (layer, True), "separate": (layer, False), "experts_alone": (experts, True)}
    times = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names[r % 3:] + names[:r % 3]:
            fn, fused = runs[name]
            with tuning.override(router_fused_dx=fused):
                ms = triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=params,
                                             return_mode="median")
            times[name].append(ms)
            print(json.dumps(dict(check="layer_ab", config=config, round=r, impl=name,
                                  ms=round(ms, 4))), flush=True)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(json.dumps(dict(check="layer_ab_median", config=config, rounds=rounds,
                          **{f"{n}_ms": round(v, 4) for n, v in med.items()},
                          share_fused=round(1 - med["experts_alone"] / med["fused"], 4),
                          share_separate=round(1 - med["experts_alone"] / med["separate"], 4))),
          flush=True)


def _blocks(spec):
    """``"a,b,c;d,e,f"`` as ``[[a, b, c], [d, e, f]]``."""
    return [[int(v) for v in b.split(",")] for b in spec.split(";")]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    # (BM, BN, BK, warps, stages, programs per SM): the persistent kernel with W's tile
    # resident (BK >= E) at tiles that fit shared memory, a k loop (BK 64), and
    # 128,256,64,8,2 with a program a tile (session 39's non-persistent default, 0.309 ms in
    # the H200 profile)
    ap.add_argument("--blocks", default="64,128,128,4,2,1;64,128,128,4,3,1;64,256,128,8,2,1;"
                    "64,128,128,8,2,1;64,128,128,4,1,2;128,128,128,8,1,1;128,256,64,8,2,1;"
                    "128,256,64,8,2,64")
    ap.add_argument("--dw-blocks", default="128,128,64,8,2,4096;128,128,64,8,3,4096;"
                    "128,256,64,8,2,4096;128,128,64,8,2,2048;128,128,64,8,2,8192")
    # (BM, BN, BK, warps, stages, programs per SM): the k gathered row tiles want many
    # programs an SM (session 46, H100: (16, 128, 128, 4, 2, 2) 0.90 ms at fine_30b's shape,
    # 64-row tiles 1.2-1.8)
    ap.add_argument("--fused-blocks", default="16,128,128,4,2,2;16,128,128,4,2,3;"
                    "16,128,128,4,2,4;16,128,128,4,3,2;16,128,128,4,1,4;16,256,128,8,2,2;"
                    "16,128,128,2,2,4;16,64,128,2,2,4;32,128,128,4,2,2;16,128,64,4,2,3")
    ap.add_argument("--fused-only", action="store_true")
    ap.add_argument("--layer", nargs="*", default=[], metavar="CONFIG",
                    help="only the interleaved layer timings (layer_ab) of these configs")
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    dev = "cuda"
    if args.layer:
        for config in args.layer:
            layer_ab(config, args.rounds, dev)
        return
    for n, d, e, k in ((32768, 4096, 128, 8), (32768, 2048, 128, 8)):
        timing_fused(n, d, e, k, dev, _blocks(args.fused_blocks))
    if args.fused_only:
        return
    rounding(2048, 512, 128, dev)
    for n, d, e in ((32768, 4096, 128), (32768, 2048, 128)):
        timing(n, d, e, dev, _blocks(args.blocks))
    for n, d, e in ((32768, 4096, 128), (32768, 2048, 128)):
        timing_dw(n, d, e, dev, _blocks(args.dw_blocks))


if __name__ == "__main__":
    main()
