"""GPU tests: the compiled kernels in bf16 (and fp32) on realistic-but-small shapes, against the
float64 reference (bf16: relative L2 error <= 1e-2; fp32: <= 1e-5). Skipped without CUDA."""
import pytest
import torch

from conftest import (ACTIVATIONS, BF16_TOL, EXPERT_GRAD_NAMES, FP32_TOL, MOE_GRAD_NAMES,
                      assert_bitwise, assert_clamp_exercised, check_experts, check_moe,
                      expert_inputs, moe_inputs, random_ids, run_fused_experts, run_fused_moe,
                      requires_cuda, DEVICE)
from moe_plugin.kernels.codes import SWIGLU_OAI_LIMIT

pytestmark = [pytest.mark.gpu, requires_cuda, pytest.mark.usefixtures("poison_empty")]

CUDA = torch.device("cuda")
N, D, F, E, K = 512, 256, 128, 16, 4


@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16],
                         ids=["w_fp32", "w_bf16"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bf16_fused_experts(activation, weights_dtype, seed):
    # swiglu_oai: the clamp's gradient mask is taken on the bf16-rounded pre-activation, so
    # every value within a bf16 step (1/32 at 7) of +-7 may fall on the other side than in the
    # float64 reference. With pre-activations of std 4 that alone gives a 2.7e-2 gradient error
    # -- the same for plain eager bf16 PyTorch as for the kernels (measured on an H100) -- so
    # bf16 uses std 2: the clamp is still taken by some hundred values, few sit near the edge.
    # (fp32 on CUDA and on the CPU tests the clamp at std 4.)
    x_scale = 2.0 if activation == "swiglu_oai" else 1.0
    inp = expert_inputs(seed, N, D, F, E, K, activation=activation, dtype=torch.bfloat16,
                        weights_dtype=weights_dtype, x_scale=x_scale, device=CUDA)
    if activation == "swiglu_oai":
        assert_clamp_exercised(inp, SWIGLU_OAI_LIMIT)
    (out, grads), _ = check_experts(inp, activation, tol=BF16_TOL)
    assert out.dtype == torch.bfloat16 and grads["weights"].dtype == weights_dtype


@pytest.mark.parametrize("case", ["E300", "minus_one", "skewed", "odd_sizes", "k1"])
def test_bf16_fused_experts_edge_cases(case, seed):
    gen = torch.Generator().manual_seed(seed)
    n, d, f, e, k = N, D, F, E, K
    ids = None
    if case == "E300":
        e = 300
    elif case == "minus_one":
        ids = random_ids(gen, n, e, k)
        ids[torch.rand(n, k, generator=gen) < 0.3] = -1
        ids[7] = -1
    elif case == "skewed":   # most slots on one expert, several experts empty
        ids = random_ids(gen, n, 4, k)
        ids[:, 0] = 2
    elif case == "odd_sizes":
        n, d, f = 301, 200, 88
    else:
        k = 1
    inp = expert_inputs(seed, n, d, f, e, k, dtype=torch.bfloat16, ids=ids, device=CUDA)
    (out, grads), _ = check_experts(inp, "swiglu", tol=BF16_TOL)
    if case == "minus_one":
        unused = (inp["ids"] == -1)
        assert (out[7] == 0).all() and (grads["x"][7] == 0).all()
        assert (grads["weights"][unused] == 0).all()


@pytest.mark.parametrize("activation", ["swiglu", "swiglu_oai", "gelu", "relu2"])
def test_fp32_fused_experts_cuda(activation, seed):
    x_scale = 4.0 if activation == "swiglu_oai" else 1.0
    inp = expert_inputs(seed, N, D, F, E, K, activation=activation, x_scale=x_scale,
                        device=CUDA)
    if activation == "swiglu_oai":
        assert_clamp_exercised(inp, SWIGLU_OAI_LIMIT)
    check_experts(inp, activation, tol=FP32_TOL)


@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
def test_bf16_determinism_and_recompute(activation, seed):
    inp = expert_inputs(seed, N, D, F, E, K, activation=activation, dtype=torch.bfloat16,
                        device=CUDA)
    out1, grads1 = run_fused_experts(inp, activation, deterministic=True)
    out2, grads2 = run_fused_experts(inp, activation, deterministic=True)
    out3, grads3 = run_fused_experts(inp, activation, recompute=True)
    for out, grads, what in ((out2, grads2, "second run"), (out3, grads3, "recompute")):
        assert_bitwise(out, out1, f"{what}: out")
        for name in EXPERT_GRAD_NAMES:
            assert_bitwise(grads[name], grads1[name], f"{what}: grad {name}")


MOE_CASES = {
    "softmax_renorm": dict(aux_loss_coeff=0.01, z_loss_coeff=0.001),
    "softmax_pre_softmax_scaled": dict(renormalize=False, scaling_factor=2.0,
                                       aux_loss_coeff=0.01),
    "sigmoid_bias": dict(score_func="sigmoid", expert_bias=True, aux_loss_coeff=0.01,
                         z_loss_coeff=0.001),
    "groups_sigmoid_bias_scaled": dict(score_func="sigmoid", expert_bias=True, num_groups=4,
                                       group_topk=2, scaling_factor=2.5, aux_loss_coeff=0.01),
    "groups_softmax": dict(num_groups=4, group_topk=2, z_loss_coeff=0.001),
    "capacity_probs": dict(capacity_factor=0.75, drop_policy="probs", aux_loss_coeff=0.01),
    "capacity_position": dict(capacity_factor=0.75, drop_policy="position",
                              z_loss_coeff=0.001),
    "recompute": dict(recompute=True, aux_loss_coeff=0.01, z_loss_coeff=0.001),
}


def _moe_kwargs(case, seed, e):
    kwargs = dict(MOE_CASES[case])
    if kwargs.pop("expert_bias", False):
        gen = torch.Generator().manual_seed(seed + 3)
        kwargs["expert_bias"] = (torch.randn(e, generator=gen) * 0.05).to(CUDA)
    return kwargs


@pytest.mark.parametrize("case", MOE_CASES)
def test_bf16_fused_moe(case, seed):
    kwargs = _moe_kwargs(case, seed, E)
    inp = moe_inputs(seed, N, D, F, E, dtype=torch.bfloat16, gate_scale=2.0, device=CUDA)
    (_, info, _), (_, rinfo, _) = check_moe(inp, K, tol=BF16_TOL, **kwargs)
    if "capacity_factor" in kwargs:
        assert (rinfo["topk_ids"] == -1).any()


@pytest.mark.parametrize("case", ["softmax_renorm", "groups_sigmoid_bias_scaled",
                                  "capacity_probs"])
def test_fp32_fused_moe_cuda(case, seed):
    kwargs = _moe_kwargs(case, seed, E)
    inp = moe_inputs(seed, N, D, F, E, gate_scale=2.0, device=CUDA)
    check_moe(inp, K, tol=FP32_TOL, **kwargs)


def test_bf16_fused_moe_E300(seed):
    e = 300
    inp = moe_inputs(seed, 256, D, F, e, dtype=torch.bfloat16, gate_scale=2.0, device=CUDA)
    check_moe(inp, 8, tol=BF16_TOL, aux_loss_coeff=0.01, z_loss_coeff=0.001)


def test_bf16_fused_moe_determinism(seed):
    kwargs = _moe_kwargs("groups_sigmoid_bias_scaled", seed, E)
    kwargs.update(capacity_factor=1.0, z_loss_coeff=0.001)
    inp = moe_inputs(seed, N, D, F, E, dtype=torch.bfloat16, gate_scale=2.0, device=CUDA)
    out1, info1, grads1 = run_fused_moe(inp, K, **kwargs)
    out2, info2, grads2 = run_fused_moe(inp, K, **kwargs)
    out3, info3, grads3 = run_fused_moe(inp, K, recompute=True, **kwargs)
    for out, info, grads in ((out2, info2, grads2), (out3, info3, grads3)):
        assert_bitwise(out, out1, "out")
        for name in ("topk_ids", "topk_weights", "aux_loss", "z_loss", "tokens_per_expert"):
            assert_bitwise(info[name], info1[name], name)
        for name in MOE_GRAD_NAMES:
            assert_bitwise(grads[name], grads1[name], f"grad {name}")


@pytest.mark.parametrize("activation", ["gelu_erf", "geglu_erf", "swiglu"])
def test_bf16_fused_experts_biases(activation, seed):
    """Expert biases in bf16 (added to the fp32 accumulators): output and every gradient, b_up
    and b_down included; -1 slots and an expert without slots (exactly zero bias gradients);
    recompute and a second run bitwise equal."""
    gen = torch.Generator().manual_seed(seed)
    ids = random_ids(gen, N, E, K)
    ids[ids == 3] = -1                       # expert 3 gets nothing
    ids[torch.rand(N, K, generator=gen) < 0.2] = -1
    inp = expert_inputs(seed, N, D, F, E, K, activation=activation, dtype=torch.bfloat16,
                        weights_dtype=torch.float32, ids=ids, device=CUDA,
                        bias=("b_up", "b_down"))
    (out, grads), _ = check_experts(inp, activation, tol=BF16_TOL)
    assert grads["b_up"].dtype == torch.bfloat16 and grads["b_down"].dtype == torch.bfloat16
    assert (grads["b_up"][3] == 0).all() and (grads["b_down"][3] == 0).all()
    assert (grads["weights"][inp["ids"] == -1] == 0).all()
    for kwargs in (dict(deterministic=True), dict(recompute=True)):
        out2, grads2 = run_fused_experts(inp, activation, **kwargs)
        assert_bitwise(out2, out, f"{kwargs}: out")
        for name in grads:
            assert_bitwise(grads2[name], grads[name], f"{kwargs}: grad {name}")


@pytest.mark.parametrize("activation", ["gelu_erf", "geglu_erf"])
def test_fp32_fused_experts_biases_cuda(activation, seed):
    inp = expert_inputs(seed, N, D, F, E, K, activation=activation, device=CUDA,
                        bias=("b_up", "b_down"))
    check_experts(inp, activation, tol=FP32_TOL)


@pytest.mark.parametrize("case", ["softmax_renorm", "recompute", "capacity_probs"])
def test_bf16_fused_moe_gelu_erf_biases(case, seed):
    """Megatron-Core's default MoE MLP (exact gelu, biases in both GEMMs) through fused_moe:
    the gate's gradient includes the b_down term of the routing weights' gradient."""
    kwargs = _moe_kwargs(case, seed, E)
    inp = moe_inputs(seed, N, D, F, E, activation="gelu_erf", dtype=torch.bfloat16,
                     gate_scale=2.0, device=CUDA, bias=("b_up", "b_down"))
    check_moe(inp, K, tol=BF16_TOL, activation="gelu_erf", **kwargs)


@pytest.mark.parametrize("dw_kernel", [False, True], ids=["dw_mm", "dw_kernel"])
def test_router_logits_backward_bf16_split(dw_kernel):
    """``RouterLogitsFunction``'s backward for bf16 on CUDA runs on the tensor cores (dlogits
    as three bf16 pieces): dx and dW within one bf16 ulp of the exact gradients plus fp32
    accumulation's error bound, as the fp32 GEMMs' path; dlogits spans eight decades. dW by
    ``torch.mm`` or by ``routing.pieces_dw`` (``router_dw_kernel``; chunks of 512 tokens:
    four partial sums)."""
    from moe_plugin.autograd.router import RouterLogitsFunction
    from moe_plugin.kernels import tuning
    g = torch.Generator().manual_seed(0)
    n, d, e = 2048, 512, 128
    x = torch.randn(n, d, generator=g).to(DEVICE, torch.bfloat16)
    w = (torch.randn(e, d, generator=g) / d ** 0.5).to(DEVICE, torch.bfloat16)
    dl = (torch.randn(n, e, generator=g) * torch.logspace(-6, 2, e)).to(DEVICE)
    exact = {"dx": dl.double() @ w.double(), "dw": dl.double().t() @ x.double()}
    bound = {"dx": dl.double().abs() @ w.double().abs(),
             "dw": dl.double().abs().t() @ x.double().abs()}
    got = {}
    for split in (True, False):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        with tuning.override(router_split_bwd=split, router_dw_kernel=dw_kernel,
                             router_dw_block=(128, 128, 64, 8, 2, 512)):
            RouterLogitsFunction.apply(xl, wl).backward(dl)
        got[split] = {"dx": xl.grad, "dw": wl.grad}
        for name in ("dx", "dw"):
            ref = exact[name]
            ulp = 2.0 ** (torch.floor(torch.log2(ref.abs().clamp(min=1e-30))) - 7)
            err = (got[split][name].double() - ref).abs()
            assert (err <= ulp + 2.0 ** -20 * bound[name]).all(), (split, name)
    same = [(got[True][k] == got[False][k]).float().mean().item() for k in ("dx", "dw")]
    assert min(same) > 0.9, same


@pytest.mark.parametrize("e", [128, 256, 8])
def test_router_logits_shared_input_bf16_split(e):
    """With the input shared (``share_input``: the experts' dx arriving as the alias's
    gradient), the bf16 split backward adds ``dlogits · W`` to it inside the GEMM: within one
    bf16 rounding of the exact sum plus fp32 accumulation's error bound. E 128: one k-step,
    W's tile resident; 256: a k loop (``routing._pieces_dx_fit``: BK 64); 8: a k-step of 16."""
    from moe_plugin.autograd.router import RouterLogitsFunction
    g = torch.Generator().manual_seed(1)
    n, d = 2048, 512
    x = torch.randn(n, d, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
    w = (torch.randn(e, d, generator=g) / d ** 0.5).to(DEVICE, torch.bfloat16)
    dl = (torch.randn(n, e, generator=g) * torch.logspace(-6, 2, e)).to(DEVICE)
    dxo = torch.randn(n, d, generator=g).to(DEVICE, torch.bfloat16)
    logits, xa = RouterLogitsFunction.apply(x, w, True)
    torch.autograd.backward([logits, xa], [dl, dxo])
    exact = dxo.double() + dl.double() @ w.double()
    bound = dxo.double().abs() + dl.double().abs() @ w.double().abs()
    ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp(min=1e-30))) - 7)
    err = (x.grad.double() - exact).abs()
    assert (err <= ulp + 2.0 ** -20 * bound).all()


@pytest.mark.parametrize("e", [128, 256, 8])
def test_pieces_gather_reduce_bf16(e):
    """``routing.pieces_gather_reduce`` (the experts' dx reduction with the router's split-form
    dx product in it): within one bf16 rounding of the exact ``Σ_i piece_i · W + Σ_j y[slot]``
    plus fp32 accumulation's bound, at fine_30b's block (E 128: two k-steps; 256; 8: a k-step
    of 16 masked), unused slots and rows not a multiple of the token tile."""
    from moe_plugin.kernels import routing
    g = torch.Generator().manual_seed(3)
    n, d, k = 1000, 512, 4
    meta = _ragged_meta(g, n, k, max(e, 8))
    y = torch.randn(n * k, d, generator=g).to(CUDA, torch.bfloat16)
    w = (torch.randn(e, d, generator=g) / d ** 0.5).to(CUDA, torch.bfloat16)
    dl = (torch.randn(n, e, generator=g) * torch.logspace(-6, 2, e)).to(CUDA)
    p3 = routing.split_bf16_pieces(dl, 3)
    got = routing.pieces_gather_reduce(y, meta, p3, w, torch.bfloat16)
    pos = meta.slot_pos.view(n, k).long()
    rows = torch.where((pos >= 0)[..., None], y.double()[pos.clamp(min=0)], 0.0)
    exact = rows.sum(1) + p3.double().view(n, 3, e).sum(1) @ w.double()
    bound = rows.abs().sum(1) + p3.double().view(n, 3, e).abs().sum(1) @ w.double().abs()
    ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp(min=1e-30))) - 7)
    assert ((got.double() - exact).abs() <= ulp / 2 + 2.0 ** -20 * bound).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_routed_layer_matches_separate_functions(dtype):
    """``fused_moe`` with router and experts as one Function (``tuning.router_fused_dx``)
    against separate Functions: output, routing and the losses bitwise equal; the gate's and
    the experts' weight gradients bitwise equal; dx within one rounding of the dtype (the
    router's dx now joins the experts' reduction before the one rounding); with the aux and z
    losses and a gradient reaching ``topk_weights`` from outside."""
    import moe_plugin
    from moe_plugin.kernels import tuning
    g = torch.Generator().manual_seed(5)
    n, d, f, e, k = 2048, 512, 256, 16, 4
    x0 = torch.randn(n, d, generator=g).to(CUDA, dtype)
    g0 = (torch.randn(e, d, generator=g) / d ** 0.5).to(CUDA, dtype)
    wu0 = (torch.randn(e, 2 * f, d, generator=g) / d ** 0.5).to(CUDA, dtype)
    wd0 = (torch.randn(e, d, f, generator=g) / f ** 0.5).to(CUDA, dtype)
    dout = torch.randn(n, d, generator=g).to(CUDA, dtype)
    res = {}
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x0, g0, wu0, wd0)]
        with tuning.override(router_fused_dx=fused):
            out, info = moe_plugin.fused_moe(*leaves, k, aux_loss_coeff=0.01,
                                             z_loss_coeff=0.001)
            loss = ((out.float() * dout.float()).sum() + 50 * info["aux_loss"]
                    + 50 * info["z_loss"] + 0.3 * info["topk_weights"].sum())
            loss.backward()
        res[fused] = dict(out=out, ids=info["topk_ids"], aux=info["aux_loss"],
                          weights=info["topk_weights"].detach(),
                          z=info["z_loss"], dx=leaves[0].grad, dgate=leaves[1].grad,
                          dwu=leaves[2].grad, dwd=leaves[3].grad)
    for name in ("out", "ids", "aux", "z", "dgate", "dwu", "dwd"):
        assert torch.equal(res[True][name], res[False][name]), name
    # dx: the separate Functions round the experts' part (``ex``) before adding the router's,
    # the one Function rounds the sum once: within an ulp of the result and one of ``ex``
    x = x0.clone().requires_grad_()
    out = moe_plugin.fused_experts(x, res[True]["ids"], res[True]["weights"], wu0, wd0)
    ex, = torch.autograd.grad(out, x, dout)
    a, b = res[True]["dx"].double(), res[False]["dx"].double()
    mant = 7 if dtype == torch.bfloat16 else 23

    def ulp(t):
        return 2.0 ** (torch.floor(torch.log2(t.double().abs().clamp(min=1e-30))) - mant)
    assert ((a - b).abs() <= ulp(b) + ulp(ex) + 1e-6 * b.abs().max()).all()


def _ragged_meta(g, n, k, e):
    """Routing with an empty expert (3), an expert with 5 tokens (5: fewer than a tile), counts
    not multiples of the 128-row tile and unused slots (-1: rows past the last expert's)."""
    from moe_plugin.kernels.permute import permute_metadata
    ids = torch.randint(0, e, (n, k), generator=g, dtype=torch.int32)
    ids[ids == 3] = 0
    ids[ids == 5] = 4
    ids[:5, 1] = 5
    ids[-9:, 0] = -1
    meta = permute_metadata(ids.to(CUDA), e)
    counts = meta.counts.tolist()
    assert counts[3] == 0 and 0 < counts[5] < 128 and any(c % 128 for c in counts)
    return meta


@pytest.mark.parametrize("kind", ["wgrad_up", "wgrad_up_swap", "wgrad_down"])
@pytest.mark.parametrize("mode,out_dtype,tma", [
    (None, torch.bfloat16, 0), (None, torch.bfloat16, 1), (1, torch.float32, 0),
    (2, torch.float32, 0), (2, torch.bfloat16, 0)],
    ids=["store_regs", "store_tma", "atomic_fp32", "rmw_fp32", "rmw_bf16"])
@pytest.mark.parametrize("programs", [None, 3])
@pytest.mark.parametrize("widths", [(200, 136), (320, 384), (320, 192), (328, 192)],
                         ids=["odd", "aligned", "fast_launch_test320", "fast_launch_test328"])
def test_gluon_bf16_wgrad_equals_triton(kind, mode, out_dtype, tma, programs, widths, tune):
    """On Hopper the bf16 weight gradients run as the Gluon kernel (``gluon_gemm.
    segment_mm_direct``: the contiguous operand by TMA, the gathered one by ``cp.async`` from
    the producer warps, warp-specialised, persistent). Against the Triton segment kernel it
    replaces, which sums the same 64-token k-steps in the same order: bitwise equal, stored
    or added into a buffer (atomic fp32, read-add-write fp32 / bf16); ragged experts with
    token counts not multiples of 64, an empty expert, an expert with fewer tokens than a
    k-step, MO and NO not multiples of the tile: multiples of 8 only (the 128-wide tiles of
    ``gluon_bf16_seg_narrow_config``) or of 64 (the 256-wide default tiles, but for fp32
    read-add-write), and the widths of ``test_gluon_fast_launch_equals_plain`` (320 / 328 x
    192); dW_up also computed transposed (``gluon_bf16_wgrad_swap``); the persistent grid at
    one program per SM and at 3 programs (there with the output's tiles in bands of two row
    tiles, ``GROUP_M``); unused slots' rows (NaN) after the last expert's; the stored output
    by registers and (``store_tma``: ``gluon_bf16_seg_config["TMA_STORE"]``, the default) by
    TMA stores of column parts, those across an expert's last row or column by masked
    stores."""
    from moe_plugin.kernels import gluon_gemm as GF, grouped_gemm as G, tuning
    if not GF.available(tuning.current(), torch.empty(0, device=CUDA)):
        pytest.skip("Gluon Hopper kernels not available here")
    # wgrad_up_swap: dW_up computed transposed (gluon_bf16_wgrad_swap; a read-add-write into
    # the output takes the untransposed kernel)
    # 3 programs: the output tiles in bands of 2 row tiles (GROUP_M; 3 row tiles at the
    # aligned widths: a band cut short), else the default bands (wider than the rows)
    seg = tuning.current().gluon_bf16_seg_config
    tune(gluon_programs=programs, wgrad_accum_mode=mode,
         gluon_bf16_wgrad_swap=kind == "wgrad_up_swap",
         gluon_bf16_seg_config={**seg, "GROUP_M": 2 if programs == 3 else seg["GROUP_M"],
                                "TMA_STORE": tma})
    kind = kind.replace("_swap", "")
    g = torch.Generator().manual_seed(21)
    n, k, e = 700, 2, 6
    d, f2 = widths
    meta = _ragged_meta(g, n, k, e)
    counts = meta.counts.tolist()
    # expert 5: fewer tokens than a 64-token k-step
    assert 0 < counts[5] < 64 and any(c % 64 for c in counts)
    s = meta.sorted_slot.numel()
    used = int(meta.offsets[-1])
    assert used < s
    x = torch.randn(n, d, generator=g).to(CUDA, torch.bfloat16)
    # the expert-order operand's rows of unused slots hold NaN (never written in a pass):
    # a k-step reading past an expert's tokens must not pick them up
    ordered = torch.randn(s, f2, generator=g).to(CUDA, torch.bfloat16)
    ordered[used:] = float("nan")
    if kind == "wgrad_up":                    # dW_up[e] = dpre_eᵀ · x[rows]
        run = lambda out: G.wgrad_up(ordered, x, meta, out=out)
        shape = (e, f2, d)
    else:                                     # dW_down[e] = dout[rows]ᵀ · hw_e
        run = lambda out: G.wgrad_down(x, ordered, meta, out=out)
        shape = (e, d, f2)
    init = torch.randn(shape, generator=g).to(CUDA, out_dtype)
    res = []
    for enabled in (False, True):
        with tuning.override(gluon_bf16_wgrad=enabled):
            out = None if mode is None else init.clone()
            got = run(out)
        assert out is None or got is out
        res.append(got)
    assert res[0].isfinite().all(), "the Triton kernel read an unused slot's row"
    diff = (res[1].float() - res[0].float()).abs().max().item()
    assert torch.equal(res[1], res[0]), f"{kind}: Gluon against Triton, max difference {diff}"
    if mode is not None:
        assert torch.equal(res[1][3], init[3]), "the empty expert's buffer changed"
    else:
        assert not res[1][3].any(), "the empty expert's gradient is not zero"


@pytest.mark.parametrize("kind", ["down", "dx", "dh"])
def test_gluon_bf16_grouped_many_experts_equals_triton(kind, tune, monkeypatch):
    """The row-grouped Gluon GEMMs (GEMM2, dx, dh' with A gathered) at 130 experts, most with
    fewer rows than a tile, expert 0 with several tiles, every 17th empty (a 256-wide vector
    of experts when a program finds its tile's expert): bitwise the Triton kernel's output
    (``_grouped_gluon_equals_triton``)."""
    from moe_plugin.kernels import gluon_gemm as GF, tuning
    from moe_plugin.kernels.permute import permute_metadata
    if not GF.available(tuning.current(), torch.empty(0, device=CUDA)):
        pytest.skip("Gluon Hopper kernels not available here")
    g = torch.Generator().manual_seed(29)
    n, k, e, d, f = 1200, 8, 130, 256, 192
    ids = torch.randint(0, e, (n, k), generator=g, dtype=torch.int32)
    ids[ids % 17 == 3] = 0      # experts 3, 20, 37, ...: no tokens; expert 0: over 128 rows
    meta = permute_metadata(ids.to(CUDA), e)
    counts = meta.counts.tolist()
    assert counts[3] == 0 and max(counts) > 128 and min(c for c in counts if c) < 128
    _grouped_gluon_equals_triton(kind, meta, g, d, f, monkeypatch)


def _count_calls(monkeypatch, module, name):
    """Counts the calls of ``module.name`` (still called) in the returned list's length."""
    calls, orig = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    return calls


def _count_ctas(monkeypatch, GF):
    """The cluster size (CTAs) of each persistent Gluon launch, in the returned list."""
    ctas, programs = [], GF._programs
    monkeypatch.setattr(GF, "_programs", lambda *a, **kw: ctas.append(a[3] if len(a) > 3 else 1)
                        or programs(*a, **kw))
    return ctas


def _launch_values(monkeypatch, GF, key):
    """The keyword argument ``key`` of each Gluon launch through ``gluon_gemm.launcher``, in
    the returned list."""
    seen, real = [], GF.launcher

    def spy(kernel, fast):
        grids = real(kernel, fast)

        class _Grid:
            def __getitem__(self, grid):
                run = grids[grid]

                def call(*args, **kwargs):
                    seen.append(kwargs.get(key))
                    return run(*args, **kwargs)
                return call
        return _Grid()
    monkeypatch.setattr(GF, "launcher", spy)
    return seen


@pytest.mark.parametrize("kind", ["down", "dx", "dh"])
@pytest.mark.parametrize("programs", [None, 3])
@pytest.mark.parametrize("variant", ["st", "tma_st", "tma_parts", "pingpong", "cluster",
                                     "pingpong_cluster", "tall", "tall_st", "defer"])
def test_gluon_bf16_grouped_equals_triton(kind, programs, variant, tune, monkeypatch):
    """On Hopper, with ``gluon_bf16_grouped``, GEMM2 (B = W_downᵀ, K-major), dx (B = W_up,
    N-major) and the split form's dh' (A = dout rows gathered by ``cp.async``, B = W_down,
    N-major) run as the Gluon row-grouped kernel (``gluon_gemm.grouped_mm_direct``). Against
    the Triton kernel it replaces (the same 64-wide k-steps in order): bitwise equal; ragged
    experts, an empty one, output widths not multiples of the 128 tile, unused slots whose rows
    hold NaN, the persistent grid at one program per SM and at 3 programs; the tile stored
    by registers (``st``: ``tuning.GLUON_BF16_REG_STORE``), or (``tma_st``:
    ``gluon_bf16_config["TMA_STORE"]`` True) through shared memory by TMA in 16-row chunks, the
    chunk across an expert's end by masked stores, or (``tma_parts``: TMA_STORE 4, the
    default) in four column parts of each consumer's 64 rows through two small buffers, a part
    across an expert's end by masked stores, buffers reused across tiles whole and partial (3
    programs: many tiles each); ``pingpong``
    (``gluon_bf16_config["PINGPONG"]``, 128 x 128 tiles): each consumer warpgroup computes
    whole tiles in turn; ``cluster`` (``gluon_bf16_config["CLUSTER"]``, Triton >= 3.8):
    GEMM2 and dx launched as clusters of two CTAs along the columns, A's tiles multicast to
    both, the second CTA's columns partly past N; dh' (A gathered) along the rows, B's tiles
    multicast, the second CTA's rows past an expert's end in its last tiles;
    ``pingpong_cluster``: GEMM2 and dx with both (dh' ping-pong on one CTA); ``tall``
    (``tuning.GLUON_BF16_TALL``, 256 x 128 tiles: each consumer 128 rows) with the default
    TMA-parts store, ``tall_st`` by registers; ``defer`` (``tuning.GLUON_BF16_DEFER``) the
    second column half of each tile's TMA-parts stores issued once the next tile's first MMA
    is (the last tile's after the loop; 3 programs: a partial tile held across whole ones),
    GEMM2 and dx only (dh' with its gathered A launched without it)."""
    from moe_plugin.kernels import gluon_gemm as GF, tuning
    if not GF.available(tuning.current(), torch.empty(0, device=CUDA)):
        pytest.skip("Gluon Hopper kernels not available here")
    if "cluster" in variant and not GF.cluster_compiles():
        pytest.skip(f"this Triton's Gluon has no TMA multicast (from {GF.GLUON_CLUSTER_FROM})")
    extra = {"st": tuning.GLUON_BF16_REG_STORE, "tma_st": {"TMA_STORE": True, "STAGES": 3},
             "tma_parts": {"TMA_STORE": 4},
             "pingpong": tuning.GLUON_BF16_PINGPONG,
             "cluster": tuning.GLUON_BF16_CLUSTER,
             "pingpong_cluster": {**tuning.GLUON_BF16_PINGPONG,
                                  **tuning.GLUON_BF16_CLUSTER},
             "tall": tuning.GLUON_BF16_TALL,
             "tall_st": {**tuning.GLUON_BF16_TALL, **tuning.GLUON_BF16_REG_STORE},
             "defer": tuning.GLUON_BF16_DEFER}[variant]
    tune(gluon_programs=programs,
         gluon_bf16_config={**tuning.current().gluon_bf16_config, **extra})
    g = torch.Generator().manual_seed(23)
    n, k, e, d, f = 700, 2, 6, 320, 192
    want = 2 if variant == "cluster" or (variant == "pingpong_cluster" and kind != "dh") else 1
    defers = _launch_values(monkeypatch, GF, "DEFER")
    _grouped_gluon_equals_triton(kind, _ragged_meta(g, n, k, e), g, d, f, monkeypatch, want)
    assert defers == [variant == "defer" and kind != "dh"], defers


def _grouped_gluon_equals_triton(kind, meta, g, d, f, monkeypatch, ctas_want=1):
    """Runs row-grouped GEMM ``kind`` ("down": GEMM2, "dx", "dh": the split form's dh' with
    A gathered) on ``meta``'s routing (random bf16 operands from ``g``; rows of unused slots
    NaN) by the Triton kernel, then by the Gluon kernel, which must serve it once, launched as
    clusters of ``ctas_want``: bitwise the same rows, the Triton kernel's finite."""
    from moe_plugin.kernels import gluon_gemm as GF, grouped_gemm as G, tuning
    e, k = meta.num_experts, meta.top_k
    s = meta.sorted_slot.numel()
    n = s // k
    used = int(meta.offsets[-1])

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(CUDA, torch.bfloat16)

    w_up, w_down = rnd(e, 2 * f, d) * 0.1, rnd(e, d, f) * 0.1
    if kind == "down":
        h = rnd(s, f)
        h[used:] = float("nan")
        run = lambda: G.expert_down(h, w_down, meta)
    elif kind == "dx":
        dpre = rnd(s, 2 * f)
        dpre[used:] = float("nan")
        run = lambda: G.expert_dx(dpre, w_up, meta)
    else:
        dout, pre = rnd(n, d), rnd(s, 2 * f)
        wts = torch.rand(n, k, generator=g).to(CUDA)
        run = lambda: G.expert_up_bwd(dout, w_down, pre, meta, wts, 0, True)
    res = []
    calls = _count_calls(monkeypatch, GF, "grouped_mm_direct")
    ctas = _count_ctas(monkeypatch, GF)
    for enabled in (False, True):
        with tuning.override(gluon_bf16_grouped=enabled, split_up_bwd=True):
            out = run()
        res.append(out if isinstance(out, tuple) else (out,))
    assert len(calls) == 1, "the Gluon kernel did not serve the GEMM"
    assert ctas == [ctas_want], f"launched as clusters of {ctas}, expected [{ctas_want}]"
    for got, ref in zip(res[1], res[0]):
        ref, got = ref[:used], got[:used]
        assert ref.isfinite().all(), "the Triton kernel read an unused slot's row"
        diff = (got.float() - ref.float()).abs().max().item()
        assert torch.equal(got, ref), f"{kind}: Gluon against Triton, max difference {diff}"


@pytest.mark.parametrize("kind", ["down", "wgrad_down"])
def test_gluon_fast_launch_equals_plain(kind, tune, monkeypatch):
    """``tuning.fast_launch`` (``fast_launch.FastLaunch``): once a Gluon kernel has launched
    with arguments of a specialisation, the next launches with new tensors of it skip
    ``JITFunction.run`` and compute what ``JITFunction.run``'s launches compute, bitwise (the
    row-grouped kernel: GEMM2; the weight-gradient kernel: dW_down); a new specialisation
    (an odd output width) goes through ``JITFunction.run`` again."""
    from triton.runtime.jit import JITFunction

    from moe_plugin.kernels import fast_launch as FL, gluon_gemm as GF, grouped_gemm as G, tuning
    if not GF.available(tuning.current(), torch.empty(0, device=CUDA)):
        pytest.skip("Gluon Hopper kernels not available here")
    # a fast path of its own: the kernels earlier tests launched (fast launch is the default)
    # must not be known to it
    monkeypatch.setattr(FL, "_WRAPPED", {})
    g = torch.Generator().manual_seed(29)
    n, k, e, f = 700, 2, 6, 192
    meta = _ragged_meta(g, n, k, e)
    s = meta.sorted_slot.numel()
    used = int(meta.offsets[-1])

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(CUDA, torch.bfloat16)

    def inputs(d):
        if kind == "down":
            return rnd(s, f), rnd(e, d, f) * 0.1
        return rnd(n, d), rnd(s, f)

    def run(x, w):
        if kind == "down":
            return G.expert_down(x, w, meta)[:used]
        return G.wgrad_down(x, w, meta)  # dout [n, d] (token rows), hw [s, f] (expert order)

    gluon_kernel = GF._grouped_mm_ws if kind == "down" else GF._segment_mm_ws
    runs = []  # the Gluon kernel's launches through JITFunction.run
    plain_run = JITFunction.run

    def counted(self, *a, **kw):
        if self is gluon_kernel:
            runs.append(1)
        return plain_run(self, *a, **kw)

    monkeypatch.setattr(JITFunction, "run", counted)
    for d in (320, 328):  # 328: a width that is not a multiple of 16 (another specialisation)
        first, second = inputs(d), inputs(d)
        with tuning.override(fast_launch=False):
            ref = [run(*first), run(*second)]
        with tuning.override(fast_launch=True):
            before = len(runs)
            run(*first)  # new to the fast path: JITFunction.run, its kernel kept
            assert len(runs) == before + 1, "the Gluon kernel did not serve the GEMM"
            got = [run(*second), run(*first)]
            assert len(runs) == before + 1, "a repeated launch went through JITFunction.run"
        assert torch.equal(got[0], ref[1]) and torch.equal(got[1], ref[0])


@pytest.mark.parametrize("act,gated", [(0, True), (2, True), (3, False)],
                         ids=["swiglu", "swiglu_oai", "gelu"])
@pytest.mark.parametrize("store", ["pre_h", "h", "pre"])
@pytest.mark.parametrize("variant", ["", "pingpong", "cluster"])
def test_gluon_bf16_up_equals_triton(act, gated, store, variant, tune, monkeypatch):
    """GEMM1 + activation on the Gluon row-grouped kernel (``gluon_bf16_grouped``): x's rows
    gathered by ``cp.async``, W_up K-major, gated: the gate and up tiles in one ring slot and
    two accumulators; pre and / or h stored (h from the rounded pre-activation); not gated
    also with the consumers on whole tiles in turn (``PINGPONG``); launched as clusters of two
    CTAs along the rows, W_up's tiles multicast (``CLUSTER``, Triton >= 3.8).
    Against the Triton kernel: bitwise equal (ragged experts, an empty one, F not a multiple
    of the tile, 3 programs)."""
    from moe_plugin.kernels import gluon_gemm as GF, grouped_gemm as G, tuning
    if not GF.available(tuning.current(), torch.empty(0, device=CUDA)):
        pytest.skip("Gluon Hopper kernels not available here")
    if variant == "pingpong" and gated:
        pytest.skip("PINGPONG: one accumulator (GEMM1 not gated)")
    if variant == "cluster" and not GF.cluster_compiles():
        pytest.skip(f"this Triton's Gluon has no TMA multicast (from {GF.GLUON_CLUSTER_FROM})")
    tune(gluon_programs=3 if store == "h" else None)
    if variant == "pingpong":
        tune(gluon_bf16_config={**tuning.current().gluon_bf16_config,
                                **tuning.GLUON_BF16_PINGPONG}, gluon_bf16_up_config={})
    elif variant == "cluster":
        tune(gluon_bf16_config={**tuning.current().gluon_bf16_config,
                                **tuning.GLUON_BF16_CLUSTER})
    g = torch.Generator().manual_seed(29)
    n, k, e, d, f = 700, 2, 6, 320, 192
    meta = _ragged_meta(g, n, k, e)
    used = int(meta.offsets[-1])
    x = (torch.randn(n, d, generator=g) * 0.5).to(CUDA, torch.bfloat16)
    w_up = (torch.randn(e, (2 if gated else 1) * f, d, generator=g) * 0.1).to(CUDA,
                                                                             torch.bfloat16)
    res = []
    calls = _count_calls(monkeypatch, GF, "grouped_mm_direct")
    ctas = _count_ctas(monkeypatch, GF)
    for enabled in (False, True):
        with tuning.override(gluon_bf16_grouped=enabled):
            pre, h = G.expert_up(x, w_up, meta, act, gated, store_pre="pre" in store,
                                 store_h=store.endswith("h"))
        res.append([t[:used] for t in (pre, h) if t is not None])
    assert len(calls) == 1, "the Gluon kernel did not serve GEMM1"
    assert ctas == [2 if variant == "cluster" else 1], f"launched as clusters of {ctas}"
    for got, ref in zip(res[1], res[0]):
        diff = (got.float() - ref.float()).abs().max().item()
        assert torch.equal(got, ref), f"GEMM1: Gluon against Triton, max difference {diff}"


@pytest.mark.parametrize("activation", ["swiglu", "swiglu_oai", "gelu"])
def test_gluon_bf16_dh_act_bwd_equals_split(activation, tune, monkeypatch):
    """With ``gluon_bf16_fuse_act_bwd`` the bf16 dh' GEMM (dout rows gathered by ``cp.async``,
    W_down N-major) runs the activation backward in its Gluon epilogue (the pre-activation
    tiles TMA-loaded, the routing weights gathered by the producer warps, dh' never stored).
    Against the split form (the Gluon dh' GEMM storing dh', then ``_act_bwd_kernel``): the
    output, dx, dW_up and dW_down bitwise equal, the routing-weight gradient (its row sums
    summed in another order) to fp32 rounding; gated and not, F not a multiple of the tile,
    an empty expert, unused slots, 3 persistent programs."""
    from conftest import rel_err
    from moe_plugin import fused_experts
    from moe_plugin.kernels import gluon_gemm as GF, tuning
    if not GF.available(tuning.current(), torch.empty(0, device=CUDA)):
        pytest.skip("Gluon Hopper kernels not available here")
    tune(gluon_programs=3, gluon_bf16_grouped=True)
    g = torch.Generator().manual_seed(31)
    n, k, e, d, f = 600, 2, 6, 320, 192
    gated = activation != "gelu"
    x = torch.randn(n, d, generator=g).to(CUDA, torch.bfloat16)
    ids = torch.randint(0, e, (n, k), generator=g, dtype=torch.int32)
    ids[ids == 4] = 1   # expert 4: no tokens
    ids[:6, 0] = -1     # unused slots
    ids = ids.to(CUDA)
    w = torch.rand(n, k, generator=g).to(CUDA)
    w_up = (torch.randn(e, (2 if gated else 1) * f, d, generator=g) * 0.1).to(CUDA,
                                                                             torch.bfloat16)
    w_down = (torch.randn(e, d, f, generator=g) * 0.1).to(CUDA, torch.bfloat16)
    dout = torch.randn(n, d, generator=g).to(CUDA, torch.bfloat16)
    calls = _count_calls(monkeypatch, GF, "grouped_mm_act_bwd")
    res = []
    for fused in (False, True):
        tune(gluon_bf16_fuse_act_bwd=fused)
        leaves = [t.clone().requires_grad_() for t in (x, w, w_up, w_down)]
        out = fused_experts(leaves[0], ids, leaves[1], leaves[2], leaves[3], activation)
        res.append((out, *torch.autograd.grad(out, leaves, dout)))
    assert len(calls) == 1, "the fused Gluon dh' GEMM did not run"
    for name, a, b in zip(("out", "dx", "d_topk_weights", "dw_up", "dw_down"), *res):
        if name == "d_topk_weights":
            assert rel_err(b, a) < 1e-6, f"{activation}: {name} {rel_err(b, a):.2e}"
        else:
            assert torch.equal(a, b), f"{activation} {name}: fused and split forms differ"


def test_triton_act_bwd_epilogue_with_gluon_grouped_on(tune):
    """``split_up_bwd=False`` (the Triton dh' GEMM with the activation backward in its
    epilogue) while the Gluon row-grouped GEMMs serve the rest: the dh' GEMM stays on the Triton
    kernel (the plain Gluon launcher has no activation-backward epilogue; it once took this
    GEMM and failed for shared memory on the H200), and every gradient equals the all-Triton
    run's bitwise (the Gluon GEMMs equal Triton's)."""
    from moe_plugin import fused_experts
    from moe_plugin.kernels import gluon_gemm as GF, tuning
    if not GF.available(tuning.current(), torch.empty(0, device=CUDA)):
        pytest.skip("Gluon Hopper kernels not available here")
    g = torch.Generator().manual_seed(37)
    n, k, e, d, f = 512, 2, 6, 256, 192
    x = torch.randn(n, d, generator=g).to(CUDA, torch.bfloat16)
    ids = torch.randint(0, e, (n, k), generator=g, dtype=torch.int32).to(CUDA)
    w = torch.rand(n, k, generator=g).to(CUDA)
    w_up = (torch.randn(e, 2 * f, d, generator=g) * 0.1).to(CUDA, torch.bfloat16)
    w_down = (torch.randn(e, d, f, generator=g) * 0.1).to(CUDA, torch.bfloat16)
    dout = torch.randn(n, d, generator=g).to(CUDA, torch.bfloat16)
    res = []
    for gluon in (False, True):
        tune(split_up_bwd=False, gluon_bf16_grouped=gluon, gluon_bf16_fuse_act_bwd=False)
        leaves = [t.clone().requires_grad_() for t in (x, w, w_up, w_down)]
        out = fused_experts(leaves[0], ids, leaves[1], leaves[2], leaves[3], "swiglu")
        res.append((out, *torch.autograd.grad(out, leaves, dout)))
    for name, a, b in zip(("out", "dx", "d_topk_weights", "dw_up", "dw_down"), *res):
        assert torch.equal(a, b), f"{name}: Gluon-on and all-Triton runs differ"
