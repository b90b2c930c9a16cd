"""``fused_moe`` (router + experts, Triton forced) against ``reference.moe`` in float64.

Routing decisions (``topk_ids``, ``tokens_per_expert``) must equal the reference's exactly;
the output, the routing weights, the aux and z losses and the gradients of hidden states,
gate weight, w_up and w_down (through ``(out·g).sum() + 3·aux + 2·z``) to a relative L2 error
of 1e-5.
"""
import math

import pytest
import torch

from conftest import (assert_losses_exercised, DEVICE, FP32_TOL, MOE_GRAD_NAMES, assert_bitwise, assert_close,
                      check_moe, moe_inputs, rel_err, run_fused_moe, run_reference_moe)
from moe_plugin import capacity_drop, fused_moe, reference
from moe_plugin.config import expert_capacity

pytestmark = pytest.mark.usefixtures("poison_empty")


def _ref_logits(inp):
    return inp["x"].double() @ inp["gate"].double().t()


def _plain_ids(inp, top_k, score_func):
    ids, _, _ = reference.route(_ref_logits(inp), top_k, score_func=score_func)
    return ids


# name: (N, D, F, E, top_k, activation, fused_moe kwargs, what the case must exercise)
CASES = {
    "softmax_renorm": (32, 32, 32, 8, 2, "swiglu",
                       dict(aux_loss_coeff=0.01, z_loss_coeff=0.001), None),
    "softmax_no_renorm": (32, 32, 32, 8, 2, "geglu",
                          dict(renormalize=False, aux_loss_coeff=0.1), None),
    "softmax_scaling": (32, 32, 24, 8, 3, "relu2",
                        dict(scaling_factor=2.5, z_loss_coeff=0.01), None),
    "softmax_bias": (32, 32, 24, 8, 2, "swiglu",
                     dict(expert_bias=0.05, aux_loss_coeff=0.1), "bias"),
    "sigmoid_renorm": (32, 32, 24, 8, 2, "swiglu",
                       dict(score_func="sigmoid", aux_loss_coeff=0.1, z_loss_coeff=0.01), None),
    "sigmoid_no_renorm": (32, 32, 24, 8, 3, "gelu",
                          dict(score_func="sigmoid", renormalize=False, aux_loss_coeff=0.1),
                          None),
    "sigmoid_bias": (32, 32, 24, 8, 2, "swiglu",
                     dict(score_func="sigmoid", expert_bias=0.1, aux_loss_coeff=0.1,
                          z_loss_coeff=0.01), "bias"),
    "groups_softmax": (32, 32, 16, 16, 4, "swiglu",
                       dict(num_groups=4, group_topk=2, aux_loss_coeff=0.1), "groups"),
    "groups_sigmoid_bias_scaling": (32, 32, 16, 16, 4, "swiglu",
                                    dict(score_func="sigmoid", expert_bias=0.1, num_groups=4,
                                         group_topk=2, scaling_factor=2.5, aux_loss_coeff=0.1,
                                         z_loss_coeff=0.01), "groups"),
    "k1_no_renorm": (32, 32, 32, 8, 1, "silu", dict(renormalize=False, aux_loss_coeff=0.1),
                     None),
    # (k=1 sigmoid with renormalize has weight s/(s+1e-20) = 1: its true gradient is ~1e-20,
    # below fp32 rounding, so only the un-normalised variant has a meaningful gradient to test)
    "k1_sigmoid_no_renorm": (32, 32, 32, 8, 1, "swiglu",
                             dict(score_func="sigmoid", renormalize=False, z_loss_coeff=0.01),
                             None),
    "capacity_probs": (32, 32, 24, 8, 2, "swiglu",
                       dict(capacity_factor=0.5, drop_policy="probs", aux_loss_coeff=0.1,
                            z_loss_coeff=0.01), "drops"),
    "capacity_position": (32, 32, 24, 8, 2, "swiglu",
                          dict(capacity_factor=0.5, drop_policy="position", aux_loss_coeff=0.1),
                          "drops"),
    "capacity_sigmoid_bias": (32, 32, 24, 8, 3, "gelu",
                              dict(score_func="sigmoid", expert_bias=0.1, capacity_factor=0.75,
                                   drop_policy="probs"), "drops"),
    "recompute": (32, 32, 32, 8, 2, "geglu",
                  dict(recompute=True, aux_loss_coeff=0.1, z_loss_coeff=0.01), None),
    "E300": (8, 32, 16, 300, 4, "swiglu", dict(aux_loss_coeff=0.1, z_loss_coeff=0.01), None),
    "E300_groups_sigmoid": (8, 32, 16, 300, 4, "swiglu",
                            dict(score_func="sigmoid", num_groups=3, group_topk=2,
                                 aux_loss_coeff=0.1), "groups"),
}


def _kwargs_for(case, seed, e):
    kwargs = dict(CASES[case][6])
    if "expert_bias" in kwargs:
        gen = torch.Generator().manual_seed(seed + 7)
        kwargs["expert_bias"] = (torch.randn(e, generator=gen) * kwargs["expert_bias"]).to(DEVICE)
    return kwargs


@pytest.mark.parametrize("case", CASES)
def test_fused_moe_matches_reference(case, seed):
    n, d, f, e, k, act, _, exercises = CASES[case]
    kwargs = _kwargs_for(case, seed, e)
    inp = moe_inputs(seed, n, d, f, e, activation=act, gate_scale=2.0)
    (out, info, grads), (ref, rinfo, _) = check_moe(inp, k, activation=act, **kwargs)

    ids = rinfo["topk_ids"]
    score_func = kwargs.get("score_func", "softmax")
    if exercises == "bias":      # the bias really changes the selection
        assert not torch.equal(ids, _plain_ids(inp, k, score_func))
    if exercises == "groups":    # the group limit really changes the selection
        assert not torch.equal(ids, _plain_ids(inp, k, score_func))
        groups = ids // (e // kwargs["num_groups"])
        assert all(len(set(row.tolist())) <= kwargs["group_topk"] for row in groups)
    if exercises == "drops":     # some slots are really dropped, capacity is respected
        cap = expert_capacity(n, k, e, kwargs["capacity_factor"])
        assert (ids == -1).sum() > 0
        assert rinfo["tokens_per_expert"].max() == cap
    else:
        assert (ids >= 0).all()
    assert_losses_exercised(kwargs, info, rinfo)
    if kwargs.get("renormalize", True):
        expected = kwargs.get("scaling_factor", 1.0)
        assert_close(info["topk_weights"].sum(-1), torch.full((n,), expected, dtype=torch.float64),
                     FP32_TOL, "renormalised weight sums")


def test_expert_bias_steers_selection_only(seed):
    """A large bias on one expert puts it in every token's top-k, but the weights are the plain
    (renormalised) sigmoid scores: the bias never enters them."""
    n, d, f, e, k = 24, 32, 16, 8, 2
    inp = moe_inputs(seed, n, d, f, e, gate_scale=2.0)
    bias = torch.zeros(e)
    bias[5] = 10.0
    (out, info, _), _ = check_moe(inp, k, score_func="sigmoid", expert_bias=bias.to(DEVICE))
    ids = info["topk_ids"].long()
    assert (ids == 5).any(dim=1).all()
    picked = torch.sigmoid(_ref_logits(inp)).gather(1, ids)
    expected = picked / picked.sum(-1, keepdim=True)
    assert_close(info["topk_weights"], expected, FP32_TOL, "weights without bias")
    assert (info["topk_weights"] < 1).all()


@pytest.mark.parametrize("drop_policy", ["probs", "position"])
def test_dropped_slots_get_zero_weight_gradient(drop_policy, seed):
    n, d, f, e, k = 32, 32, 16, 8, 2
    inp = moe_inputs(seed, n, d, f, e, gate_scale=2.0)
    out, info, grads = run_fused_moe(inp, k, weights_grad=True, capacity_factor=0.5,
                                     drop_policy=drop_policy)
    dropped = info["topk_ids"] == -1
    assert dropped.any() and (~dropped).any()
    dw = grads["topk_weights"]
    assert (dw[dropped] == 0).all()
    assert (dw[~dropped] != 0).all()
    # a token whose every slot was dropped gets no expert output
    all_dropped = dropped.all(dim=1)
    if all_dropped.any():
        assert (out[all_dropped] == 0).all()


def test_recompute_and_determinism_are_bitwise(seed):
    n, d, f, e, k = 32, 32, 24, 8, 2
    inp = moe_inputs(seed, n, d, f, e, gate_scale=2.0)
    kwargs = dict(score_func="sigmoid", expert_bias=torch.zeros(e, device=DEVICE) + 0.01,
                  capacity_factor=0.75, aux_loss_coeff=0.1, z_loss_coeff=0.01)
    runs = [run_fused_moe(inp, k, recompute=r, deterministic=True, **kwargs)
            for r in (False, False, True)]
    out0, info0, grads0 = runs[0]
    for out, info, grads in runs[1:]:
        assert_bitwise(out, out0, "out")
        for name in ("topk_ids", "topk_weights", "aux_loss", "z_loss", "tokens_per_expert"):
            assert_bitwise(info[name], info0[name], name)
        for name in MOE_GRAD_NAMES:
            assert_bitwise(grads[name], grads0[name], f"grad {name}")


def test_torch_backend_matches_reference(seed):
    """backend='torch' (the reference path of fused_moe) gives the same routing in fp32."""
    n, d, f, e, k = 16, 32, 16, 8, 2
    inp = moe_inputs(seed, n, d, f, e, gate_scale=2.0)
    (out_t, info_t, _), (ref, rinfo, rgrads) = check_moe(inp, k, aux_loss_coeff=0.1)
    import moe_plugin
    out, info = moe_plugin.fused_moe(inp["x"], inp["gate"], inp["w_up"], inp["w_down"], k,
                                     backend="torch", aux_loss_coeff=0.1)
    assert torch.equal(info["topk_ids"].long().cpu(), rinfo["topk_ids"].cpu())
    assert_close(out, ref, FP32_TOL, "torch backend out")
    assert_close(info["aux_loss"], rinfo["aux_loss"], FP32_TOL, "torch backend aux")


# ----------------------------------------------------------------------------------------------
# capacity_drop, directly

@pytest.mark.parametrize("drop_policy", ["probs", "position"])
@pytest.mark.parametrize("capacity_factor", [0.3, 0.75, 1.0, 4.0])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_capacity_drop_matches_reference(drop_policy, capacity_factor, ids_dtype, seed):
    n, k, e = 40, 3, 6
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(n, e, generator=gen).argsort(-1)[:, :k]
    ids[:, 0] = torch.where(torch.rand(n, generator=gen) < 0.5, 1, ids[:, 0])  # hot expert 1
    ids[torch.rand(n, k, generator=gen) < 0.15] = -1
    ids[4] = -1
    weights = torch.rand(n, k, generator=gen)
    ids = ids.to(ids_dtype)
    got = capacity_drop(ids.to(DEVICE), weights.to(DEVICE), e, capacity_factor, drop_policy)
    want = reference.capacity_drop(ids.long(), weights.double(), e, capacity_factor, drop_policy)
    assert got.dtype == ids_dtype and got.shape == ids.shape
    assert torch.equal(got.long().cpu(), want)
    cap = expert_capacity(n, k, e, capacity_factor)
    counts = torch.bincount(want[want >= 0], minlength=e)
    assert counts.max() <= cap
    if capacity_factor < 1:
        assert (want != ids.long()).any()   # something was dropped
    # only routed slots are dropped, never re-routed
    assert ((want == ids.long()) | (want == -1)).all()


@pytest.mark.parametrize("drop_policy", ["probs", "position"])
def test_capacity_drop_ties(drop_policy):
    """Equal weights: the lower slot index is kept first (both policies)."""
    n, k, e = 12, 2, 3
    ids = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1], [2, 0], [0, 2],
                        [1, 0], [0, 1], [0, 2], [2, 1], [0, 1], [1, 0]])
    weights = torch.tensor([0.5, 0.25]).repeat(n, 1)
    weights[::3] = 0.25
    got = capacity_drop(ids.to(DEVICE), weights.to(DEVICE), e, 0.5, drop_policy)
    want = reference.capacity_drop(ids, weights, e, 0.5, drop_policy)
    assert (want == -1).any()
    assert torch.equal(got.long().cpu(), want)
    cap = math.ceil(n * k / e * 0.5)
    if drop_policy == "position":
        for ex in range(e):
            kept = (want == ex).flatten().nonzero().flatten()
            routed = (ids == ex).flatten().nonzero().flatten()
            assert torch.equal(kept, routed[:cap])


# ---------------------------------------------------------------------------------------------
# non-finite router input: valid ids, non-finite output (never a silent zero)

@pytest.mark.parametrize("case", ["nan_token", "inf_gate_row", "overflow", "sigmoid_nan",
                                  "group_limited_nan", "capacity_nan", "expert_bias_nan"])
def test_non_finite_router_input(case):
    """A token whose router logits hold NaN/inf still gets top_k distinct ids in [0, E) --
    the torch backend's ids -- its output is non-finite, the other tokens' outputs match the
    torch backend's, and tokens_per_expert counts every slot (before the fix: id 2**30, an
    output of exactly 0 and an IndexError under capacity dropping)."""
    n, d, f, e, k = 6, 16, 8, 8, 2
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, d, generator=g).to(DEVICE)
    gate = torch.randn(e, d, generator=g).to(DEVICE)
    w_up = (torch.randn(e, 2 * f, d, generator=g) / d ** 0.5).to(DEVICE)
    w_down = (torch.randn(e, d, f, generator=g) / f ** 0.5).to(DEVICE)
    x_finite, gate_finite = x.clone(), gate.clone()
    kw = dict(aux_loss_coeff=1e-2, z_loss_coeff=1e-3)
    bad = [2]
    if case == "inf_gate_row":
        gate[5] = float("inf")
        bad = list(range(n))
    elif case == "overflow":
        x[2] *= 1e38
    else:
        x[2, 3] = float("nan")
    if case == "sigmoid_nan":
        kw["score_func"] = "sigmoid"
    elif case == "group_limited_nan":
        kw.update(num_groups=4, group_topk=2, score_func="sigmoid")
    elif case == "capacity_nan":
        kw["capacity_factor"] = 1.0
    elif case == "expert_bias_nan":
        kw.update(expert_bias=torch.linspace(-0.1, 0.1, e).to(DEVICE), score_func="sigmoid")
    out, info = fused_moe(x, gate, w_up, w_down, k, backend="triton", **kw)
    ref, _ = fused_moe(x.double(), gate.double(), w_up.double(), w_down.double(), k,
                       backend="torch", **kw)
    ids = info["topk_ids"].long()
    # the same logits as the torch backend (in the same dtype: x·1e38 overflows fp32 only)
    _, same_dtype = fused_moe(x, gate, w_up, w_down, k, backend="torch", **kw)
    assert torch.equal(ids.cpu(), same_dtype["topk_ids"].long().cpu())
    assert ((ids >= -1) & (ids < e)).all()
    for row in ids.tolist():
        kept = [i for i in row if i >= 0]
        assert len(set(kept)) == len(kept), row
    if case != "capacity_nan":
        assert (ids >= 0).all()
    assert torch.equal(info["tokens_per_expert"].cpu().long(),
                       torch.bincount(ids[ids >= 0].cpu(), minlength=e))
    bad_rows = torch.zeros(n, dtype=torch.bool)
    bad_rows[bad] = True
    assert not torch.isfinite(out[bad_rows]).all(dim=1).any()
    if not bad_rows.all():
        assert_close(out[~bad_rows.to(DEVICE)], ref[~bad_rows.to(DEVICE)], FP32_TOL, "out")
    # (on CUDA check_finite=True is a device-side assertion, which ends the process's CUDA
    # context: "host" raises there too)
    with pytest.raises(ValueError, match="hidden_states: non-finite router logits"):
        fused_moe(x, gate, w_up, w_down, k, backend="triton", check_finite="host", **kw)
    for how in (True, "host", "device"):  # finite input: no error
        fused_moe(x_finite, gate_finite, w_up, w_down, k, backend="triton", check_finite=how,
                  **kw)


# name: (activation, fused_moe kwargs, what the case must exercise)
EXPERT_BIAS_CASES = {
    # Megatron-Core's default MoE MLP: exact gelu, biases in both GEMMs (add_bias_linear)
    "gelu_erf": ("gelu_erf", dict(aux_loss_coeff=0.1), None),
    "geglu_erf_sigmoid_capacity_recompute": (
        "geglu_erf", dict(score_func="sigmoid", capacity_factor=0.5, recompute=True,
                          z_loss_coeff=0.01), "drops"),
}


@pytest.mark.parametrize("case", EXPERT_BIAS_CASES)
def test_fused_moe_expert_biases(case, seed):
    """``fused_moe(b_up=, b_down=)``: output, losses and the gradients of x, the gate weight,
    w_up, w_down, b_up and b_down against ``reference.moe``. The gate's gradient goes through
    the routing weights, whose gradient includes the ``dout · b_down`` term."""
    act, kwargs, exercises = EXPERT_BIAS_CASES[case]
    n, d, f, e, k = 32, 32, 24, 8, 2
    inp = moe_inputs(seed, n, d, f, e, activation=act, gate_scale=2.0, bias=("b_up", "b_down"))
    (_, info, grads), (ref, rinfo, rgrads) = check_moe(inp, k, activation=act, **kwargs)
    assert set(grads) >= {"b_up", "b_down"}
    if exercises == "drops":
        assert (rinfo["topk_ids"] == -1).any()
    # the down bias really reaches the gate's gradient (through the routing weights)
    no_down = {key: v for key, v in inp.items() if key != "b_down"}
    _, _, rgrads0 = run_reference_moe(no_down, k, activation=act, **kwargs)
    assert rel_err(rgrads0["gate"], rgrads["gate"]) > 1e-2
    # experts that no token reached get exactly zero bias gradients
    unused = rinfo["tokens_per_expert"].to(DEVICE) == 0
    if unused.any():
        assert (grads["b_up"][unused] == 0).all() and (grads["b_down"][unused] == 0).all()


def test_split_bf16_pieces_carry_fp32():
    """``split_bf16`` (the router logits' backward on the bf16 tensor cores): three bf16
    pieces, each the rounding of what the earlier left, sum back to the fp32 values within
    2^-24 relative (2^-16 with two: one piece fewer is not enough)."""
    from moe_plugin.autograd.router import split_bf16
    g = torch.Generator().manual_seed(3)
    t = torch.randn(64, 32, generator=g) * torch.logspace(-8, 8, 32)
    for parts, tol in ((3, 2.0 ** -24), (2, 2.0 ** -16)):
        p = split_bf16(t, parts)
        assert p.dtype == torch.bfloat16 and p.shape == (64, 32 * parts)
        back = sum(piece.double() for piece in p.split(32, dim=1))
        rel = ((back - t.double()).abs() / t.double().abs()).max().item()
        assert rel <= tol, (parts, rel)
    assert ((split_bf16(t, 2).double().view(64, 2, 32).sum(1) - t.double()).abs()
            / t.double().abs()).max() > 2.0 ** -24


@pytest.mark.parametrize("uses", ["both", "alias_only", "logits_only"])
def test_router_logits_shared_input(uses):
    """``RouterLogitsFunction(share_input=True)`` returns ``x`` again (an alias) for the
    experts; its backward gets the alias's gradient and returns ``x``'s whole gradient
    (``dlogits · W`` added inside the GEMM): the exact sums of both uses, and each use alone
    (the other's gradient absent) still exact."""
    from moe_plugin.autograd.router import RouterLogitsFunction
    g = torch.Generator().manual_seed(3)
    n, d, e = 40, 24, 8
    x = torch.randn(n, d, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (torch.randn(e, d, generator=g) / d ** 0.5).requires_grad_()
    gl, gx = torch.randn(n, e, generator=g), torch.randn(n, d, generator=g)
    logits, xa = RouterLogitsFunction.apply(x, w, True)
    assert xa.data_ptr() == x.data_ptr() and xa.shape == x.shape
    assert torch.equal(logits, x.detach() @ w.detach().t())
    loss = 0
    if uses != "alias_only":
        loss = loss + (logits * gl).sum()
    if uses != "logits_only":
        loss = loss + (xa * gx).sum()
    loss.backward()
    want_dx = torch.zeros(n, d, dtype=torch.float64)
    if uses != "alias_only":
        want_dx += gl.double() @ w.detach().double()
    if uses != "logits_only":
        want_dx += gx.double()
    assert_close(x.grad, want_dx, 1e-6, "dx")
    if uses == "alias_only":
        assert w.grad is None or not w.grad.any()
    else:
        assert_close(w.grad, gl.double().t() @ x.detach().double(), 1e-6, "dW")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routed_layer_matches_separate_functions_cpu(dtype, routed_layer_calls):
    """``fused_moe`` with the router and experts as one Function (``tuning.router_fused_dx``,
    the default: taken, counted) against the separate Functions: output, ids, losses, the gate's
    and the experts' gradients bitwise equal; dx within the dtype's rounding of the sum (the
    router's dx joins the experts' reduction before the one rounding); with the aux and z
    losses and a gradient reaching ``topk_weights`` from outside."""
    from moe_plugin.kernels import tuning
    g = torch.Generator().manual_seed(11)
    n, d, f, e, k = 24, 32, 16, 8, 2
    base = [torch.randn(n, d, generator=g), torch.randn(e, d, generator=g) / d ** 0.5,
            torch.randn(e, 2 * f, d, generator=g) / d ** 0.5,
            torch.randn(e, d, f, generator=g) / f ** 0.5]
    base = [t.to(DEVICE, dtype) for t in base]
    dout = torch.randn(n, d, generator=g).to(DEVICE)
    res = {}
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in base]
        with tuning.override(router_fused_dx=fused):
            out, info = fused_moe(*leaves, k, aux_loss_coeff=0.01, z_loss_coeff=0.001)
            ((out.float() * dout).sum() + 50 * info["aux_loss"] + 50 * info["z_loss"]
             + 0.3 * info["topk_weights"].sum()).backward()
        res[fused] = [out, info["topk_ids"], info["aux_loss"], info["z_loss"]] + \
            [t.grad for t in leaves]
    assert len(routed_layer_calls) == 1  # taken in the default run only
    names = ["out", "ids", "aux", "z", "dx", "dgate", "dw_up", "dw_down"]
    for name, a, b in zip(names, res[True], res[False]):
        if name != "dx":
            assert torch.equal(a, b), name
    a, b = res[True][4].double(), res[False][4].double()
    rel = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -20
    assert (a - b).abs().max() <= rel * b.abs().max()


def test_router_alias_only_when_x_needs_a_gradient(monkeypatch):
    """``fused_moe`` hands the experts the router's input alias only when ``x`` has a
    gradient: with a gradient for the gate weight alone the experts compute no dx (their
    input does not require one)."""
    from moe_plugin.kernels import expert_stages
    seen = []
    orig = expert_stages.experts_backward_dx

    def spy(*args, **kwargs):
        seen.append(1)
        return orig(*args, **kwargs)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 32, generator=g)
    gate = torch.randn(8, 32, generator=g).requires_grad_()
    w_up = torch.randn(8, 48, 32, generator=g) * 0.1
    w_down = torch.randn(8, 32, 24, generator=g) * 0.1
    monkeypatch.setattr(expert_stages, "experts_backward_dx", spy)
    out, _ = fused_moe(x, gate, w_up, w_down, 2, backend="triton")
    out.sum().backward()
    assert gate.grad is not None and not seen
    xg = x.clone().requires_grad_()
    out, _ = fused_moe(xg, gate, w_up, w_down, 2, backend="triton")
    out.sum().backward()
    assert seen and xg.grad is not None
