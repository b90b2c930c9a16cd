"""Bad input raises ValueError/TypeError (NotImplementedError for expert parallelism) naming
the argument, before any kernel runs."""
import pytest
import torch

from conftest import DEVICE, requires_cuda
from moe_plugin import capacity_drop, fused_experts, fused_moe

N, D, F, E, K = 6, 8, 4, 4, 2


def _experts_args(dtype=torch.float32, device=DEVICE):
    gen = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(N, D, generator=gen).to(device, dtype),
        topk_ids=torch.randint(0, E, (N, K), generator=gen).to(device),
        topk_weights=torch.rand(N, K, generator=gen).to(device, dtype),
        w_up=torch.randn(E, 2 * F, D, generator=gen).to(device, dtype),
        w_down=torch.randn(E, D, F, generator=gen).to(device, dtype),
    )


def _moe_args(dtype=torch.float32, device=DEVICE):
    a = _experts_args(dtype, device)
    gate = torch.randn(E, D, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    return dict(hidden_states=a["hidden_states"], gate_weight=gate, w_up=a["w_up"],
                w_down=a["w_down"], top_k=K)


def _call_experts(**changes):
    kwargs = _experts_args()
    kwargs.update(changes)
    return fused_experts(**kwargs)


def _call_moe(**changes):
    kwargs = _moe_args()
    kwargs.update(changes)
    return fused_moe(**kwargs)


def test_good_input_passes():
    """The baseline arguments are valid: every failure below comes from the one change."""
    out = _call_experts(backend="triton")
    assert out.shape == (N, D)
    out, info = _call_moe(backend="torch")
    assert out.shape == (N, D) and info["topk_ids"].shape == (N, K)


a0 = _experts_args()
HOST_CHECK = None if DEVICE.type == "cpu" else True

EXPERTS_CASES = {
    # name: (changes, exception, argument named in the message)
    "x_not_tensor": (dict(hidden_states=[[1.0] * D] * N), TypeError, "hidden_states"),
    "x_3d": (dict(hidden_states=a0["hidden_states"][None]), ValueError, "hidden_states"),
    "x_1d": (dict(hidden_states=a0["hidden_states"][0]), ValueError, "hidden_states"),
    "x_int": (dict(hidden_states=a0["hidden_states"].long()), TypeError, "hidden_states"),
    "ids_1d": (dict(topk_ids=a0["topk_ids"][:, 0]), ValueError, "topk_ids"),
    "ids_float": (dict(topk_ids=a0["topk_ids"].float()), TypeError, "topk_ids"),
    "ids_int16": (dict(topk_ids=a0["topk_ids"].short()), TypeError, "topk_ids"),
    "ids_rows": (dict(topk_ids=a0["topk_ids"][:-1]), ValueError, "topk_ids"),
    "ids_no_column": (dict(topk_ids=a0["topk_ids"][:, :0], topk_weights=a0["topk_weights"][:, :0]),
                      ValueError, "topk_ids"),
    # (the default check is on the host for CPU tensors; on CUDA it is a device-side assertion,
    # which would break the CUDA context for every later test: ask for the host check there)
    "ids_equal_E": (dict(topk_ids=torch.full((N, K), E, device=DEVICE), validate_ids=HOST_CHECK),
                    ValueError, "topk_ids"),
    "ids_minus_two": (dict(topk_ids=torch.full((N, K), -2, device=DEVICE),
                           validate_ids=HOST_CHECK), ValueError, "topk_ids"),
    "ids_out_of_range_host_check": (dict(topk_ids=torch.full((N, K), E, device=DEVICE),
                                         validate_ids=True), ValueError, "topk_ids"),
    "validate_ids_unknown": (dict(validate_ids="sometimes"), ValueError, "validate_ids"),
    "weights_shape": (dict(topk_weights=a0["topk_weights"][:, :1]), ValueError, "topk_weights"),
    "weights_3d": (dict(topk_weights=a0["topk_weights"][None]), ValueError, "topk_weights"),
    "weights_fp64": (dict(topk_weights=a0["topk_weights"].double()), TypeError, "topk_weights"),
    "weights_int": (dict(topk_weights=a0["topk_weights"].long()), TypeError, "topk_weights"),
    "w_up_fp16": (dict(w_up=a0["w_up"].half()), TypeError, "w_up"),
    "w_up_2d": (dict(w_up=a0["w_up"][0]), ValueError, "w_up"),
    "w_up_D": (dict(w_up=a0["w_up"][:, :, :-1]), ValueError, "w_up"),
    "w_up_odd_rows_gated": (dict(w_up=a0["w_up"][:, :-1]), ValueError, "w_up"),
    "w_up_no_experts": (dict(w_up=a0["w_up"][:0], w_down=a0["w_down"][:0]), ValueError, "w_up"),
    "w_down_shape_F": (dict(w_down=a0["w_down"][:, :, :-1]), ValueError, "w_down"),
    "w_down_shape_D": (dict(w_down=a0["w_down"][:, :-1]), ValueError, "w_down"),
    "w_down_shape_E": (dict(w_down=a0["w_down"][:-1]), ValueError, "w_down"),
    "w_down_gated_rows": (dict(activation="gelu"), ValueError, "w_down"),  # F would be 2F
    "w_down_dtype": (dict(w_down=a0["w_down"].half()), TypeError, "w_down"),
    "activation_unknown": (dict(activation="swish"), ValueError, "activation"),
    "activation_not_str": (dict(activation=None), ValueError, "activation"),
    "backend_unknown": (dict(backend="cuda"), ValueError, "backend"),
    "triton_fp64": ({**{k: v.double() for k, v in a0.items() if v.is_floating_point()},
                     "backend": "triton"}, TypeError, "hidden_states"),
    "recompute_not_bool": (dict(recompute="yes"), TypeError, "recompute"),
    "deterministic_not_bool": (dict(deterministic=1), TypeError, "deterministic"),
    # expert biases: b_up [E, 2F|F], b_down [E, D], the weights' dtype and device
    "b_up_not_tensor": (dict(b_up=[[0.0] * 2 * F] * E), TypeError, "b_up: "),
    "b_up_1d": (dict(b_up=torch.zeros(2 * F, device=DEVICE)), ValueError, "b_up: "),
    "b_up_rows": (dict(b_up=torch.zeros(E, F, device=DEVICE)), ValueError, "b_up: "),
    "b_up_experts": (dict(b_up=torch.zeros(E + 1, 2 * F, device=DEVICE)), ValueError, "b_up: "),
    "b_up_gated_rows_plain": (dict(activation="gelu_erf", w_up=a0["w_up"][:, :F],
                                   w_down=a0["w_down"], b_up=torch.zeros(E, 2 * F, device=DEVICE)),
                              ValueError, "b_up: "),
    "b_up_fp16": (dict(b_up=torch.zeros(E, 2 * F, device=DEVICE, dtype=torch.float16)),
                  TypeError, "b_up: "),
    "b_down_shape": (dict(b_down=torch.zeros(E, D - 1, device=DEVICE)), ValueError, "b_down: "),
    "b_down_3d": (dict(b_down=torch.zeros(E, D, 1, device=DEVICE)), ValueError, "b_down: "),
    "b_down_int": (dict(b_down=torch.zeros(E, D, device=DEVICE, dtype=torch.int32)),
                   TypeError, "b_down: "),
    "b_up_with_fp8": (dict(b_up=torch.zeros(E, 2 * F, device=DEVICE), quant="fp8_block",
                           backend="triton"), ValueError, "b_up: "),
    "b_down_with_fp8_wgrad": (dict(b_down=torch.zeros(E, D, device=DEVICE),
                                   quant="fp8_block_wgrad", backend="triton"), ValueError,
                              "b_down: "),
}


@pytest.mark.parametrize("case", EXPERTS_CASES)
def test_fused_experts_bad_input(case):
    changes, exc, name = EXPERTS_CASES[case]
    with pytest.raises(exc, match=name):
        _call_experts(**changes)


m0 = _moe_args()

MOE_CASES = {
    "x_int": (dict(hidden_states=m0["hidden_states"].int()), TypeError, "hidden_states"),
    "x_3d": (dict(hidden_states=m0["hidden_states"][None]), ValueError, "hidden_states"),
    "gate_shape": (dict(gate_weight=m0["gate_weight"][:, :-1]), ValueError, "gate_weight"),
    "gate_1d": (dict(gate_weight=m0["gate_weight"][0]), ValueError, "gate_weight"),
    "gate_int": (dict(gate_weight=m0["gate_weight"].long()), TypeError, "gate_weight"),
    "w_up_experts": (dict(w_up=m0["w_up"][:-1]), ValueError, "w_up"),
    "w_up_D": (dict(w_up=m0["w_up"][:, :, :-1]), ValueError, "w_up"),
    "w_up_odd_rows_gated": (dict(w_up=m0["w_up"][:, :-1]), ValueError, "w_up"),
    "w_up_fp16": (dict(w_up=m0["w_up"].half()), TypeError, "w_up"),
    "w_down_shape": (dict(w_down=m0["w_down"][:, :, :-1]), ValueError, "w_down"),
    "top_k_above_E": (dict(top_k=E + 1), ValueError, "top_k"),
    "top_k_zero": (dict(top_k=0), ValueError, "top_k"),
    "top_k_float": (dict(top_k=2.0), ValueError, "top_k"),
    "score_func": (dict(score_func="tanh"), ValueError, "score_func"),
    "renormalize_not_bool": (dict(renormalize=1), TypeError, "renormalize"),
    "expert_bias_shape": (dict(expert_bias=torch.zeros(E + 1, device=DEVICE)), ValueError,
                          "expert_bias"),
    "expert_bias_2d": (dict(expert_bias=torch.zeros(1, E, device=DEVICE)), ValueError,
                       "expert_bias"),
    "num_groups_not_dividing": (dict(num_groups=3, group_topk=1), ValueError, "num_groups"),
    "group_topk_without_num_groups": (dict(group_topk=1), ValueError, "group_topk"),
    "num_groups_without_group_topk": (dict(num_groups=2), ValueError, "num_groups"),
    "group_topk_above_num_groups": (dict(num_groups=2, group_topk=3), ValueError, "group_topk"),
    "num_groups_zero": (dict(num_groups=0, group_topk=1), ValueError, "num_groups"),
    "scaling_factor_zero": (dict(scaling_factor=0.0), ValueError, "scaling_factor"),
    "scaling_factor_nan": (dict(scaling_factor=float("nan")), ValueError, "scaling_factor"),
    "capacity_factor_zero": (dict(capacity_factor=0.0), ValueError, "capacity_factor"),
    "capacity_factor_negative": (dict(capacity_factor=-1.0), ValueError, "capacity_factor"),
    "capacity_factor_inf": (dict(capacity_factor=float("inf")), ValueError, "capacity_factor"),
    "drop_policy": (dict(capacity_factor=1.0, drop_policy="random"), ValueError, "drop_policy"),
    "aux_loss_coeff_negative": (dict(aux_loss_coeff=-0.1), ValueError, "aux_loss_coeff"),
    "z_loss_coeff_negative": (dict(z_loss_coeff=-1e-3), ValueError, "z_loss_coeff"),
    "activation_unknown": (dict(activation="swish"), ValueError, "activation"),
    "backend_unknown": (dict(backend="cuda"), ValueError, "backend"),
    "recompute_not_bool": (dict(recompute=None), TypeError, "recompute"),
    "ep_group": (dict(ep_group=object()), ValueError, "ep_group"),  # no process group set up
    "triton_fp64": ({**{k: v.double() for k, v in m0.items() if isinstance(v, torch.Tensor)},
                     "backend": "triton"}, TypeError, "hidden_states"),
    "b_up_shape": (dict(b_up=torch.zeros(E, 2 * F + 2, device=DEVICE)), ValueError, "b_up: "),
    "b_down_dtype": (dict(b_down=torch.zeros(E, D, device=DEVICE, dtype=torch.float64)),
                     TypeError, "b_down: "),
    "b_up_with_fp8": (dict(b_up=torch.zeros(E, 2 * F, device=DEVICE), quant="fp8_block",
                           backend="triton"), ValueError, "b_up: "),
}


@pytest.mark.parametrize("case", MOE_CASES)
def test_fused_moe_bad_input(case):
    changes, exc, name = MOE_CASES[case]
    with pytest.raises(exc, match=name):
        _call_moe(**changes)


def test_errors_say_what_was_expected_and_given():
    with pytest.raises(ValueError) as info:
        _call_experts(topk_ids=torch.full((N, K), E, device=DEVICE), validate_ids=HOST_CHECK)
    msg = str(info.value)
    assert "topk_ids" in msg and str(E - 1) in msg and str(E) in msg
    with pytest.raises(ValueError) as info:
        _call_experts(w_down=a0["w_down"][:, :, :-1])
    assert str((E, D, F)) in str(info.value) and str((E, D, F - 1)) in str(info.value)


# capacity_drop is public too: its arguments are checked like fused_moe's
@pytest.mark.parametrize("changes,name", [
    (dict(drop_policy="random"), "drop_policy"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(capacity_factor=-0.5), "capacity_factor"),
], ids=["drop_policy_unknown", "capacity_factor_zero", "capacity_factor_negative"])
def test_capacity_drop_bad_input(changes, name):
    kwargs = dict(topk_ids=a0["topk_ids"], topk_weights=a0["topk_weights"], num_experts=E,
                  capacity_factor=1.0, drop_policy="probs")
    kwargs.update(changes)
    with pytest.raises(ValueError, match=name):
        capacity_drop(**kwargs)


@pytest.mark.parametrize("bad", [E, E + 4, -5])
def test_capacity_drop_checks_its_ids(bad):
    """An id outside [-1, E) is an error naming topk_ids and the valid range (not passed
    through, not an IndexError from inside, not silently turned into -1)."""
    ids = a0["topk_ids"].clone()
    ids[1, 0] = bad
    with pytest.raises(ValueError, match=rf"topk_ids: expected values in \[-1, {E - 1}\]"):
        capacity_drop(ids, a0["topk_weights"], E, 10.0,
                      validate_ids=True)  # (the default on CUDA: a device-side assertion)
    if ids.device.type == "cpu":
        with pytest.raises(ValueError, match="topk_ids"):
            capacity_drop(ids, a0["topk_weights"], E, 10.0)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("arg", ["topk_ids", "topk_weights", "w_up", "w_down", "b_up", "b_down"])
def test_fused_experts_device_mismatch(arg):
    kwargs = _experts_args(device=torch.device("cuda"))
    kwargs.update(b_up=torch.zeros(E, 2 * F, device="cuda"),
                  b_down=torch.zeros(E, D, device="cuda"))
    kwargs[arg] = kwargs[arg].cpu()
    with pytest.raises(ValueError, match=arg):
        fused_experts(**kwargs)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("arg", ["gate_weight", "w_up", "expert_bias"])
def test_fused_moe_device_mismatch(arg):
    kwargs = _moe_args(device=torch.device("cuda"))
    kwargs["expert_bias"] = torch.zeros(E, device="cuda")
    kwargs[arg] = kwargs[arg].cpu()
    with pytest.raises(ValueError, match=arg):
        fused_moe(**kwargs)


@requires_cuda
@pytest.mark.gpu
def test_fused_experts_host_id_check_on_cuda():
    kwargs = _experts_args(device=torch.device("cuda"))
    kwargs["topk_ids"] = torch.full((N, K), E, device="cuda")
    with pytest.raises(ValueError, match="topk_ids"):
        fused_experts(**kwargs, validate_ids=True)



def _kernel_operands():
    """Operands of the expert GEMM entry points (``moe_plugin.kernels``) for N tokens, top-k K:
    token rows ``x``/``dout`` [N, D], slot rows ``pre``/``dpre`` [S, 2F], ``h``/``hw`` [S, F]."""
    from moe_plugin.kernels.permute import permute_metadata
    gen = torch.Generator().manual_seed(3)
    a = _experts_args()
    meta = permute_metadata(a["topk_ids"], E)
    s = N * K

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    return meta, dict(x=a["hidden_states"], dout=rnd(N, D), pre=rnd(s, 2 * F), h=rnd(s, F),
                      w_up=a["w_up"], w_down=a["w_down"], weights=a["topk_weights"])


# route_forward's arguments besides logits and top_k (x [N, D] serves as logits [N, E = D])
ROUTE = dict(score_func="softmax", renormalize=True, expert_bias=None, num_groups=None,
             group_topk=None, scaling_factor=1.0, need_aux=False, need_lse=False)


@pytest.mark.parametrize("case,match", [
    # the misuse that read out of bounds in a GPU test (session 34): dout and hw swapped
    (lambda G, W8, m, o: G.wgrad_down(o["h"], o["dout"], m), "wgrad_down: dout must be"),
    (lambda G, W8, m, o: W8.wgrad_down_fp8(o["h"], o["dout"], m), "wgrad_down_fp8: dout"),
    (lambda G, W8, m, o: G.wgrad_up(o["x"], o["pre"], m), "wgrad_up: x must be"),
    (lambda G, W8, m, o: G.expert_up(o["x"][:-1], o["w_up"], m, 0, True, store_pre=True,
                                     store_h=True), "expert_up: x must be"),
    (lambda G, W8, m, o: G.expert_up(o["x"], o["w_up"][..., :-1], m, 0, True,
                                     store_pre=True, store_h=True), r"w_up.shape\[2\]"),
    (lambda G, W8, m, o: G.expert_up(o["x"], o["w_up"][:-1], m, 0, True, store_pre=True,
                                     store_h=True), "w_up must have 4 experts"),
    (lambda G, W8, m, o: G.expert_down(o["h"][:-1], o["w_down"], m), "expert_down: h must"),
    (lambda G, W8, m, o: G.expert_down(o["h"][:, :-1], o["w_down"], m),
     r"w_down.shape\[2\] must be 3"),
    (lambda G, W8, m, o: G.expert_up_bwd(o["dout"], o["w_down"], o["h"], m, o["weights"], 0,
                                         True), r"pre.shape\[1\] must be 8"),
    (lambda G, W8, m, o: G.expert_up_bwd(o["dout"], o["w_down"], o["pre"], m,
                                         o["weights"][:, :1], 0, True), "topk_weights"),
    (lambda G, W8, m, o: G.expert_dx(o["h"], o["w_up"], m), r"w_up.shape\[1\] must be 4"),
    (lambda G, W8, m, o: G.grouped_gemm.bias_down_grad(
        o["dout"], o["w_down"][:-1, :, 0], o["weights"], m, True, True),
     "b_down must have 4 experts"),
    (lambda G, W8, m, o: G.gather_reduce(o["h"], m, o["weights"][:, :1]),
     "gather_reduce: weights"),
    (lambda G, W8, m, o: G.gather_rows(o["h"], m.sorted_slot, o["pre"], div=K),
     "gather_rows: src must be"),
    (lambda G, W8, m, o: G.route_forward(o["x"].to(torch.bfloat16), K, **ROUTE),
     "route_forward: logits must be"),
    (lambda G, W8, m, o: G.route_forward(o["x"], D + 1, **ROUTE), "top_k: expected at most"),
    (lambda G, W8, m, o: G.route_backward(o["x"], o["weights"].int(), o["weights"][:, :1], None,
                                          None, score_func="softmax", renormalize=True,
                                          scaling_factor=1.0), "route_backward: d_weights"),
], ids=["wgrad_down_swapped", "wgrad_down_fp8_swapped", "wgrad_up_swapped", "up_x_rows",
        "up_w_width", "up_w_experts", "down_h_rows", "down_h_width", "up_bwd_pre_width",
        "up_bwd_weights", "dx_width", "bias_down", "gather_reduce_weights",
        "gather_rows_width", "route_logits_dtype", "route_top_k", "route_bwd_dweights"])
def test_kernel_entry_points_check_operand_shapes(case, match):
    """The expert GEMM entry points index rows and columns from the routing metadata and their
    operands' shapes: operands that do not fit (here: rows swapped, one row or column short,
    an expert missing) raise ValueError naming the argument, before any kernel reads past an
    operand's end."""
    from moe_plugin import kernels as G
    from moe_plugin.kernels import wgrad_fp8 as W8
    meta, ops = _kernel_operands()
    with pytest.raises(ValueError, match=match):
        case(G, W8, meta, ops)
