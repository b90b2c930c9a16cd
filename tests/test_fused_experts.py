"""``fused_experts`` with the Triton kernels forced, against ``reference.experts`` in float64.

Every test compares the output and the gradients of hidden states, topk_weights, w_up and
w_down (relative L2 error <= 1e-5 in fp32). Float outputs of ``torch.empty`` are poisoned
with NaN, so an element a kernel forgets to write fails the comparison.
"""
import warnings

import pytest
import torch

from conftest import (ACTIVATIONS, DEVICE, EXPERT_GRAD_NAMES, FP32_TOL, assert_bitwise,
                      assert_clamp_exercised, assert_close, check_experts, expert_inputs,
                      random_ids, rel_err, run_fused_experts, run_reference_experts)
from moe_plugin import fused_experts
from moe_plugin.kernels.codes import SWIGLU_OAI_LIMIT

pytestmark = pytest.mark.usefixtures("poison_empty")

# fp16 rounds pre-activations, h and y to 11 significant bits (unit roundoff 4.9e-4); the
# measured error is about 5e-4, so 2e-3 leaves a 4x margin.
FP16_TOL = 2e-3


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation(activation, seed):
    # 48 tokens x 2 slots over 4 experts: segments span several 16-row tiles; D=64 and F=48
    # span two 32-column tiles (so the routing-weight gradient sums two partials)
    x_scale = 4.0 if activation == "swiglu_oai" else 1.0
    inp = expert_inputs(seed, 48, 64, 48, 4, 2, activation=activation, x_scale=x_scale)
    if activation == "swiglu_oai":
        assert_clamp_exercised(inp, SWIGLU_OAI_LIMIT)
    check_experts(inp, activation)


def _ids_all_on_one_expert(gen, n, e, k):
    return torch.full((n, k), 2, dtype=torch.int64)


def _ids_some_experts_empty(gen, n, e, k):
    used = torch.tensor([0, 3, 5])  # experts 1, 2, 4, 6, 7 get no token
    return used[random_ids(gen, n, 3, k)]


def _ids_first_column_one_expert(gen, n, e, k):
    ids = random_ids(gen, n, e, k)
    ids[:, 0] = e - 1
    ids[:, 1:] = random_ids(gen, n, e - 1, k - 1)
    return ids


def _ids_int32(gen, n, e, k):
    return random_ids(gen, n, e, k).to(torch.int32)


# name: (N, D, F, E, k, activation, ids builder or None)
EDGE_CASES = {
    "k1": (24, 32, 32, 4, 1, "swiglu", None),
    "E1": (20, 32, 32, 1, 1, "swiglu", None),
    "N1": (1, 32, 32, 4, 2, "swiglu", None),
    "empty_experts": (32, 32, 32, 8, 2, "swiglu", _ids_some_experts_empty),
    "all_tokens_one_expert": (40, 32, 16, 4, 1, "swiglu", _ids_all_on_one_expert),
    "all_slots_one_expert_k2": (20, 32, 16, 4, 2, "gelu", _ids_all_on_one_expert),
    "first_slot_one_expert": (24, 32, 16, 6, 3, "geglu", _ids_first_column_one_expert),
    "odd_sizes_gated": (27, 37, 23, 5, 3, "swiglu", None),
    "odd_sizes_plain": (27, 37, 23, 5, 3, "relu2", None),
    "odd_sizes_small": (5, 7, 3, 3, 2, "silu", None),
    "int32_ids": (24, 32, 32, 4, 2, "swiglu", _ids_int32),
    "E300": (8, 32, 16, 300, 4, "swiglu", None),
}


@pytest.mark.parametrize("case", EDGE_CASES)
def test_edge_case(case, seed):
    n, d, f, e, k, act, make_ids = EDGE_CASES[case]
    gen = torch.Generator().manual_seed(seed + 1)
    ids = make_ids(gen, n, e, k) if make_ids else None
    inp = expert_inputs(seed, n, d, f, e, k, activation=act, ids=ids)
    (out, grads), _ = check_experts(inp, act)
    # experts that got no slot get exactly zero weight gradients
    routed = torch.zeros(e, dtype=torch.bool)
    routed[inp["ids"].long().cpu().flatten()] = True
    if not routed.all():
        assert (grads["w_up"][~routed.to(DEVICE)] == 0).all()
        assert (grads["w_down"][~routed.to(DEVICE)] == 0).all()
    assert (grads["w_up"][routed.to(DEVICE)] != 0).any()


def test_minus_one_slots(seed):
    """-1 slots contribute exactly nothing: a token with all slots -1 gets exactly zero output
    and zero gradients, and a -1 slot's weight gets exactly zero gradient."""
    n, d, f, e, k = 24, 32, 32, 4, 3
    gen = torch.Generator().manual_seed(seed)
    ids = random_ids(gen, n, e, k)
    unused = torch.rand(n, k, generator=gen) < 0.3
    unused[5] = True          # token 5: every slot unused
    unused[6] = False         # token 6: every slot used
    ids[unused] = -1
    inp = expert_inputs(seed, n, d, f, e, k, ids=ids)
    (out, grads), (ref, _) = check_experts(inp, "swiglu")
    unused = unused.to(DEVICE)
    assert (out[5] == 0).all()
    assert (grads["x"][5] == 0).all()
    assert (grads["weights"][5] == 0).all()
    assert (grads["weights"][unused] == 0).all()
    assert (grads["weights"][~unused] != 0).all()
    assert (out[6] != 0).any()

    # the weight of a -1 slot is never read: NaN there changes nothing
    inp_nan = dict(inp, weights=inp["weights"].masked_fill(unused, float("nan")))
    out2, grads2 = run_fused_experts(inp_nan, "swiglu")
    assert_bitwise(out2, out, "out")
    for name in EXPERT_GRAD_NAMES:
        assert_bitwise(grads2[name], grads[name], f"grad {name}")


def test_unchecked_out_of_range_ids_act_like_minus_one(seed):
    """With ``validate_ids=False`` an id >= E is documented to act like -1."""
    n, d, f, e, k = 16, 32, 16, 4, 2
    gen = torch.Generator().manual_seed(seed)
    ids = random_ids(gen, n, e, k)
    ids[3, 1] = -1
    ids[7, 0] = -1
    inp = expert_inputs(seed, n, d, f, e, k, ids=ids)
    out, grads = run_fused_experts(inp, "swiglu")
    bad = ids.clone()
    bad[3, 1] = e
    bad[7, 0] = e + 5
    out2, grads2 = run_fused_experts(dict(inp, ids=bad.to(DEVICE)), "swiglu",
                                     validate_ids=False)
    assert_bitwise(out2, out, "out")
    for name in EXPERT_GRAD_NAMES:
        assert_bitwise(grads2[name], grads[name], f"grad {name}")


def test_no_tokens(seed):
    n, d, f, e, k = 0, 32, 16, 4, 2
    inp = expert_inputs(seed, n, d, f, e, k)
    out, grads = run_fused_experts(inp, "swiglu")
    assert out.shape == (0, d)
    assert grads["x"].shape == (0, d) and grads["weights"].shape == (0, k)
    assert (grads["w_up"] == 0).all() and (grads["w_down"] == 0).all()


def test_non_contiguous_inputs(seed):
    """Strided views of hidden states and weights give the same result."""
    n, d, f, e, k = 24, 32, 16, 4, 2
    inp = expert_inputs(seed, n, d, f, e, k)
    out, grads = run_fused_experts(inp, "swiglu")
    strided = dict(inp)
    strided["x"] = inp["x"].t().contiguous().t()                     # column-major
    strided["w_up"] = inp["w_up"].transpose(1, 2).contiguous().transpose(1, 2)
    strided["w_down"] = inp["w_down"].transpose(1, 2).contiguous().transpose(1, 2)
    strided["weights"] = inp["weights"].t().contiguous().t()
    assert not strided["x"].is_contiguous() and not strided["w_up"].is_contiguous()
    out2, grads2 = run_fused_experts(strided, "swiglu")
    ref, ref_grads = run_reference_experts(inp, "swiglu")
    assert_close(out2, ref, FP32_TOL, "out")
    for name in EXPERT_GRAD_NAMES:
        assert_close(grads2[name], ref_grads[name], FP32_TOL, f"grad {name}")


@pytest.mark.parametrize("weights_dtype", [torch.float16, torch.float32])
def test_fp16_weights_dtype(weights_dtype, seed):
    """topk_weights in the activation dtype (fp16) or in fp32; tl.dot is right for fp16 in the
    interpreter. The weights' gradient comes back in the weights' dtype."""
    inp = expert_inputs(seed, 48, 64, 48, 4, 2, dtype=torch.float16,
                        weights_dtype=weights_dtype)
    (out, grads), _ = check_experts(inp, "swiglu", tol=FP16_TOL)
    assert out.dtype == torch.float16
    assert grads["weights"].dtype == weights_dtype


@pytest.mark.parametrize("activation", ["swiglu", "swiglu_oai", "relu2"])
def test_recompute_is_bitwise_identical(activation, seed):
    x_scale = 4.0 if activation == "swiglu_oai" else 1.0
    inp = expert_inputs(seed, 40, 48, 40, 4, 2, activation=activation, x_scale=x_scale)
    (out, grads), _ = check_experts(inp, activation, recompute=True)
    out0, grads0 = run_fused_experts(inp, activation, recompute=False)
    assert_bitwise(out, out0, "out")
    for name in EXPERT_GRAD_NAMES:
        assert_bitwise(grads[name], grads0[name], f"grad {name}")


def test_deterministic(seed):
    inp = expert_inputs(seed, 40, 48, 40, 6, 3, activation="geglu")
    out1, grads1 = run_fused_experts(inp, "geglu", deterministic=True)
    out2, grads2 = run_fused_experts(inp, "geglu", deterministic=True)
    assert_bitwise(out1, out2, "out")
    for name in EXPERT_GRAD_NAMES:
        assert_bitwise(grads1[name], grads2[name], f"grad {name}")
    ref, _ = run_reference_experts(inp, "geglu")
    assert_close(out1, ref, FP32_TOL, "out")


def test_backends_auto_and_torch(seed):
    """``auto`` picks the kernels here (CUDA or interpreter); ``torch`` is the reference."""
    inp = expert_inputs(seed, 16, 32, 16, 4, 2)
    args = (inp["x"], inp["ids"], inp["weights"], inp["w_up"], inp["w_down"], "swiglu")
    out_triton = fused_experts(*args, backend="triton")
    out_auto = fused_experts(*args, backend="auto")
    assert_bitwise(out_auto, out_triton, "auto vs triton")
    out_torch = fused_experts(*args, backend="torch")
    ref, _ = run_reference_experts(inp, "swiglu")
    assert_close(out_torch, ref, FP32_TOL, "torch backend")
    assert_close(out_triton, ref, FP32_TOL, "triton backend")



@pytest.mark.skipif(DEVICE.type != "cpu", reason="reads past the end are seen through the "
                    "interpreter's numpy warnings")
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_backward_reads_w_down_within_bounds(activation, seed):
    """``w_down`` is the head of a larger buffer whose tail holds the largest fp32 value; a
    kernel that reads past ``w_down``'s end overflows in the interpreter's matmul (numpy
    RuntimeWarning). No kernel may read outside its operands."""
    inp = expert_inputs(seed, 16, 32, 16, 2, 1, activation=activation)
    e, d, f = inp["w_down"].shape
    buf = torch.full((e * d * f + 4 * d * f,), torch.finfo(torch.float32).max)
    w_down = buf[:e * d * f].view(e, d, f)
    w_down.copy_(inp["w_down"])
    w_down.requires_grad_()
    x = inp["x"].clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fused_experts(x, inp["ids"], inp["weights"], inp["w_up"], w_down, activation,
                            backend="triton")
        out.backward(inp["gout"])
    numeric = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert not numeric, f"kernels read past the end of w_down: {numeric}"
    ref, ref_grads = run_reference_experts(inp, activation)
    assert_close(out, ref, FP32_TOL, "out")
    assert_close(x.grad, ref_grads["x"], FP32_TOL, "grad x")
    assert_close(w_down.grad, ref_grads["w_down"], FP32_TOL, "grad w_down")


# ----------------------------------------------------------------------------------------------
# exact (erf) gelu and expert biases (Megatron-Core's default MLP: F.gelu, add_bias_linear)

@pytest.mark.parametrize("exact,tanh", [("gelu_erf", "gelu"), ("geglu_erf", "geglu")])
def test_erf_activations_are_not_the_tanh_ones(exact, tanh, seed):
    """On ``test_activation``'s problem the exact gelu and the tanh approximation differ by
    more than 10x the fp32 tolerance in the output and in every gradient, so that test tells
    them apart; the kernels match the exact one."""
    inp = expert_inputs(seed, 48, 64, 48, 4, 2, activation=exact)
    (out, grads), (ref, ref_grads) = check_experts(inp, exact)
    ref_tanh, ref_grads_tanh = run_reference_experts(inp, tanh)
    assert rel_err(ref_tanh, ref) > 10 * FP32_TOL
    for name in EXPERT_GRAD_NAMES:
        assert rel_err(ref_grads_tanh[name], ref_grads[name]) > 10 * FP32_TOL, name


def _ids_empty_expert_and_minus_one(gen, n, e, k):
    """Expert 1 gets no slot, about a quarter of the slots are -1, token 2 has none at all."""
    ids = torch.tensor([0, 2, 3])[random_ids(gen, n, 3, k)]
    ids[torch.rand(n, k, generator=gen) < 0.25] = -1
    ids[2] = -1
    return ids


# name: (activation, biases, recompute)
BIAS_CASES = {
    "gated_both": ("geglu_erf", ("b_up", "b_down"), False),
    "gated_both_recompute": ("swiglu", ("b_up", "b_down"), True),
    "plain_both": ("gelu_erf", ("b_up", "b_down"), False),
    "plain_both_recompute": ("gelu_erf", ("b_up", "b_down"), True),
    "gated_up_only": ("swiglu_oai", ("b_up",), False),
    "plain_down_only": ("relu2", ("b_down",), False),
}


@pytest.mark.parametrize("case", BIAS_CASES)
def test_expert_biases(case, seed):
    """``b_up`` / ``b_down``: output and every gradient (x, weights, w_up, w_down, b_up,
    b_down) against the float64 reference, with an expert that gets no slot (exactly zero bias
    gradients), -1 slots (zero weight gradient, nothing added) and a token with no slot at all
    (zero output: the down bias is weighted, not added per token)."""
    activation, biases, recompute = BIAS_CASES[case]
    n, d, f, e, k = 40, 48, 40, 4, 2
    gen = torch.Generator().manual_seed(seed + 1)
    ids = _ids_empty_expert_and_minus_one(gen, n, e, k)
    x_scale = 4.0 if activation == "swiglu_oai" else 1.0
    inp = expert_inputs(seed, n, d, f, e, k, activation=activation, ids=ids, bias=biases,
                        x_scale=x_scale)
    (out, grads), (ref, ref_grads) = check_experts(inp, activation, recompute=recompute)
    for name in biases:
        assert grads[name].dtype == inp[name].dtype
        assert (grads[name][1] == 0).all(), f"{name}: expert 1 got no slot"
        assert (grads[name][[0, 2, 3]] != 0).any(dim=1).all(), name
    unused = (inp["ids"] == -1)
    assert (out[2] == 0).all() and (grads["x"][2] == 0).all()
    assert (grads["weights"][unused] == 0).all()
    # the biases matter: for the output, and (b_down) for the routing weights' gradient
    no_bias = {k_: v for k_, v in inp.items() if k_ not in biases}
    ref0, ref_grads0 = run_reference_experts(no_bias, activation)
    assert rel_err(ref0, ref) > 1e-2
    if "b_down" in biases:
        assert rel_err(ref_grads0["weights"], ref_grads["weights"]) > 1e-2
    if recompute:   # bitwise the gradients of the stored pre-activation
        out0, grads0 = run_fused_experts(inp, activation, recompute=False)
        assert_bitwise(out, out0, "out")
        for name in grads:
            assert_bitwise(grads[name], grads0[name], f"grad {name}")


def test_expert_biases_strided_and_frozen(seed):
    """Non-contiguous bias views give the same result; biases that need no gradient (and
    weights that need none) get none, the rest still match."""
    n, d, f, e, k = 24, 32, 16, 4, 2
    inp = expert_inputs(seed, n, d, f, e, k, activation="geglu_erf", bias=("b_up", "b_down"))
    out, grads = run_fused_experts(inp, "geglu_erf")
    strided = dict(inp, b_up=inp["b_up"].t().contiguous().t(),
                   b_down=inp["b_down"].t().contiguous().t())
    assert not strided["b_up"].is_contiguous() and not strided["b_down"].is_contiguous()
    out2, grads2 = run_fused_experts(strided, "geglu_erf")
    assert_bitwise(out2, out, "out")
    for name in grads:
        assert_bitwise(grads2[name], grads[name], f"grad {name}")
    # only x and b_down require grad
    x = inp["x"].clone().requires_grad_()
    b_down = inp["b_down"].clone().requires_grad_()
    y = fused_experts(x, inp["ids"], inp["weights"], inp["w_up"], inp["w_down"], "geglu_erf",
                      backend="triton", b_up=inp["b_up"], b_down=b_down)
    gx, gb = torch.autograd.grad(y, [x, b_down], inp["gout"])
    assert_bitwise(gx, grads["x"], "grad x")
    assert_bitwise(gb, grads["b_down"], "grad b_down")


def test_expert_biases_no_tokens(seed):
    inp = expert_inputs(seed, 0, 32, 16, 4, 2, activation="gelu_erf", bias=("b_up", "b_down"))
    out, grads = run_fused_experts(inp, "gelu_erf")
    assert out.shape == (0, 32)
    for name in ("w_up", "w_down", "b_up", "b_down"):
        assert grads[name].shape == inp[name].shape and (grads[name] == 0).all(), name


def test_expert_biases_torch_backend(seed):
    """backend='torch' (the reference) takes the biases too."""
    inp = expert_inputs(seed, 16, 32, 16, 4, 2, activation="gelu_erf", bias=("b_up", "b_down"))
    args = (inp["x"], inp["ids"], inp["weights"], inp["w_up"], inp["w_down"], "gelu_erf")
    kw = dict(b_up=inp["b_up"], b_down=inp["b_down"])
    ref, _ = run_reference_experts(inp, "gelu_erf")
    assert_close(fused_experts(*args, backend="torch", **kw), ref, FP32_TOL, "torch backend")
    assert_close(fused_experts(*args, backend="triton", **kw), ref, FP32_TOL, "triton backend")


def test_backward_frees_pre_and_hw_early(monkeypatch):
    """The backward frees the saved pre-activation as soon as the activation backward has used
    it (before the dx GEMM's ``[S, D]`` buffer) and ``hw`` once dW_down is computed (dW_up's
    buffer can take their memory); a second backward through the same graph
    (``retain_graph``) recomputes pre and gives the same gradients."""
    from moe_plugin.kernels import expert_stages
    calls, pre_at_dx = [], []
    orig = expert_stages.experts_backward_weight
    orig_dx = expert_stages.experts_backward_dx

    def spy(dout, x, dpre, hw, meta, need_up, need_down, *args, **kwargs):
        calls.append((need_up, need_down, hw.numel() > 0))
        return orig(dout, x, dpre, hw, meta, need_up, need_down, *args, **kwargs)

    def spy_dx(*args, **kwargs):  # pre's memory already freed when dx's buffer comes
        pre_at_dx.append(pre.untyped_storage().size())
        return orig_dx(*args, **kwargs)
    monkeypatch.setattr(expert_stages, "experts_backward_weight", spy)
    monkeypatch.setattr(expert_stages, "experts_backward_dx", spy_dx)
    inp = expert_inputs(1, 9, 16, 8, 4, 2)
    leaves = [inp[n].clone().requires_grad_() for n in ("x", "weights", "w_up", "w_down")]
    out = fused_experts(leaves[0], inp["ids"], leaves[1], leaves[2], leaves[3], "swiglu")
    pre = next(t for t in out.grad_fn.saved_tensors
               if t is not None and t.dim() == 2 and t.shape == (9 * 2, 16))
    assert pre.untyped_storage().size() > 0
    first = torch.autograd.grad(out, leaves, inp["gout"], retain_graph=True)
    assert pre.untyped_storage().size() == 0, "pre kept until the end of the backward"
    assert pre_at_dx == [0], "pre still held when the dx GEMM ran"
    assert calls == [(False, True, True), (True, False, False)], calls
    second = torch.autograd.grad(out, leaves, inp["gout"])
    for a, b in zip(first, second):
        assert torch.equal(a, b)



def test_stage_ops_called_directly_equal_the_dispatched_ops(monkeypatch):
    """``eager.direct``: in eager mode the stage ops (forward, the backward data part's two,
    both weight gradients) run their function without PyTorch's dispatcher (whose handling of
    an op that mutates an argument costs ~150 µs of host time a call); the output and
    gradients are bitwise those of the dispatched ops, and the mutated ``main_grad`` buffers'
    version counters move as the ops' move them. Under a dispatch mode (fake tensors: what
    ``torch.compile`` traces with), a ``torch.func`` transform or with grad mode on the op is
    dispatched."""
    from moe_plugin.autograd.experts import ACCUMULATE_WGRAD_ATTR
    from moe_plugin.kernels import eager, tuning
    taken = []
    orig = eager.direct
    monkeypatch.setattr(eager, "direct", lambda args: taken.append(orig(args)) or taken[-1])
    inp = expert_inputs(2, 9, 16, 8, 4, 2)

    def run():
        leaves = [inp[n].clone().requires_grad_() for n in ("x", "weights")]
        ws = [torch.nn.Parameter(inp[n].clone()) for n in ("w_up", "w_down")]
        for w in ws:  # Megatron's gradient-accumulation fusion: added into main_grad
            w.main_grad = torch.ones_like(w)
            w.grad_added_to_main_grad = False
            setattr(w, ACCUMULATE_WGRAD_ATTR, True)
        out = fused_experts(leaves[0], inp["ids"], leaves[1], ws[0], ws[1], "swiglu")
        before = [w.main_grad._version for w in ws]
        out.backward(inp["gout"])
        bumps = [w.main_grad._version - v for w, v in zip(ws, before)]
        return [out.detach()] + [t.grad for t in leaves] + [w.main_grad for w in ws], bumps

    direct_res, direct_bumps = run()
    assert taken == [True] * 5, taken  # forward, backward act and dx, dW_down, dW_up
    taken.clear()
    with tuning.override(eager_ops=False):
        op_res, op_bumps = run()
    assert taken == [False] * 5
    for a, b in zip(direct_res, op_res):
        assert torch.equal(a, b)
    assert direct_bumps == op_bumps and min(op_bumps) >= 1, (direct_bumps, op_bumps)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode, torch.no_grad():
        fake = mode.from_tensor(inp["x"])
        assert not orig((fake, fake)) and not orig((inp["x"],))
    with torch.no_grad():
        assert orig((inp["x"], torch.nn.Parameter(inp["w_up"]), 3, None))
    assert not orig((inp["x"],))  # grad mode on (a backward with create_graph)
    with torch.no_grad():  # vmap's batched tensors are of type torch.Tensor
        seen = []
        torch.func.vmap(lambda t: seen.append(orig((t,))) or t)(inp["x"])
        assert seen == [False]


def test_eager_op_binds_keywords_as_the_op_does():
    """``eager.EagerOp``: keyword and default arguments reach the function in the op's
    positional order on the direct path; a missing or unknown argument is a TypeError."""
    from moe_plugin.kernels import expert_stages as ES
    op = ES.experts_backward_weight_op
    args = op._positional((1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11), {"need_down": True,
                                                                 "need_up": False})
    assert args == (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, False, True, False, False)
    with pytest.raises(TypeError, match="missing argument 'need_down'"):
        op._positional((1,) * 11, {"need_up": True})
    with pytest.raises(TypeError, match="unexpected arguments"):
        op._positional((1,) * 13, {"bogus": 1})
