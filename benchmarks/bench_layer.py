"""Benchmark of the expert part of one MoE layer (routing given), forward and forward+backward.

Implementations, all timed in one process on one GPU:
  * ``moe_plugin``   -- ``moe_plugin.fused_experts`` (Triton kernels, hand-written backward)
  * ``grouped_mm``   -- sort → ``torch._grouped_mm`` → SwiGLU → ``torch._grouped_mm`` → weighted
                        ``index_add`` (autograd through PyTorch)
  * ``loop``         -- per-expert loop of dense matmuls (autograd through PyTorch)
  * ``sonicmoe``     -- SonicMoE (pip ``sonic-moe``, QuACK / CuTe-DSL warp-specialised Hopper
                        GEMMs): ``sonicmoe.functional.moe_general_routing_inputs``
  * ``scattermoe``   -- ScatterMoE (github.com/shawntan/scattermoe, Triton): ``GLUMLP``
  * ``moe_plugin_*`` -- ``moe_plugin`` with tuning changes (``TUNED``: the Triton grouped GEMMs,
                        fast launch, every op call dispatched, the variants under test)
The peers run when importable; otherwise their rows say "skipped" and why. Each peer holds
the same weights as leaves in its own layout (converted once, outside the timed region):
SonicMoE's interleaved gate/up rows as ``[2F, D, E]`` / ``[D, F, E]`` views, ScatterMoE's
``[up; gate]`` rows.

Routing: softmax top-k over random logits (the same ids and weights for every implementation).
FLOPs counted: forward 6·T·k·D·F, backward 12·T·k·D·F (router excluded).
Times are medians of ``triton.testing.do_bench``; peak memory is the extra peak allocation of a
forward+backward over the memory held before it (inputs, weights; no gradient buffer: every
implementation's gradients, a peer's own weight copies' included, count as allocated in the
pass; ``time_and_peak``).

    python benchmarks/bench_layer.py                       # all configs, JSON + markdown
    python benchmarks/bench_layer.py --configs fine_7b --impls moe_plugin grouped_mm

``--rounds N``: each config's implementations timed N times in turn (the first round also
checks the errors and the peak), rows with the medians and every round's times: a drift of
the card within the process (clocks, power) then reaches every implementation alike.

``--router``: the layer with its router (``fused_moe``: gate GEMM, softmax top-k, the
experts; gate weight gradient included) against the experts alone on the same routing
(``fused_experts`` with the ids and weights ``fused_moe`` chose): the router's share of the
layer's time (router and experts as one autograd Function, the router's dx inside the experts'
dx reduction: ``tuning.router_fused_dx``); ``moe_plugin_router_unfused`` as separate Functions,
the router's dx added by ``pieces_dx``. ``moe_plugin_router_fp32bwd`` is the same layer with the router logits'
backward as fp32 GEMMs on fp32 copies (``tuning.router_split_bwd=False``, the earlier path),
``moe_plugin_router_dw_kernel`` with the split form's weight gradient as one kernel
(``tuning.router_dw_kernel``). FLOPs counted as above (router excluded). The experts alone are
timed first and again last (``moe_plugin_given_routing_again``): the shares are against the
first, and the second shows how far the process's timings drifted in between.
``--with-router``: each config's routing-given rows, then its ``--router`` rows (of ours the
default layer only) in the same process, so SonicMoE's compiled GEMMs serve both.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys

import torch
from report import emit, run_meta, save_json
from moe_plugin.kernels import tuning

CONFIGS = {  # name: (T, D, F, E, k)
    "mixtral": (8192, 4096, 14336, 8, 2),
    "qwen3_30b_a3b": (32768, 2048, 768, 128, 8),
    "fine_7b": (24576, 1536, 256, 128, 8),
    "fine_30b": (32768, 4096, 512, 128, 8),
    "coarse_120b": (32768, 4096, 2048, 64, 4),
    "dsv3_ep8_slice": (16384, 7168, 2048, 32, 8),
    # the MoE layer of issue 7's pretraining model (micro-batch 8 x 1024 tokens)
    "pretrain_e2e": (8192, 1024, 1536, 8, 2),
}


def make_inputs(T, D, F, E, k, dtype=torch.bfloat16, skew=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, D, device="cuda", dtype=dtype, generator=g)
    w_up = torch.randn(E, 2 * F, D, device="cuda", dtype=dtype, generator=g) / D ** 0.5
    w_down = torch.randn(E, D, F, device="cuda", dtype=dtype, generator=g) / F ** 0.5
    logits = torch.randn(T, E, device="cuda", dtype=torch.float32, generator=g)
    if skew:  # half of the slots on 10% of the experts
        hot = max(1, E // 10)
        boost = torch.zeros(E, device="cuda")
        boost[:hot] = 3.0
        logits = logits + boost
    probs = torch.softmax(logits, -1)
    weights, ids = torch.topk(probs, k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return x, ids.to(torch.int32), weights, w_up, w_down


def grouped_mm_pipeline(x, ids, weights, w_up, w_down):
    """The torch._grouped_mm baseline of DESIGN.md / notes/h100-baselines.md."""
    T, k = ids.shape
    E = w_up.shape[0]
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    tok = order // k
    xs = x[tok]
    h = torch._grouped_mm(xs, w_up.transpose(1, 2), offs=offs)
    g, u = h.chunk(2, dim=-1)
    a = torch.nn.functional.silu(g) * u
    y = torch._grouped_mm(a, w_down.transpose(1, 2), offs=offs)
    y = y * weights.reshape(-1)[order, None].to(y.dtype)
    return torch.zeros_like(x).index_add(0, tok, y)


def loop_experts(x, ids, weights, w_up, w_down):
    out = torch.zeros_like(x)
    for e in range(w_up.shape[0]):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        g, u = (x[tok] @ w_up[e].t()).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(g) * u) @ w_down[e].t()
        out = out.index_add(0, tok, y * weights[tok, slot, None].to(y.dtype))
    return out


def moe_plugin_impl(recompute=False, quant=None):
    import moe_plugin
    from moe_plugin.quant import WeightCache
    cache = WeightCache() if quant else None  # never refreshed: the weights never change here

    def run(x, ids, weights, w_up, w_down):
        return moe_plugin.fused_experts(x, ids, weights, w_up, w_down, "swiglu",
                                        recompute=recompute, quant=quant, validate_ids=False,
                                        weight_cache=cache)
    return run


class PeerUnavailable(Exception):
    """A peer implementation that cannot run here (not importable)."""


def _leaf(t):
    return t.detach().contiguous().requires_grad_(True)


def _interleaved(w_up):
    """``w_up [E, 2F, D]`` (gate rows, then up rows) in SonicMoE's layout: gate and up rows
    interleaved."""
    e, f2, d = w_up.shape
    return torch.stack([w_up[:, :f2 // 2], w_up[:, f2 // 2:]], 2).reshape(e, f2, d)


def sonicmoe_weights(w_up, w_down):
    """SonicMoE's copies of ``w_up [E, 2F, D]`` and ``w_down [E, D, F]`` as gradient leaves:
    the up weight interleaved (``_interleaved``), the down weight as it is (detached)."""
    return _leaf(_interleaved(w_up)), _leaf(w_down)


def _own_weights(build):
    """``get(w_up, w_down, *args)``: ``build(w_up, w_down, *args)`` (a peer's copy of the
    weights in its layout), made once per pair of weight tensors and kept until another pair
    comes."""
    own = {}

    def get(w_up, w_down, *args):
        key = (w_up.data_ptr(), w_down.data_ptr())
        if key not in own:
            own.clear()
            own[key] = build(w_up, w_down, *args)
        return own[key]

    def release():
        """Drop the gradients of the copies (``time_and_peak``'s baseline holds none)."""
        for copy in own.values():
            for t in (copy.parameters() if isinstance(copy, torch.nn.Module) else copy):
                t.grad = None
    get.release = release
    return get


def sonicmoe_impl():
    """SonicMoE with the routing given (``moe_general_routing_inputs``: token-major slots)."""
    try:
        from sonicmoe.enums import ActivationType
        from sonicmoe.functional import moe_general_routing_inputs
    except Exception as ex:  # ImportError, or its CuTe-DSL stack failing to load
        raise PeerUnavailable(f"sonic-moe not importable: {type(ex).__name__}: {ex}")
    own = _own_weights(sonicmoe_weights)

    def run(x, ids, weights, w_up, w_down):
        w1, w2 = own(w_up, w_down)
        w1.grad = w2.grad = None  # as the timed inputs' gradients: not accumulated
        T, k = ids.shape
        tok = torch.arange(T, device=x.device, dtype=torch.int32).repeat_interleave(k)
        out, _ = moe_general_routing_inputs(
            x, weights.reshape(-1), tok, ids.reshape(-1).to(torch.int32), w1.permute(1, 2, 0),
            None, w2.permute(1, 2, 0), None, w1.shape[0],
            torch.cuda.current_stream().cuda_stream, ActivationType.SWIGLU)
        return out
    run.release_grads = own.release
    return run


def sonicmoe_router_layer(k):
    """SonicMoE's layer with its router (``moe_TC_softmax_topk_layer``: softmax over the
    top-k logits, which is softmax top-k with renormalisation, ``fused_moe``'s default)."""
    try:
        from sonicmoe.enums import ActivationType
        from sonicmoe.functional import moe_TC_softmax_topk_layer
    except Exception as ex:
        raise PeerUnavailable(f"sonic-moe not importable: {type(ex).__name__}: {ex}")

    def run(x, gate, w1, w2):
        return moe_TC_softmax_topk_layer(x, gate, w1.permute(1, 2, 0), None,
                                         w2.permute(1, 2, 0), None, k,
                                         torch.cuda.current_stream().cuda_stream,
                                         ActivationType.SWIGLU)[0]
    return run


def scattermoe_impl():
    """ScatterMoE's ``GLUMLP`` (silu(gate) * up; its expert weight holds the up rows first)."""
    try:
        from scattermoe.mlp import GLUMLP
    except Exception as ex:
        raise PeerUnavailable(f"scattermoe not importable: {type(ex).__name__}: {ex}")

    def build(w_up, w_down, top_k):
        e, f2, d = w_up.shape
        f = f2 // 2
        mlp = GLUMLP(d, f, e, top_k).to(device=w_up.device, dtype=w_up.dtype)
        with torch.no_grad():
            mlp.experts.weight.copy_(torch.cat([w_up[:, f:], w_up[:, :f]], 1))
            mlp.output_experts.weight.copy_(w_down)
        return mlp
    own = _own_weights(build)

    def run(x, ids, weights, w_up, w_down):
        mlp = own(w_up, w_down, ids.shape[1])
        mlp.zero_grad(set_to_none=True)
        return mlp(x, weights.to(x.dtype), ids.long())
    run.release_grads = own.release
    return run


PEERS = {"sonicmoe": sonicmoe_impl, "scattermoe": scattermoe_impl}


IMPLS = {
    "moe_plugin": moe_plugin_impl(False),
    "moe_plugin_recompute": moe_plugin_impl(True),
    # FP8 block-scaled expert GEMMs (fp8 dgrad, bf16 wgrad); the weights' quantised copy is
    # kept in a WeightCache, so a timed step includes no weight quantisation (as in training
    # with quant.cache_quantized_weights, where it happens once per optimizer step)
    "moe_plugin_fp8": moe_plugin_impl(False, "fp8_block"),
    # the same with the weight gradients in FP8 too (operands per column and 128 tokens)
    "moe_plugin_fp8w": moe_plugin_impl(False, "fp8_block_wgrad"),
    "grouped_mm": grouped_mm_pipeline,
    "loop": loop_experts,
}
# moe_plugin with one kernel family forced on or off (fields of ``kernels.tuning``), applied
# around the whole measurement (forward and backward), to compare it with the defaults
TUNED = {"moe_plugin_gluon_grouped": ("moe_plugin", dict(gluon_bf16_grouped=True)),
         "moe_plugin_triton_grouped": ("moe_plugin", dict(gluon_bf16_grouped=False)),
         # GEMM2, dx and the split form's dh' with their plain epilogue by registers (the
         # default before session 36: now by TMA stores of four column parts)
         "moe_plugin_reg_store": ("moe_plugin", dict(gluon_bf16_config={
             **tuning.current().gluon_bf16_config, **tuning.GLUON_BF16_REG_STORE})),
         # the row-grouped GEMMs as clusters of two CTAs, one operand multicast (Triton >= 3.8)
         "moe_plugin_cluster": ("moe_plugin", dict(gluon_bf16_config={
             **tuning.current().gluon_bf16_config, **tuning.GLUON_BF16_CLUSTER})),
         # GEMM2 alone with its consumers on whole tiles in turn (the other GEMMs on the
         # defaults: tuning.gluon_bf16_kind_configs)
         "moe_plugin_down_pingpong": ("moe_plugin", dict(
             gluon_bf16_kind_configs={"down": tuning.GLUON_BF16_PINGPONG})),
         # GEMM2 and dx with each tile's stores under the next tile's first MMA
         "moe_plugin_defer": ("moe_plugin", dict(gluon_bf16_config={
             **tuning.current().gluon_bf16_config, **tuning.GLUON_BF16_DEFER})),
         # every Gluon launch through Triton's per-call binding (the default before session
         # 41: repeat launches skip it, kernels/fast_launch.py)
         "moe_plugin_plain_launch": ("moe_plugin", dict(fast_launch=False)),
         # every custom-op call through PyTorch's dispatcher (kernels/eager.py)
         "moe_plugin_dispatched": ("moe_plugin", dict(eager_ops=False)),
         # the weight gradients' output tiles row by row (GROUP_M 1: the order before session
         # 42; now in bands of GROUP_M row tiles), bf16 and with FP8 weight gradients
         "moe_plugin_wgrad_rowwise": ("moe_plugin", dict(gluon_bf16_seg_config={
             **tuning.current().gluon_bf16_seg_config, "GROUP_M": 1})),
         # the stored bf16 weight gradients by registers (the default before session 42: now
         # by TMA stores of column parts)
         "moe_plugin_wgrad_reg_store": ("moe_plugin", dict(gluon_bf16_seg_config={
             **tuning.current().gluon_bf16_seg_config, "TMA_STORE": 0})),
         "moe_plugin_fp8w_wgrad_rowwise": ("moe_plugin_fp8w", dict(
             gluon_bf16_seg_config={**tuning.current().gluon_bf16_seg_config, "GROUP_M": 1},
             gluon_seg_config={**tuning.current().gluon_seg_config, "GROUP_M": 1}))}


def impl_names() -> list:
    """Every implementation name ``resolve_impl`` takes (ours, the tuned variants, peers)."""
    return sorted(set(IMPLS) | set(TUNED) | set(PEERS))


def resolve_impl(name):
    """``(fn, tuning changes)`` of implementation ``name``: a peer built (``PeerUnavailable``
    when it cannot be imported), or ours with the ``TUNED`` changes to apply around it."""
    base, changes = TUNED.get(name, (name, {}))
    return (PEERS[name]() if name in PEERS else IMPLS[base]), changes


def time_and_peak(fwd, fwd_bwd, params, rep_ms, release=None):
    """``(forward ms, forward+backward ms, extra peak bytes)``. The peak is that of one
    forward+backward over the memory held before it, with no gradient buffer held then (the
    ``params``' gradients and, by ``release()``, those of a peer's own weight copies): every
    implementation's gradients count, allocated within the pass. Times: ``bench_times``."""
    fwd_bwd()  # compile / warm up
    torch.cuda.synchronize()
    for p in params:
        p.grad = None
    if release is not None:
        release()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return (*bench_times(fwd, fwd_bwd, params, rep_ms), peak)


def bench_times(fwd, fwd_bwd, params, rep_ms):
    """``(forward ms, forward+backward ms)``: medians of ``do_bench``, gradients set to None
    between forward+backward runs."""
    from triton.testing import do_bench
    t_f = do_bench(fwd, warmup=25, rep=rep_ms, return_mode="median")
    t_fb = do_bench(fwd_bwd, warmup=25, rep=rep_ms, grad_to_none=params, return_mode="median")
    return t_f, t_fb


def measure(fn, inputs, rep_ms=200, peak=True):
    """``(forward ms, forward+backward ms, extra peak bytes)`` of ``fn`` on ``inputs``; with
    ``peak=False`` the times only (a warm-up pass, then ``bench_times``), peak ``None``."""
    x, ids, weights, w_up, w_down = inputs
    params = [x, weights, w_up, w_down]
    for p in params:
        p.requires_grad_(True)
    dout = torch.randn_like(x)

    def fwd():
        with torch.no_grad():
            fn(x, ids, weights, w_up, w_down)

    def fwd_bwd():
        fn(x, ids, weights, w_up, w_down).backward(dout)

    if peak:
        out = time_and_peak(fwd, fwd_bwd, params, rep_ms, getattr(fn, "release_grads", None))
    else:
        fwd_bwd()
        out = (*bench_times(fwd, fwd_bwd, params, rep_ms), None)
    for p in params:
        p.grad = None
        p.requires_grad_(False)
    return out


def check(fn, ref_fn, inputs):
    """Relative L2 errors of the output and of dx (the input gradient) against ``ref_fn``."""
    x = inputs[0].detach().requires_grad_(True)
    dout = torch.randn_like(x)
    errs = []
    for f in (fn, ref_fn):
        out = f(x, *inputs[1:])
        dx, = torch.autograd.grad(out, x, dout)
        errs.append((out.detach().float(), dx.float()))
        del out, dx
    return tuple(((a - b).norm() / b.norm()).item() for a, b in zip(*errs))


def ceilings():
    from triton.testing import do_bench
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    src = torch.empty(2 ** 30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    tc = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    out = {"bf16_gemm_tflops": 2 * 8192 ** 3 / t / 1e9, "copy_tbps": 2 * 2 ** 30 / tc / 1e9}
    try:  # the FP8 floor: torch's scaled e4m3 GEMM (per-tensor scales) on the same shape
        a8, b8 = a.to(torch.float8_e4m3fn), b.t().contiguous().to(torch.float8_e4m3fn).t()
        one = torch.ones((), device="cuda")
        t8 = do_bench(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16),
                      warmup=25, rep=200, return_mode="median")
        out["fp8_gemm_tflops"] = 2 * 8192 ** 3 / t8 / 1e9
    except (RuntimeError, AttributeError, TypeError) as ex:
        print(f"fp8 ceiling not measured: {ex}", file=sys.stderr)
    return out


def router_rows(name, args, variants=True):
    """``--router``: rows for the layer with its router and for its experts alone;
    ``variants=False`` (``--with-router``): of ours only the default layer, not the
    ``moe_plugin_router_*`` variants."""
    import moe_plugin
    T, D, F, E, k = CONFIGS[name]
    x, _, _, w_up, w_down = make_inputs(T, D, F, E, k)
    g = torch.Generator(device="cuda").manual_seed(1)
    gate = torch.randn(E, D, device="cuda", dtype=x.dtype, generator=g) / D ** 0.5
    with torch.no_grad():
        _, info = moe_plugin.fused_moe(x, gate, w_up, w_down, k, activation="swiglu")
    ids, weights = info["topk_ids"], info["topk_weights"].clone()
    dout = torch.randn_like(x)
    fl_f = 6 * T * k * D * F

    def layer(x, gate, w_up, w_down, weights):
        return moe_plugin.fused_moe(x, gate, w_up, w_down, k, activation="swiglu")[0]

    def experts(x, gate, w_up, w_down, weights):
        return moe_plugin.fused_experts(x, ids, weights, w_up, w_down, "swiglu",
                                        validate_ids=False)
    split = dict(router_split_bwd=True)
    # the experts alone first: before any peer has run in this process (session 41 saw them
    # ~10% slower on fine_7b when timed after SonicMoE's layer)
    runs = [("moe_plugin_given_routing", experts, split, [x, gate, w_up, w_down, weights]),
            ("moe_plugin_router", layer, split, [x, gate, w_up, w_down, weights])]
    if variants:
        runs += [
            ("moe_plugin_router_unfused", layer, dict(split, router_fused_dx=False),
             [x, gate, w_up, w_down, weights]),
            ("moe_plugin_router_fp32bwd", layer, dict(router_split_bwd=False),
             [x, gate, w_up, w_down, weights]),
            ("moe_plugin_router_dw_kernel", layer, dict(split, router_dw_kernel=True),
             [x, gate, w_up, w_down, weights])]
    if "sonicmoe" in args.impls:
        try:
            sonic = sonicmoe_router_layer(k)
            w1, w2 = sonicmoe_weights(w_up, w_down)
            runs.append(("sonicmoe_router", lambda x, gate, w1, w2, _w: sonic(x, gate, w1, w2),
                         split, [x, gate, w1, w2, weights]))
        except PeerUnavailable as ex:
            print(json.dumps({"config": name, "impl": "sonicmoe_router", "skipped": str(ex)}),
                  flush=True)
    runs.append(("moe_plugin_given_routing_again",) + runs[0][1:])
    rows = []
    for impl, fn, changes, params in runs:
        for p in params:
            p.requires_grad_(True)
        with tuning.override(**changes):
            def fwd():
                with torch.no_grad():
                    fn(*params)

            def fwd_bwd():
                fn(*params).backward(dout)
            t_f, t_fb, peak = time_and_peak(fwd, fwd_bwd, params, args.rep_ms)
        for p in params:
            p.grad = None
            p.requires_grad_(False)
        row = {"config": name, "impl": impl, "skew": False, "T": T, "D": D, "F": F, "E": E,
               "k": k, **_times(fl_f, t_f, t_fb), "peak_extra_gib": peak / 2 ** 30}
        rows.append(row)
        gc.collect()
        torch.cuda.empty_cache()
    given = rows[0]["fwd_bwd_ms"]
    rows[-1]["drift_vs_first"] = rows[-1]["fwd_bwd_ms"] / given - 1
    for row in rows[1:-1]:  # (SonicMoE's layer: its time is in its row, beside ours)
        if row["impl"].startswith("moe_plugin"):
            row["router_share_fwd_bwd"] = 1 - given / row["fwd_bwd_ms"]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--impls", nargs="*", default=["moe_plugin", "moe_plugin_recompute",
                                                   "grouped_mm", "loop"])
    ap.add_argument("--skew", action="store_true", help="also run skewed routing for moe_plugin")
    ap.add_argument("--rep-ms", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=1,
                    help="time each config's implementations this many times, in turn "
                         "(A B C, A B C, ...): rows give the medians over the rounds and every "
                         "round's times (fwd_ms_rounds, fwd_bwd_ms_rounds)")
    ap.add_argument("--loop-max-experts", type=int, default=128,
                    help="skip the per-expert loop above this many experts")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--router", action="store_true",
                    help="the layer with its router against the experts alone (see above); "
                         "with 'sonicmoe' in --impls also SonicMoE's router-included layer")
    ap.add_argument("--with-router", action="store_true",
                    help="after each config's routing-given rows, its --router rows in the "
                         "same process (ours: the default layer only; SonicMoE's compiled "
                         "GEMMs reused)")
    ap.add_argument("--quack-top", type=int, default=None, metavar="N",
                    help="SonicMoE's autotuner times, per GEMM role, only the N fastest "
                         "candidates of each earlier tuning result under QUACK_CACHE_DIR "
                         "(quack_shortlist.py); default: every candidate")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.rounds > 1 and args.router:
        ap.error("--rounds applies to the routing-given rows, not to --router")
    if args.router and args.with_router:
        ap.error("--router and --with-router: give one")
    meta = run_meta(ceilings=ceilings())
    # the peak's method (``time_and_peak``): no gradient buffer held before the pass, peers'
    # own weight copies included (earlier runs held a peer's copies' gradients in the baseline
    # and released them in the pass: its peak understated by its weight gradients)
    meta["peak_grads_in_pass"] = True
    if args.rounds > 1:
        meta["rounds"] = args.rounds
    if args.quack_top is not None:
        meta["sonicmoe_quack_top"] = args.quack_top
        shortlist_quack(args.quack_top)
    print(json.dumps(meta), flush=True)
    if args.router:
        rows = [r for name in args.configs for r in router_rows(name, args)]
        emit(markdown(meta, rows), args.md, args.json, with_shortlist({"meta": meta, "rows": rows}))
        return
    rows = []

    def save_partial():  # the rows so far, in case the run is cut short (a time limit)
        if args.json:
            save_json(args.json, {"meta": {**meta, "partial": True}, "rows": rows})
    for name in args.configs:
        T, D, F, E, k = CONFIGS[name]
        fl_f = 6 * T * k * D * F
        for skew in ([False, True] if args.skew else [False]):
            inputs = make_inputs(T, D, F, E, k, skew=skew)
            timed = []  # (fn, tuning changes, row) of this config's first round
            for impl in args.impls:
                if skew and not impl.startswith("moe_plugin"):
                    continue
                if impl == "loop" and E > args.loop_max_experts:
                    continue
                try:
                    fn, changes = resolve_impl(impl)
                except PeerUnavailable as ex:
                    print(json.dumps({"config": name, "impl": impl, "skipped": str(ex)}),
                          flush=True)
                    continue
                try:
                    with tuning.override(**changes):
                        err, err_dx = (check(fn, grouped_mm_pipeline, inputs)
                                       if impl != "grouped_mm" else (0.0, 0.0))
                        t_f, t_fb, peak = measure(fn, inputs, args.rep_ms)
                except Exception as ex:  # report and go on: one failing impl must not hide the rest
                    print(f"FAILED {name} {impl}: {type(ex).__name__}: {ex}"[:2000], flush=True)
                    _release_inputs(inputs)
                    continue
                row = {"config": name, "impl": impl, "skew": skew, "T": T, "D": D, "F": F,
                       "E": E, "k": k, **_times(fl_f, t_f, t_fb),
                       "peak_extra_gib": peak / 2 ** 30, "rel_err_vs_grouped_mm": err,
                       "dx_rel_err_vs_grouped_mm": err_dx}
                rows.append(row)
                if args.rounds > 1:
                    row.update(fwd_ms_rounds=[t_f], fwd_bwd_ms_rounds=[t_fb])
                    timed.append((fn, changes, row))
                print(json.dumps(row), flush=True)
                save_partial()
                # each implementation starts from an empty cache: a later one inheriting the
                # segments of an earlier one measured up to 10% slower (NOTES.md, session 13)
                gc.collect()
                torch.cuda.empty_cache()
            for _ in range(1, args.rounds):
                for fn, changes, row in timed:
                    gc.collect()
                    torch.cuda.empty_cache()
                    try:
                        with tuning.override(**changes):
                            t_f, t_fb, _ = measure(fn, inputs, args.rep_ms, peak=False)
                    except Exception as ex:  # keep the rounds it finished
                        print(f"FAILED {name} {row['impl']} (round "
                              f"{len(row['fwd_ms_rounds']) + 1}): {type(ex).__name__}: {ex}"
                              [:2000], flush=True)
                        _release_inputs(inputs)
                        continue
                    row["fwd_ms_rounds"].append(t_f)
                    row["fwd_bwd_ms_rounds"].append(t_fb)
            for fn, changes, row in timed:  # the medians over the rounds
                row.update(_times(fl_f, statistics.median(row["fwd_ms_rounds"]),
                                  statistics.median(row["fwd_bwd_ms_rounds"])))
                print(json.dumps(row), flush=True)
            if timed:
                save_partial()
            del inputs, timed
            torch.cuda.empty_cache()
        if args.with_router:
            rows += router_rows(name, args, variants=False)
            save_partial()
    emit(markdown(meta, rows), args.md, args.json, with_shortlist({"meta": meta, "rows": rows}))


def _release_inputs(inputs):
    """After a failed pass: the inputs back to leaves without gradients."""
    for p in inputs:
        if p.is_floating_point():
            p.requires_grad_(False)
            p.grad = None


def _times(fl_f, t_f, t_fb):
    """A row's times and rates from its forward and forward+backward ms (forward FLOPs
    ``fl_f``; backward counted as twice the forward)."""
    return {"fwd_ms": t_f, "fwd_bwd_ms": t_fb, "bwd_ms": t_fb - t_f,
            "fwd_tflops": fl_f / t_f / 1e9, "bwd_tflops": 2 * fl_f / (t_fb - t_f) / 1e9,
            "fwd_bwd_tflops": 3 * fl_f / t_fb / 1e9}


def shortlist_quack(top):
    """``--quack-top``: QuACK's autotuner on shortlists (``quack_shortlist.restrict``)."""
    import quack_shortlist
    try:
        import quack.autotuner  # noqa: F401
    except Exception as ex:  # SonicMoE's rows will say why it is unavailable
        print(f"--quack-top: QuACK not importable ({type(ex).__name__}), nothing shortlisted",
              flush=True)
        return
    lists = quack_shortlist.restrict(top)
    print(json.dumps({"quack_shortlists": {" ".join(r): len(c) for r, c in lists.items()}}),
          flush=True)


def with_shortlist(out):
    """The run's output with what the shortlists did to each autotuned call, if any."""
    import quack_shortlist
    if quack_shortlist.applied:
        out["quack_shortlist"] = quack_shortlist.applied
        print(json.dumps({"quack_shortlist": quack_shortlist.applied}), flush=True)
    return out


def markdown(meta, rows):
    lines = [f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; "
             f"{meta['date']}. Measured ceilings: bf16 GEMM "
             f"{meta['ceilings']['bf16_gemm_tflops']:.0f} TFLOP/s, copy "
             f"{meta['ceilings']['copy_tbps']:.2f} TB/s"
             + (f", fp8 GEMM {meta['ceilings']['fp8_gemm_tflops']:.0f} TFLOP/s"
                if "fp8_gemm_tflops" in meta["ceilings"] else "") + "."
             + (f" SonicMoE's autotuner timed per GEMM role only the {meta['sonicmoe_quack_top']}"
                " fastest candidates of each earlier tuning result (`--quack-top`)."
                if "sonicmoe_quack_top" in meta else "")
             + (f" Times: medians over {meta['rounds']} rounds, the implementations in turn;"
                " fwd+bwd ms gives the rounds' range." if "rounds" in meta else ""), "",
             "| config | impl | routing | fwd ms | fwd+bwd ms | fwd TFLOP/s | bwd TFLOP/s | "
             "fwd+bwd TFLOP/s | extra peak GiB | rel err vs grouped_mm (out / dx) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['impl']} | {'skewed' if r['skew'] else 'balanced'} "
                     f"| {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f}"
                     + (f" ({min(r['fwd_bwd_ms_rounds']):.3f}-{max(r['fwd_bwd_ms_rounds']):.3f})"
                        if "fwd_bwd_ms_rounds" in r else "")
                     + f" | {r['fwd_tflops']:.0f} | "
                     f"{r['bwd_tflops']:.0f} | {r['fwd_bwd_tflops']:.0f} | "
                     f"{r['peak_extra_gib']:.2f} | "
                     + (f"router {100 * r['router_share_fwd_bwd']:.1f}% of fwd+bwd"
                        if "router_share_fwd_bwd" in r else
                        f"{100 * r['drift_vs_first']:+.1f}% against the first"
                        if "drift_vs_first" in r else
                        f"{r['rel_err_vs_grouped_mm']:.1e} / {r['dx_rel_err_vs_grouped_mm']:.1e}"
                        if "rel_err_vs_grouped_mm" in r else "—") + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
