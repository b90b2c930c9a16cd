"""``MoELayer`` against ``reference.moe_layer`` in float64, option by option.

Every case checks the routing decisions (``topk_ids``, ``tokens_per_expert``) exactly, and the
output, the routing weights, the aux and z losses and the gradients of the input and of every
parameter (w_gate, w_up, w_down, shared_w_up, shared_w_down, shared_gate, latent_down,
latent_up) through ``(out·g).sum() + 3·aux + 2·z`` to a relative L2 error of 1e-5 (fp32, CPU
interpreter or CUDA) or 1e-2 (bf16, GPU). Also: router jitter, aux-loss-free expert bias (with
a 2-process gloo all-reduce), recompute, bad input, per-expert weight interop (checked against
hand-written Mixtral / Qwen2-MoE / Megatron-style blocks below) and ``torch.compile``.
"""
import copy
import inspect
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from conftest import (assert_losses_exercised, BF16_TOL, DEVICE, FP32_TOL, HAS_CUDA, assert_bitwise, assert_close,
                      rel_err, requires_cuda)
from moe_plugin import MoELayer, reference
from moe_plugin.config import expert_capacity

PARAM_NAMES = ("w_gate", "w_up", "w_down", "shared_w_up", "shared_w_down", "shared_gate",
               "latent_down", "latent_up", "b_up", "b_down", "shared_b_up", "shared_b_down")
AUX_WEIGHT, Z_WEIGHT = 3.0, 2.0
# MoELayer options that are also arguments of reference.moe_layer
REF_OPTIONS = set(inspect.signature(reference.moe_layer).parameters) - {"x", "params", "top_k",
                                                                        "router_noise"}


# ----------------------------------------------------------------------------------------------
# helpers

def make_layer(seed, d, f, e, k, *, dtype=torch.float32, device=DEVICE, gate_scale=2.0,
               bias_scale=0.1, **kwargs) -> MoELayer:
    """A layer with random weights of a useful scale (N(0, 1/fan_in); the router's spread by
    ``gate_scale`` so that routing is decisive) and, with ``enable_expert_bias``, a random
    expert bias."""
    layer = MoELayer(d, f, e, k, dtype=dtype, device=device, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in PARAM_NAMES:
            p = getattr(layer, name)
            if p is None:
                continue
            scale = gate_scale if name == "w_gate" else 1.0
            p.copy_(torch.randn(p.shape, generator=gen) * (scale / math.sqrt(p.shape[-1])))
        if layer.expert_bias is not None:
            layer.expert_bias.copy_(torch.randn(e, generator=gen) * bias_scale)
    return layer


def present_params(layer) -> dict:
    return {n: getattr(layer, n) for n in PARAM_NAMES if getattr(layer, n) is not None}


def _loss(out, info, gout):
    return ((out.to(torch.float64) * gout.to(torch.float64)).sum()
            + AUX_WEIGHT * info["aux_loss"].to(torch.float64)
            + Z_WEIGHT * info["z_loss"].to(torch.float64))


def run_layer(layer, x, gout, noise_seed=None):
    """Forward + backward of ``(out·g).sum() + 3·aux + 2·z``. Returns ``(out, info, grads)``
    with grads of ``x`` and of every parameter the layer has. ``noise_seed`` seeds torch's
    generators right before the forward (router jitter)."""
    xl = x.detach().clone().requires_grad_()
    params = present_params(layer)
    if noise_seed is not None:
        torch.manual_seed(noise_seed)
    out, info = layer(xl)
    grads = torch.autograd.grad(_loss(out, info, gout), [xl, *params.values()])
    return out.detach(), info, dict(zip(["x", *params], grads))


def router_noise(x, d_model, eps, seed):
    """The jitter noise the layer draws after ``torch.manual_seed(seed)``: the first random op
    of its forward is ``torch.empty_like(h).uniform_(1 - eps, 1 + eps)``, h = x as [N, D]."""
    torch.manual_seed(seed)
    h = x.detach().reshape(-1, d_model)
    noise = torch.empty_like(h).uniform_(1.0 - eps, 1.0 + eps)
    if h.dtype == torch.float32:
        return noise.to(torch.float64)
    # In bf16 the layer's router sees h·noise rounded to bf16: hand the reference the exact
    # ratio so that both routers see the same input (a rounding flip would change the routing).
    h64, hr64 = h.to(torch.float64), (h * noise).to(torch.float64)
    return torch.where(h64 != 0, hr64 / h64.where(h64 != 0, 1.0), noise.to(torch.float64))


def run_reference(layer, x, gout, ref_kwargs, noise=None):
    """``reference.moe_layer`` on float64 copies of the layer's parameters (and expert bias);
    same return as ``run_layer``."""
    params = {n: p.detach().to(torch.float64).requires_grad_()
              for n, p in present_params(layer).items()}
    if layer.expert_bias is not None:
        params["expert_bias"] = layer.expert_bias.detach().to(torch.float64)
    x64 = x.detach().to(torch.float64).requires_grad_()
    out, info = reference.moe_layer(x64, params, layer.top_k, router_noise=noise, **ref_kwargs)
    leaves = [x64] + [params[n] for n in PARAM_NAMES if n in params]
    grads = torch.autograd.grad(_loss(out, info, gout), leaves)
    return out.detach(), info, dict(zip(["x"] + [n for n in PARAM_NAMES if n in params], grads))


def ref_options(kwargs) -> dict:
    return {k: v for k, v in kwargs.items() if k in REF_OPTIONS}


def check_layer(layer, x, gout, ref_kwargs, tol, noise_seed=None):
    """Layer vs float64 reference: routing exactly; output, weights, losses, all grads to tol."""
    noise = None
    if noise_seed is not None and layer.training and layer.router_jitter > 0:
        noise = router_noise(x, layer.d_model, layer.router_jitter, noise_seed)
    out, info, grads = run_layer(layer, x, gout, noise_seed)
    ref, rinfo, rgrads = run_reference(layer, x, gout, ref_kwargs, noise)
    n, e = x.numel() // x.shape[-1], layer.num_experts
    assert out.shape == x.shape and out.dtype == x.dtype
    assert info["topk_ids"].shape == (n, layer.top_k)
    assert torch.equal(info["topk_ids"].long().cpu(), rinfo["topk_ids"].cpu()), "topk_ids"
    assert info["tokens_per_expert"].shape == (e,)
    assert torch.equal(info["tokens_per_expert"].long().cpu(),
                       rinfo["tokens_per_expert"].long().cpu()), "tokens_per_expert"
    assert_close(info["topk_weights"], rinfo["topk_weights"], FP32_TOL, "topk_weights")
    assert_close(out, ref, tol, "out")
    for name in ("aux_loss", "z_loss"):
        assert info[name].dim() == 0, name
        assert_close(info[name], rinfo[name], min(tol, 1e-4), name)
    assert set(grads) == set(rgrads)
    for name, g in grads.items():
        assert g.shape == rgrads[name].shape and g.dtype == (x if name == "x" else
                                                           getattr(layer, name)).dtype, name
        assert rgrads[name].norm() > 0, f"grad {name} is zero in the reference: nothing tested"
        assert_close(g, rgrads[name], tol, f"grad {name}")
    return (out, info, grads), (ref, rinfo, rgrads)


def layer_inputs(seed, shape, dtype=torch.float32, device=DEVICE):
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(shape, generator=gen)
    gout = torch.randn(shape, generator=gen)
    return x.to(device, dtype), gout.to(device, dtype)


# ----------------------------------------------------------------------------------------------
# every option vs the reference

# name: (input layout, F, E, top_k, MoELayer kwargs, what the case must exercise)
# layout "bsd" = [B, S, D], "sbd" = [S, B, D] (batch_first=False), "nd" = [N, D]
CASES = {
    "softmax_renorm_3d": ("bsd", 24, 8, 2, dict(aux_loss_coeff=0.1, z_loss_coeff=0.01), None),
    "softmax_no_renorm_2d": ("nd", 24, 8, 2, dict(activation="geglu", renormalize=False,
                                                  aux_loss_coeff=0.1), None),
    "sigmoid_renorm": ("nd", 16, 8, 2, dict(score_func="sigmoid", z_loss_coeff=0.01), None),
    "sigmoid_no_renorm_scaling": ("bsd", 16, 8, 3,
                                  dict(score_func="sigmoid", renormalize=False,
                                       scaling_factor=2.5, aux_loss_coeff=0.1), None),
    "groups_sigmoid": ("nd", 16, 8, 4, dict(score_func="sigmoid", num_groups=4, group_topk=2,
                                            scaling_factor=2.5, aux_loss_coeff=0.1), "groups"),
    "groups_softmax": ("bsd", 16, 8, 4, dict(num_groups=4, group_topk=2, z_loss_coeff=0.01),
                       "groups"),
    # Llama-4: top-1 sigmoid, no renormalisation, the weight scales the expert's input, plus
    # a shared expert
    "llama4_weight_on_input": ("bsd", 16, 8, 1,
                               dict(score_func="sigmoid", renormalize=False,
                                    apply_weight_to_input=True, num_shared_experts=1,
                                    z_loss_coeff=0.01), "weight_on_input"),
    "capacity_probs": ("nd", 16, 8, 2, dict(capacity_factor=0.5, drop_policy="probs",
                                            aux_loss_coeff=0.1, z_loss_coeff=0.01), "drops"),
    "capacity_position": ("bsd", 16, 8, 2, dict(score_func="sigmoid", capacity_factor=0.5,
                                                drop_policy="position", aux_loss_coeff=0.1),
                          "drops"),
    "seq_aux_batch_first": ("bsd", 16, 8, 2, dict(aux_loss_type="seq", aux_loss_coeff=0.1,
                                                  z_loss_coeff=0.01), "seq"),
    "seq_aux_seq_first": ("sbd", 16, 8, 2, dict(score_func="sigmoid", aux_loss_type="seq",
                                                aux_loss_coeff=0.1, batch_first=False), "seq"),
    "expert_bias": ("nd", 16, 8, 2, dict(score_func="sigmoid", enable_expert_bias=True,
                                         aux_loss_coeff=0.1), "bias"),
    "shared_gated": ("bsd", 16, 8, 2, dict(num_shared_experts=2, shared_ffn_dim=12,
                                           shared_expert_gate=True, aux_loss_coeff=0.1,
                                           z_loss_coeff=0.01), None),
    "shared_ungated_relu2": ("nd", 16, 8, 2, dict(activation="relu2", num_shared_experts=3,
                                                  shared_ffn_dim=8), None),
    "latent": ("bsd", 16, 8, 2, dict(latent_dim=16, aux_loss_coeff=0.1), None),
    "jitter": ("bsd", 16, 8, 2, dict(router_jitter=0.2, aux_loss_coeff=0.1, z_loss_coeff=0.01),
               "jitter"),
    # expert biases (bias=True: Megatron-Core's add_bias_linear) with the exact gelu, Megatron's
    # default MLP; shared experts get biases too
    "bias_gelu_erf_shared": ("bsd", 16, 8, 2, dict(activation="gelu_erf", bias=True,
                                                   num_shared_experts=1, aux_loss_coeff=0.1),
                             None),
    "bias_geglu_erf_latent_capacity_recompute": (
        "nd", 16, 8, 2, dict(activation="geglu_erf", bias=True, latent_dim=24, capacity_factor=0.5,
                             num_shared_experts=2, shared_ffn_dim=8, recompute=True,
                             z_loss_coeff=0.01), "drops"),
    # everything at once: bias + groups + capacity + latent + gated shared experts + recompute
    "combined_recompute": ("bsd", 16, 8, 4,
                           dict(score_func="sigmoid", enable_expert_bias=True, num_groups=2,
                                group_topk=1, capacity_factor=0.75, latent_dim=24,
                                num_shared_experts=2, shared_ffn_dim=8, shared_expert_gate=True,
                                aux_loss_coeff=0.1, z_loss_coeff=0.01, recompute=True), "drops"),
}

CPU_SIZES = dict(b=2, s=12, d=32)      # N = 24 tokens
GPU_SIZES = dict(b=4, s=128, d=256)    # N = 512 tokens


def _shape(layout, sizes):
    b, s, d = sizes["b"], sizes["s"], sizes["d"]
    return {"bsd": (b, s, d), "sbd": (s, b, d), "nd": (b * s, d)}[layout]


def _check_case(case, seed, sizes, dtype, tol, device):
    layout, f, e, k, kwargs, exercises = CASES[case]
    d = sizes["d"]
    layer = make_layer(seed, d, f, e, k, dtype=dtype, device=device, **kwargs)
    x, gout = layer_inputs(seed, _shape(layout, sizes), dtype, device)
    if exercises == "seq":   # a topic per sequence: the sequences' routing really differs
        b_dim = 0 if kwargs.get("batch_first", True) else 1
        topic = torch.randn(x.shape[b_dim], d, generator=torch.Generator().manual_seed(seed + 2))
        x = x + (topic[:, None] if b_dim == 0 else topic[None]).to(device, dtype)
    ref_kwargs = ref_options(kwargs)
    (out, info, grads), (ref, rinfo, _) = check_layer(layer, x, gout, ref_kwargs, tol,
                                                      noise_seed=seed)

    # each case really exercises its option
    ids = rinfo["topk_ids"]
    n = ids.shape[0]
    logits = x.reshape(-1, d).double() @ layer.w_gate.double().t()
    score_func = kwargs.get("score_func", "softmax")
    if exercises == "groups":
        plain, _, _ = reference.route(logits, k, score_func=score_func)
        assert not torch.equal(ids.cpu(), plain.cpu())
        groups = ids // (e // kwargs["num_groups"])
        assert all(len(set(row.tolist())) <= kwargs["group_topk"] for row in groups)
    if exercises == "bias":
        plain, _, _ = reference.route(logits, k, score_func=score_func)
        assert not torch.equal(ids.cpu(), plain.cpu())
    if exercises == "drops":
        assert (ids == -1).any()
        cap = expert_capacity(n, k, e, kwargs["capacity_factor"])
        assert rinfo["tokens_per_expert"].max() == cap
    else:
        assert (ids >= 0).all()
    if exercises == "weight_on_input":   # scaling the input is not scaling the output
        other = dict(ref_kwargs, apply_weight_to_input=False)
        ref_out_weighted, _, _ = run_reference(layer, x, gout, other)
        assert rel_err(ref_out_weighted, ref) > 1e-2
    if exercises == "seq":               # per-sequence loss differs from the batch loss and
        batch = dict(ref_kwargs, aux_loss_type="batch")   # from the other layout's
        _, binfo, _ = run_reference(layer, x, gout, batch)
        assert rel_err(binfo["aux_loss"], rinfo["aux_loss"]) > 1e-3
        nb, ns = (x.shape[0], x.shape[1]) if kwargs.get("batch_first", True) else \
            (x.shape[1], x.shape[0])
        wrong = reference.seq_load_balance_loss(logits, k, score_func, kwargs["aux_loss_coeff"],
                                                nb, ns, not kwargs.get("batch_first", True))
        assert rel_err(wrong, rinfo["aux_loss"]) > 1e-3
    if exercises == "jitter":            # the noise changes the result
        ref_plain, _, _ = run_reference(layer, x, gout, ref_kwargs)
        assert rel_err(out, ref_plain) > 1e-2
    assert_losses_exercised(kwargs, info, rinfo)
    expected = {"x", "w_gate", "w_up", "w_down"}
    if kwargs.get("num_shared_experts"):
        expected |= {"shared_w_up", "shared_w_down"}
    if kwargs.get("shared_expert_gate"):
        expected.add("shared_gate")
    if kwargs.get("latent_dim"):
        expected |= {"latent_down", "latent_up"}
    if kwargs.get("bias"):
        expected |= {"b_up", "b_down"}
        if kwargs.get("num_shared_experts"):
            expected |= {"shared_b_up", "shared_b_down"}
    assert set(grads) == expected


@pytest.mark.parametrize("case", CASES)
def test_layer_matches_reference(case, seed, poison_empty):
    _check_case(case, seed, CPU_SIZES, torch.float32, FP32_TOL, DEVICE)


def test_torch_backend_matches_reference(seed):
    """backend='torch' (plain PyTorch, no Triton) follows the same semantics: seq aux loss,
    expert bias, capacity, latent and gated shared experts together."""
    kwargs = dict(score_func="sigmoid", enable_expert_bias=True, capacity_factor=0.75,
                  latent_dim=16, num_shared_experts=2, shared_ffn_dim=8, shared_expert_gate=True,
                  aux_loss_type="seq", aux_loss_coeff=0.1, z_loss_coeff=0.01, batch_first=False)
    layer = make_layer(seed, 32, 16, 8, 2, backend="torch", **kwargs)
    x, gout = layer_inputs(seed, (12, 2, 32))
    (_, info, _), (_, rinfo, _) = check_layer(layer, x, gout, ref_options(kwargs), FP32_TOL)
    assert (rinfo["topk_ids"] == -1).any()


def test_other_input_shapes(seed):
    """A 1-D token, a non-contiguous 3-D view, and empty inputs (2-D and 3-D)."""
    kwargs = dict(num_shared_experts=1, aux_loss_coeff=0.1, z_loss_coeff=0.01)
    layer = make_layer(seed, 16, 8, 4, 2, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(3, 16, 5, generator=gen).to(DEVICE)
    view = base.transpose(1, 2)                  # [3, 5, 16], not contiguous
    assert not view.is_contiguous()
    for x in (torch.randn(16, generator=gen).to(DEVICE), view):
        gout = torch.randn(x.shape, generator=gen).to(DEVICE)
        check_layer(layer, x, gout, ref_options(kwargs), FP32_TOL)
    for shape in ((0, 16), (2, 0, 16)):
        x = torch.zeros(shape, device=DEVICE, requires_grad=True)
        out, info = layer(x)
        assert out.shape == shape and info["tokens_per_expert"].sum() == 0
        assert info["aux_loss"] == 0 and info["z_loss"] == 0
        (out.sum() + info["aux_loss"] + info["z_loss"]).backward()
        assert x.grad.shape == shape


def test_jitter_off_in_eval_mode(seed):
    """Eval mode: no noise (the output equals the noiseless reference) and two calls are
    bitwise identical."""
    layer = make_layer(seed, 32, 16, 8, 2, router_jitter=0.2, aux_loss_coeff=0.1)
    x, gout = layer_inputs(seed, (2, 12, 32))
    layer.eval()
    with torch.no_grad():
        out1, info1 = layer(x)
        out2, info2 = layer(x)
    ref, rinfo, _ = run_reference(layer, x, gout, ref_options(dict(aux_loss_coeff=0.1)))
    assert torch.equal(info1["topk_ids"].long().cpu(), rinfo["topk_ids"].cpu())
    assert_close(out1, ref, FP32_TOL, "eval out")
    assert_close(info1["aux_loss"], rinfo["aux_loss"], FP32_TOL, "eval aux_loss")
    assert_bitwise(out2, out1, "second eval call")
    assert_bitwise(info2["topk_weights"], info1["topk_weights"], "second eval call weights")
    # and in training mode the same layer does apply noise
    layer.train()
    with torch.no_grad():
        out3, _ = layer(x)
    assert rel_err(out3, ref) > 1e-2


def test_recompute_is_bitwise(seed):
    """recompute=True gives bitwise the outputs and gradients of recompute=False."""
    kwargs = dict(num_shared_experts=2, shared_ffn_dim=8, shared_expert_gate=True, latent_dim=24,
                  capacity_factor=1.0, aux_loss_coeff=0.1, z_loss_coeff=0.01)
    layer = make_layer(seed, 32, 16, 8, 2, **kwargs)
    layer_rc = make_layer(seed, 32, 16, 8, 2, recompute=True, **kwargs)
    x, gout = layer_inputs(seed, (2, 12, 32))
    out, info, grads = run_layer(layer, x, gout)
    out_rc, info_rc, grads_rc = run_layer(layer_rc, x, gout)
    assert_bitwise(out_rc, out, "out")
    for name in ("topk_ids", "topk_weights", "aux_loss", "z_loss", "tokens_per_expert"):
        assert_bitwise(info_rc[name], info[name], name)
    assert set(grads_rc) == set(grads) and len(grads) == 9
    for name in grads:
        assert_bitwise(grads_rc[name], grads[name], f"grad {name}")


def test_recompute_saves_the_pre_activation(seed):
    """What recompute=True saves for backward: exactly the [N·k, 2F] pre-activation less."""
    kwargs = dict(capacity_factor=0.5, num_shared_experts=1)   # dropped slots still count
    n, f, k = 24, 16, 2

    def saved_elements(recompute):
        layer = make_layer(seed, 32, f, 8, k, recompute=recompute, **kwargs)
        x, _ = layer_inputs(seed, (n, 32))
        saved = {}

        def pack(t):
            saved[(t.data_ptr(), tuple(t.shape))] = t.numel()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
        return sum(saved.values())

    assert saved_elements(False) - saved_elements(True) == n * k * 2 * f


# ----------------------------------------------------------------------------------------------
# aux-loss-free balancing: expert bias

def test_expert_bias_counts_and_update(seed):
    """Loads accumulate in training mode with grad enabled only; update_expert_bias follows
    bias += rate·sign(mean(load) − load) and resets the loads."""
    e = 8
    layer = make_layer(seed, 16, 8, e, 2, score_func="sigmoid", enable_expert_bias=True)
    assert "expert_bias" in layer.state_dict()
    assert "local_tokens_per_expert" not in layer.state_dict()   # not persistent
    x1, _ = layer_inputs(seed, (16, 16))
    x2, _ = layer_inputs(seed + 1, (16, 16))
    assert (layer.local_tokens_per_expert == 0).all()
    _, info1 = layer(x1)
    assert layer.local_tokens_per_expert.dtype == torch.float32
    assert torch.equal(layer.local_tokens_per_expert, info1["tokens_per_expert"].float())
    with torch.no_grad():
        layer(x2)                                    # no grad: not counted
    layer.eval()
    layer(x2)                                        # eval: not counted
    layer.train()
    assert torch.equal(layer.local_tokens_per_expert, info1["tokens_per_expert"].float())
    _, info2 = layer(x2)
    load = (info1["tokens_per_expert"] + info2["tokens_per_expert"]).float()
    assert not torch.equal(info1["tokens_per_expert"], info2["tokens_per_expert"])
    assert torch.equal(layer.local_tokens_per_expert, load)
    assert load.sum() == 2 * 16 * 2

    rate = 1e-2
    before = layer.expert_bias.clone()
    expected = before + rate * torch.sign(load.mean() - load)
    layer.update_expert_bias(rate)
    assert torch.equal(layer.expert_bias, expected)
    assert not torch.equal(layer.expert_bias, before)
    assert (layer.local_tokens_per_expert == 0).all()


def test_expert_bias_update_rule_exact():
    """Hand-set loads: over-loaded experts go down by rate, under-loaded up, average stays."""
    layer = MoELayer(8, 4, 4, 2, enable_expert_bias=True, device=DEVICE)
    layer.expert_bias.copy_(torch.tensor([0.5, -0.25, 0.0, 1.0]))
    layer.local_tokens_per_expert.copy_(torch.tensor([4.0, 2.0, 2.0, 0.0]))   # mean 2
    layer.update_expert_bias(0.125)
    assert torch.equal(layer.expert_bias.cpu(), torch.tensor([0.375, -0.25, 0.0, 1.125]))
    assert (layer.local_tokens_per_expert == 0).all()
    layer.update_expert_bias(0.125)                   # no load since: no change
    assert torch.equal(layer.expert_bias.cpu(), torch.tensor([0.375, -0.25, 0.0, 1.125]))


def test_expert_bias_stays_fp32_under_dtype_casts(seed):
    """model.bfloat16() / .to(dtype) casts the parameters but not the balancing state: in bf16
    a load of 443 would be stored as 444, and a 1e-3 step on a bias of 0.5 would vanish."""
    layer = MoELayer(16, 8, 2, 1, enable_expert_bias=True, backend="torch", device=DEVICE)
    layer.expert_bias.fill_(0.5)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double(),
                 lambda m: m.bfloat16()):
        cast(layer)
        assert layer.expert_bias.dtype == torch.float32
        assert layer.local_tokens_per_expert.dtype == torch.float32
    assert layer.w_gate.dtype == torch.bfloat16 and layer.w_up.dtype == torch.bfloat16
    assert (layer.expert_bias == 0.5).all()
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(2, dtype=torch.int64)
    for _ in range(3):                          # backend="torch": bf16 on CPU needs no kernels
        _, info = layer(torch.randn(301, 16, generator=gen).to(DEVICE, torch.bfloat16))
        total += info["tokens_per_expert"].long().cpu()
    assert torch.equal(layer.local_tokens_per_expert.cpu(), total.float())
    assert ((total % 2 == 1) & (total > 256)).any()   # a count bf16 cannot hold
    layer.update_expert_bias(1e-3)
    assert torch.equal(layer.expert_bias.cpu(), 0.5 + 1e-3 * torch.sign(total.float().mean()
                                                                         - total.float()))


DIST_E, DIST_RATE = 8, 1e-3


def _expert_bias_worker(rank, world_size, init_method, out_dir):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        # same layer on both ranks, different tokens: rank 0's all pick expert 0, rank 1's
        # are spread (so the summed loads rank the experts differently from rank 1's own);
        # backend="torch" only saves interpreter time: the counting code is the same
        layer = make_layer(5, 16, 8, DIST_E, 2, score_func="sigmoid", enable_expert_bias=True,
                           backend="torch", device="cpu")
        gen = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(24, 16, generator=gen)
        if rank == 0:
            w = layer.w_gate[0].detach()
            x = x + 4.0 * w / w.norm()
        layer(x)
        loads = layer.local_tokens_per_expert.clone()
        before = layer.expert_bias.clone()
        layer.update_expert_bias(DIST_RATE, group=dist.group.WORLD)
        torch.save(dict(loads=loads, before=before, after=layer.expert_bias.clone(),
                        loads_after=layer.local_tokens_per_expert.clone()),
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_expert_bias_update_all_reduces_loads(tmp_path):
    """With a process group the loads of all ranks are summed before the update: both ranks
    end with the same bias, the one the summed loads give."""
    mp.spawn(_expert_bias_worker, args=(2, f"file://{tmp_path}/init", str(tmp_path)), nprocs=2,
             join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    assert r[0]["loads"][0] == 24 and not torch.equal(r[0]["loads"], r[1]["loads"])
    assert torch.equal(r[0]["before"], r[1]["before"])
    total = r[0]["loads"] + r[1]["loads"]
    expected = r[0]["before"] + DIST_RATE * torch.sign(total.mean() - total)
    for i in range(2):
        assert r[i]["loads"].sum() == 24 * 2
        assert torch.equal(r[i]["after"], expected), f"rank {i}"
        assert (r[i]["loads_after"] == 0).all()
    # the all-reduce matters: rank 1's own loads alone would give another bias
    local = r[1]["before"] + DIST_RATE * torch.sign(r[1]["loads"].mean() - r[1]["loads"])
    assert not torch.equal(local, expected)


# ----------------------------------------------------------------------------------------------
# bad input

LAYER_ARGS = dict(d_model=16, ffn_dim=8, num_experts=4, top_k=2)

CTOR_CASES = {
    # name: (changes, exception, argument named in the message)
    "d_model_zero": (dict(d_model=0), ValueError, "d_model"),
    "d_model_float": (dict(d_model=16.0), ValueError, "d_model"),
    "ffn_dim_neg": (dict(ffn_dim=-1), ValueError, "ffn_dim"),
    "num_experts_bool": (dict(num_experts=True), ValueError, "num_experts"),
    "activation": (dict(activation="tanh"), ValueError, "activation"),
    "top_k_zero": (dict(top_k=0), ValueError, "top_k"),
    "top_k_too_big": (dict(top_k=5), ValueError, "top_k"),
    "score_func": (dict(score_func="relu"), ValueError, "score_func"),
    "renormalize_int": (dict(renormalize=1), TypeError, "renormalize"),
    "groups_alone": (dict(num_groups=2), ValueError, "num_groups"),
    "groups_not_divisor": (dict(num_groups=3, group_topk=1), ValueError, "num_groups"),
    "group_topk_gt_groups": (dict(num_groups=2, group_topk=3, top_k=4), ValueError,
                             "group_topk"),
    "group_topk_gt_top_k": (dict(num_groups=4, group_topk=2, top_k=1), ValueError,
                            "group_topk"),
    "num_groups_zero": (dict(num_groups=0, group_topk=1), ValueError, "num_groups"),
    "group_topk_zero": (dict(num_groups=2, group_topk=0), ValueError, "group_topk"),
    "group_too_small": (dict(num_groups=4, group_topk=1), ValueError, "group_topk"),
    "groups_too_few_experts": (dict(num_groups=4, group_topk=2, top_k=3), ValueError,
                               "group_topk"),
    "scaling_zero": (dict(scaling_factor=0.0), ValueError, "scaling_factor"),
    "scaling_inf": (dict(scaling_factor=float("inf")), ValueError, "scaling_factor"),
    "scaling_bool": (dict(scaling_factor=True), ValueError, "scaling_factor"),
    "capacity_neg": (dict(capacity_factor=-1.0), ValueError, "capacity_factor"),
    "capacity_nan": (dict(capacity_factor=float("nan")), ValueError, "capacity_factor"),
    "drop_policy": (dict(drop_policy="random"), ValueError, "drop_policy"),
    "aux_coeff_neg": (dict(aux_loss_coeff=-0.1), ValueError, "aux_loss_coeff"),
    "aux_loss_type": (dict(aux_loss_type="token"), ValueError, "aux_loss_type"),
    "z_coeff_neg": (dict(z_loss_coeff=-1e-3), ValueError, "z_loss_coeff"),
    "backend": (dict(backend="cuda"), ValueError, "backend"),
    "weight_on_input_top2": (dict(apply_weight_to_input=True), ValueError,
                             "apply_weight_to_input"),
    "jitter_neg": (dict(router_jitter=-0.1), ValueError, "router_jitter"),
    "jitter_one": (dict(router_jitter=1.0), ValueError, "router_jitter"),
    "shared_neg": (dict(num_shared_experts=-1), ValueError, "num_shared_experts"),
    "shared_bool": (dict(num_shared_experts=True), ValueError, "num_shared_experts"),
    "shared_float": (dict(num_shared_experts=1.0), ValueError, "num_shared_experts"),
    "shared_ffn_zero": (dict(num_shared_experts=1, shared_ffn_dim=0), ValueError,
                        "shared_ffn_dim"),
    "shared_gate_no_shared": (dict(shared_expert_gate=True), ValueError, "shared_expert_gate"),
    "latent_zero": (dict(latent_dim=0), ValueError, "latent_dim"),
    "init_std_neg": (dict(init_std=-0.02), ValueError, "init_std"),
    "init_method": (dict(init_method="normal"), TypeError, "init_method"),
    "dtype_int": (dict(dtype=torch.int32), TypeError, "dtype"),
    "recompute_str": (dict(recompute="yes"), TypeError, "recompute"),
    "expert_bias_int": (dict(enable_expert_bias=1), TypeError, "enable_expert_bias"),
    "overlap_none": (dict(shared_expert_overlap=None), TypeError, "shared_expert_overlap"),
    "batch_first_int": (dict(batch_first=0), TypeError, "batch_first"),
    "weight_on_input_int": (dict(apply_weight_to_input=1, top_k=1), TypeError,
                            "apply_weight_to_input"),
    "bias_str": (dict(bias="yes"), TypeError, "bias: expected a bool"),
    "bias_with_fp8": (dict(bias=True, quant="fp8_block"), ValueError,
                      "bias: expert biases are not supported"),
}


def test_good_constructor_args_pass(seed):
    """The baseline arguments are valid: every failure below comes from the one change. (And
    the default initialisation, N(0, 0.02), with 3 tokens: right too.)"""
    layer = MoELayer(**LAYER_ARGS, device=DEVICE)
    x, gout = layer_inputs(seed, (3, 16))
    with torch.no_grad():
        out, info = layer(x)
    ref, rinfo, _ = run_reference(layer, x, gout, {})
    assert out.shape == (3, 16) and info["topk_ids"].shape == (3, 2)
    assert torch.equal(info["topk_ids"].long().cpu(), rinfo["topk_ids"].cpu())
    assert_close(out, ref, FP32_TOL, "out")


def test_init_method_and_std():
    layer = MoELayer(16, 8, 4, 2, num_shared_experts=1, shared_expert_gate=True, latent_dim=8,
                     enable_expert_bias=True, init_method=lambda t: t.fill_(0.5),
                     device=DEVICE)
    assert len(list(layer.parameters())) == 8
    assert all((p == 0.5).all() for p in layer.parameters())
    assert (layer.expert_bias == 0).all()       # a buffer: not initialised by init_method
    layer = MoELayer(64, 32, 8, 2, init_std=0.5, device=DEVICE)
    assert abs(layer.w_up.std().item() - 0.5) < 0.05 and abs(layer.w_up.mean().item()) < 0.05
    assert (MoELayer(16, 8, 4, 2, init_std=0.0, device=DEVICE).w_gate == 0).all()


def test_bias_parameters_and_init(seed):
    """``bias=True``: ``b_up [E, 2F|F]`` / ``b_down [E, D|latent]`` (and the shared experts'
    ``shared_b_up`` / ``shared_b_down``), expert-sharded like the weights, zero-initialised (as
    Megatron-Core's) unless ``init_method`` is given; absent without ``bias``."""
    layer = MoELayer(16, 8, 4, 2, activation="geglu_erf", bias=True, num_shared_experts=1,
                     latent_dim=12, device=DEVICE)
    shapes = {"b_up": (4, 16), "b_down": (4, 12), "shared_b_up": (16,), "shared_b_down": (16,)}
    for name, shape in shapes.items():
        p = getattr(layer, name)
        assert isinstance(p, torch.nn.Parameter) and tuple(p.shape) == shape, name
        assert (p == 0).all(), name
    assert layer.b_up.moe_expert and layer.b_down.moe_expert
    assert not getattr(layer.shared_b_up, "moe_expert", False)
    assert "bias=True" in repr(layer)
    plain = MoELayer(16, 8, 4, 2, activation="gelu_erf", bias=True,
                     init_method=lambda t: t.fill_(0.5), device=DEVICE)
    assert plain.b_up.shape == (4, 8) and (plain.b_up == 0.5).all() and (plain.b_down == 0.5).all()
    none = MoELayer(16, 8, 4, 2, num_shared_experts=1, device=DEVICE)
    assert all(getattr(none, n) is None for n in shapes)
    assert not any("b_" in n for n, _ in none.named_parameters())


@pytest.mark.parametrize("case", CTOR_CASES)
def test_bad_constructor_args(case):
    changes, exc, name = CTOR_CASES[case]
    with pytest.raises(exc, match=name):
        MoELayer(**dict(LAYER_ARGS, **changes), device=DEVICE)


def test_bad_forward_input():
    layer = MoELayer(**LAYER_ARGS, aux_loss_coeff=0.1, aux_loss_type="seq", device=DEVICE)
    good = torch.randn(2, 3, 16, device=DEVICE)
    assert layer(good)[0].shape == good.shape
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 16\]"):
        layer(torch.randn(2, 3, 12, device=DEVICE))
    with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
        layer(good.double())
    with pytest.raises(TypeError, match="x"):
        layer(good.long())
    with pytest.raises(TypeError, match="x"):
        layer(good.tolist())
    with pytest.raises(ValueError, match="x: aux_loss_type='seq' needs a 3-D input"):
        layer(good.reshape(6, 16))
    if HAS_CUDA:
        with pytest.raises(ValueError, match="x"):
            layer(good.cpu())


def test_update_expert_bias_errors():
    layer = MoELayer(**LAYER_ARGS, device=DEVICE)
    with pytest.raises(RuntimeError, match="enable_expert_bias"):
        layer.update_expert_bias(1e-3)
    layer = MoELayer(**LAYER_ARGS, enable_expert_bias=True, device=DEVICE)
    with pytest.raises(ValueError, match="rate"):
        layer.update_expert_bias(-1e-3)


# ----------------------------------------------------------------------------------------------
# weight interop: hand-written per-expert blocks in the three layouts

class GatedMLP(nn.Module):
    """``down(silu(gate(x)) · up(x))`` with HF's (gate_proj/up_proj/down_proj) or Mixtral's
    (w1/w3/w2) names."""

    def __init__(self, d, f, names=("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        self.names = names
        for name, (i, o) in zip(names, ((d, f), (d, f), (f, d))):
            setattr(self, name, nn.Linear(i, o, bias=False))

    def forward(self, x):
        g, u, dn = (getattr(self, n) for n in self.names)
        return dn(F.silu(g(x)) * u(x))


def _sum_over_experts(x, experts, ids, weights):
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel():
            out.index_add_(0, tok, expert(x[tok]) * weights[tok, slot, None])
    return out


class MixtralBlock(nn.Module):
    """HF Mixtral's ``block_sparse_moe``: softmax, top-k, renormalised over the selected."""

    def __init__(self, d, f, e, k):
        super().__init__()
        self.top_k = k
        self.gate = nn.Linear(d, e, bias=False)
        self.experts = nn.ModuleList(GatedMLP(d, f, ("w1", "w3", "w2")) for _ in range(e))

    def forward(self, x):
        probs = torch.softmax(self.gate(x), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return _sum_over_experts(x, self.experts, ids, weights)


class QwenMoeBlock(nn.Module):
    """HF Qwen3-MoE (``norm_topk_prob=True``) / Qwen2-MoE (sigmoid-gated shared expert) mlp."""

    def __init__(self, d, f, e, k, norm_topk_prob, shared_f=None):
        super().__init__()
        self.top_k, self.norm_topk_prob = k, norm_topk_prob
        self.gate = nn.Linear(d, e, bias=False)
        self.experts = nn.ModuleList(GatedMLP(d, f) for _ in range(e))
        if shared_f:
            self.shared_expert = GatedMLP(d, shared_f)
            self.shared_expert_gate = nn.Linear(d, 1, bias=False)
        else:
            self.shared_expert = None

    def forward(self, x):
        probs = torch.softmax(self.gate(x), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        out = _sum_over_experts(x, self.experts, ids, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class MegatronMLP(nn.Module):
    """Megatron-Core's MLP: ``linear_fc1`` (gated: output chunked into [gate, up], SwiGLU;
    else squared ReLU; with ``exact_gelu`` ``F.gelu`` instead, Megatron's default
    ``activation_func``) and ``linear_fc2``, with biases when ``bias`` (``add_bias_linear``)."""

    def __init__(self, d, f, gated, bias=False, exact_gelu=False):
        super().__init__()
        self.gated, self.exact_gelu = gated, exact_gelu
        self.linear_fc1 = nn.Linear(d, 2 * f if gated else f, bias=bias)
        self.linear_fc2 = nn.Linear(f, d, bias=bias)

    def forward(self, x):
        h = self.linear_fc1(x)
        if self.gated:
            g, u = torch.chunk(h, 2, dim=-1)
            h = (F.gelu(g) if self.exact_gelu else F.silu(g)) * u
        else:
            h = F.gelu(h) if self.exact_gelu else F.relu(h).square()
        return self.linear_fc2(h)


class MegatronSharedExperts(MegatronMLP):
    def __init__(self, d, f, gated, gate, **mlp):
        super().__init__(d, f, gated, **mlp)
        self.gate_weight = nn.Parameter(torch.empty(1, d)) if gate else None

    def forward(self, x):
        out = super().forward(x)
        if self.gate_weight is not None:
            out = out * torch.sigmoid(F.linear(x, self.gate_weight))
        return out


class MegatronRouter(nn.Module):
    def __init__(self, d, e, k, score_func, scaling_factor, expert_bias):
        super().__init__()
        self.k, self.score_func, self.scaling_factor = k, score_func, scaling_factor
        self.weight = nn.Parameter(torch.empty(e, d))
        if expert_bias:
            self.register_buffer("expert_bias", torch.zeros(e))
        else:
            self.expert_bias = None

    def forward(self, x):
        logits = F.linear(x, self.weight)
        if self.score_func == "softmax":           # top-k of the logits, softmax over them
            top, ids = torch.topk(logits, self.k, dim=-1)
            return ids, torch.softmax(top, dim=-1) * self.scaling_factor
        scores = torch.sigmoid(logits)
        sel = scores if self.expert_bias is None else scores + self.expert_bias
        _, ids = torch.topk(sel, self.k, dim=-1)
        weights = scores.gather(1, ids)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling_factor


class MegatronMoEBlock(nn.Module):
    """Megatron-Core's MoELayer with SequentialMLP experts and (gated) shared experts."""

    def __init__(self, d, f, e, k, *, gated=True, score_func="softmax", scaling_factor=1.0,
                 expert_bias=False, shared_f=None, shared_gate=False, **mlp):
        super().__init__()
        self.router = MegatronRouter(d, e, k, score_func, scaling_factor, expert_bias)
        self.experts = nn.Module()
        self.experts.local_experts = nn.ModuleList(MegatronMLP(d, f, gated, **mlp)
                                                   for _ in range(e))
        self.shared_experts = (MegatronSharedExperts(d, shared_f, gated, shared_gate, **mlp)
                               if shared_f else None)

    def forward(self, x):
        ids, weights = self.router(x)
        out = _sum_over_experts(x, self.experts.local_experts, ids, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


IO_D, IO_F, IO_E, IO_K = 16, 8, 4, 2
# name: (format, prefix, MoELayer kwargs, block factory)
FORMAT_CASES = {
    "mixtral": ("mixtral", "model.layers.0.block_sparse_moe.", dict(),
                lambda: MixtralBlock(IO_D, IO_F, IO_E, IO_K)),
    "qwen3": ("qwen3", "model.layers.1.mlp.", dict(),
              lambda: QwenMoeBlock(IO_D, IO_F, IO_E, IO_K, norm_topk_prob=True)),
    "qwen2_shared_gate": ("qwen3", "", dict(renormalize=False, num_shared_experts=2,
                                            shared_ffn_dim=6, shared_expert_gate=True),
                          lambda: QwenMoeBlock(IO_D, IO_F, IO_E, IO_K, norm_topk_prob=False,
                                               shared_f=12)),
    "megatron": ("megatron", "decoder.layers.0.mlp.",
                 dict(score_func="sigmoid", enable_expert_bias=True, scaling_factor=2.5,
                      num_shared_experts=2, shared_ffn_dim=6, shared_expert_gate=True),
                 lambda: MegatronMoEBlock(IO_D, IO_F, IO_E, IO_K, score_func="sigmoid",
                                          scaling_factor=2.5, expert_bias=True, shared_f=12,
                                          shared_gate=True)),
    "megatron_relu2": ("megatron", "", dict(activation="relu2", num_shared_experts=1),
                       lambda: MegatronMoEBlock(IO_D, IO_F, IO_E, IO_K, gated=False,
                                                shared_f=IO_F)),
    # Megatron-Core's default MLP (exact gelu, add_bias_linear): linear_fc1/fc2 biases
    "megatron_bias_gelu_erf": ("megatron", "decoder.layers.2.mlp.",
                               dict(activation="gelu_erf", bias=True, num_shared_experts=1),
                               lambda: MegatronMoEBlock(IO_D, IO_F, IO_E, IO_K, gated=False,
                                                        shared_f=IO_F, bias=True,
                                                        exact_gelu=True)),
    "megatron_bias_geglu_erf": ("megatron", "", dict(activation="geglu_erf", bias=True),
                                lambda: MegatronMoEBlock(IO_D, IO_F, IO_E, IO_K, bias=True,
                                                         exact_gelu=True)),
}


def _strip(sd, prefix):
    assert all(k.startswith(prefix) for k in sd)
    return {k[len(prefix):]: v for k, v in sd.items()}


def _layer_state(layer):
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("case", FORMAT_CASES)
def test_weight_interop(case, seed):
    """Export → the hand-written block loads it strictly and computes the same function; the
    block's own state dict → a fresh layer: identical parameters, identical outputs."""
    fmt, prefix, kwargs, make_block = FORMAT_CASES[case]
    layer = make_layer(seed, IO_D, IO_F, IO_E, IO_K, bias_scale=0.2, **kwargs).eval()
    scratch = layer.per_expert_state_dict(fmt, prefix=prefix)
    for v in scratch.values():       # copies, not views of the layer's parameters
        v.add_(1.0)
    sd = layer.per_expert_state_dict(fmt, prefix=prefix)
    assert set(sd) == set(scratch)
    assert not any(torch.equal(sd[k], scratch[k]) for k in sd)

    block = make_block().to(DEVICE)
    block.load_state_dict(_strip(sd, prefix), strict=True)     # names and shapes are right
    x, _ = layer_inputs(seed, (16, IO_D))
    with torch.no_grad():
        out, info = layer(x)
        out_block = block(x)
    if kwargs.get("enable_expert_bias"):
        plain, _, _ = reference.route(x.double() @ layer.w_gate.double().t(), IO_K,
                                      score_func=layer.score_func)
        assert not torch.equal(info["topk_ids"].long().cpu(), plain.cpu())   # bias matters
    assert_close(out_block, out, FP32_TOL, f"{case}: hand-written block vs MoELayer")

    # the other direction: the block's state dict (with the prefix and a key of another
    # module) into a freshly initialised layer
    fresh = MoELayer(IO_D, IO_F, IO_E, IO_K, device=DEVICE, **kwargs).eval()
    block_sd = {prefix + k: v for k, v in block.state_dict().items()}
    block_sd["model.norm.weight"] = torch.ones(IO_D)   # outside the prefix: ignored
    if prefix == "":
        del block_sd["model.norm.weight"]              # (everything is under the empty prefix)
    fresh.load_per_expert_state_dict(block_sd, fmt, prefix=prefix)
    want = _layer_state(layer)
    got = _layer_state(fresh)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    with torch.no_grad():
        out_fresh, _ = fresh(x)
    assert_bitwise(out_fresh, out, "reloaded layer output")
    again = fresh.per_expert_state_dict(fmt, prefix=prefix)
    assert set(again) == set(sd)
    for key in sd:
        assert torch.equal(again[key], sd[key]), key


def test_weight_interop_strict_and_shapes(seed):
    layer = make_layer(seed, IO_D, IO_F, IO_E, IO_K, num_shared_experts=1,
                       shared_expert_gate=True)
    sd = layer.per_expert_state_dict("qwen3", prefix="mlp.")
    assert len(sd) == 1 + 3 * IO_E + 3 + 1
    fresh = MoELayer(IO_D, IO_F, IO_E, IO_K, num_shared_experts=1, shared_expert_gate=True,
                     device=DEVICE)
    missing = dict(sd)
    del missing["mlp.experts.2.up_proj.weight"]
    with pytest.raises(KeyError, match="experts.2.up_proj.weight"):
        fresh.load_per_expert_state_dict(missing, "qwen3", prefix="mlp.")
    unexpected = dict(sd, **{"mlp.experts.4.up_proj.weight": torch.zeros(IO_F, IO_D)})
    with pytest.raises(KeyError, match="experts.4.up_proj.weight"):
        fresh.load_per_expert_state_dict(unexpected, "qwen3", prefix="mlp.")
    bad_shape = dict(sd, **{"mlp.experts.1.down_proj.weight": torch.zeros(IO_D, IO_F + 1)})
    with pytest.raises(ValueError, match="experts.1.down_proj.weight"):
        fresh.load_per_expert_state_dict(bad_shape, "qwen3", prefix="mlp.")
    # non-strict: the missing tensor is left as it was, the rest is loaded
    before = fresh.w_up[2, IO_F:].detach().clone()
    fresh.load_per_expert_state_dict(missing, "qwen3", prefix="mlp.", strict=False)
    assert torch.equal(fresh.w_up[2, IO_F:], before)
    assert torch.equal(fresh.w_up[2, :IO_F], layer.w_up[2, :IO_F])
    assert torch.equal(fresh.w_down, layer.w_down)
    assert torch.equal(fresh.shared_gate, layer.shared_gate)
    # float64 tensors are converted to the layer's dtype
    fresh.load_per_expert_state_dict({k: v.double() for k, v in sd.items()}, "qwen3", "mlp.")
    assert fresh.w_up.dtype == torch.float32 and torch.equal(fresh.w_up, layer.w_up)


@pytest.mark.parametrize("fmt,kwargs,name", [
    ("llama", dict(), "format"),
    ("mixtral", dict(activation="relu2"), "non-gated"),
    ("qwen3", dict(activation="gelu"), "non-gated"),
    ("mixtral", dict(num_shared_experts=1), "shared"),
    ("megatron", dict(latent_dim=8), "latent"),
    ("mixtral", dict(bias=True), "no biases"),
    ("qwen3", dict(bias=True), "no biases"),
])
def test_weight_interop_incompatible(fmt, kwargs, name):
    layer = MoELayer(IO_D, IO_F, IO_E, IO_K, device=DEVICE, **kwargs)
    with pytest.raises(ValueError, match=name):
        layer.per_expert_state_dict(fmt)
    with pytest.raises(ValueError, match=name):
        layer.load_per_expert_state_dict({}, fmt)


# ----------------------------------------------------------------------------------------------
# torch.compile

COMPILE_KWARGS = dict(score_func="sigmoid", enable_expert_bias=True, capacity_factor=1.0,
                      num_shared_experts=2, shared_ffn_dim=8, shared_expert_gate=True,
                      latent_dim=24, aux_loss_coeff=0.1, z_loss_coeff=0.01)


def _reset_dynamo():
    torch._dynamo.reset()
    # conftest's poison_empty swaps torch.empty_like & co. for wrappers while a test runs, and
    # Dynamo caches its table of torch functions (functools.cache) the first time anything
    # builds it -- a plain forward of the layer does. After an earlier poisoned test the table
    # holds the wrappers, and Dynamo then refuses the real torch.empty_like. Rebuild the table.
    rule_map = getattr(torch._dynamo.trace_rules, "get_torch_obj_rule_map", None)
    if hasattr(rule_map, "cache_clear"):
        rule_map.cache_clear()


def _check_compiled(layer, x, gout, tol, backend=None, num_grads=9):
    eager_layer = copy.deepcopy(layer)
    _reset_dynamo()
    compiled = (torch.compile(layer, fullgraph=True) if backend is None
                else torch.compile(layer, backend=backend, fullgraph=True))
    out_c, info_c, grads_c = run_layer(compiled, x, gout)
    out_e, info_e, grads_e = run_layer(eager_layer, x, gout)
    assert torch.equal(info_c["topk_ids"], info_e["topk_ids"])
    assert torch.equal(info_c["tokens_per_expert"], info_e["tokens_per_expert"])
    assert_close(out_c, out_e, tol, "compiled out")
    for name in ("aux_loss", "z_loss"):
        assert_close(info_c[name], info_e[name], min(tol, 1e-4), f"compiled {name}")
    assert set(grads_c) == set(grads_e) and len(grads_c) == num_grads
    for name in grads_e:
        assert_close(grads_c[name], grads_e[name], tol, f"compiled grad {name}")
    # the expert-bias load counter (a buffer mutation) is updated by the compiled call too
    assert torch.equal(layer.local_tokens_per_expert, eager_layer.local_tokens_per_expert)
    assert layer.local_tokens_per_expert.sum() > 0
    return compiled


def test_compile_aot_eager_fullgraph(seed):
    """The Triton launches are torch.library custom ops: forward + backward compile in one
    graph (here with the aot_eager backend, which runs under the CPU interpreter)."""
    layer = make_layer(seed, 32, 16, 8, 2, **COMPILE_KWARGS)
    x, gout = layer_inputs(seed, (2, 12, 32))
    _check_compiled(layer, x, gout, FP32_TOL, backend="aot_eager")


# the router and the experts as one autograd Function (``RoutedLayerFunction``): no capacity
# dropping, no latent projection between them
FUSED_ROUTER_KWARGS = dict(score_func="sigmoid", enable_expert_bias=True, num_shared_experts=2,
                           shared_ffn_dim=8, shared_expert_gate=True, aux_loss_coeff=0.1,
                           z_loss_coeff=0.01)


def test_compile_aot_eager_fullgraph_fused_router(seed, routed_layer_calls):
    """The same for the router and the experts as one Function (its forward and backward,
    the routing backward inside the experts', in one graph); the eager layer takes that path
    too."""
    layer = make_layer(seed, 32, 16, 8, 2, **FUSED_ROUTER_KWARGS)
    x, gout = layer_inputs(seed, (2, 12, 32))
    _check_compiled(layer, x, gout, FP32_TOL, backend="aot_eager", num_grads=7)
    assert routed_layer_calls


def test_compile_aot_eager_fullgraph_with_biases(seed):
    """The same with expert biases (optional tensor arguments of the custom ops)."""
    layer = make_layer(seed, 32, 16, 8, 2, activation="geglu_erf", bias=True, **COMPILE_KWARGS)
    x, gout = layer_inputs(seed, (2, 12, 32))
    _check_compiled(layer, x, gout, FP32_TOL, backend="aot_eager", num_grads=13)


# ----------------------------------------------------------------------------------------------
# GPU: bf16, inductor, side stream

CUDA = torch.device("cuda")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("case", CASES)
def test_bf16_layer_matches_reference(case, seed, poison_empty):
    _check_case(case, seed, GPU_SIZES, torch.bfloat16, BF16_TOL, CUDA)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("kwargs", [COMPILE_KWARGS, FUSED_ROUTER_KWARGS],
                         ids=["dropping_latent", "fused_router"])
def test_bf16_compile_inductor_fullgraph(seed, kwargs):
    """Default (inductor) backend, fullgraph, bf16, shared experts present (the side stream is
    skipped while compiling): matches eager; with capacity dropping and a latent projection,
    and with the router and experts as one Function."""
    layer = make_layer(seed, 256, 128, 8, 2, dtype=torch.bfloat16, device=CUDA, **kwargs)
    x, gout = layer_inputs(seed, (4, 128, 256), torch.bfloat16, CUDA)
    compiled = _check_compiled(layer, x, gout, BF16_TOL,
                               num_grads=9 if "latent_dim" in kwargs else 7)
    # a second call reuses the graph and still matches
    x2, gout2 = layer_inputs(seed + 7, (4, 128, 256), torch.bfloat16, CUDA)
    out_c, _, grads_c = run_layer(compiled, x2, gout2)
    out_e, _, grads_e = run_layer(layer, x2, gout2)
    assert_close(out_c, out_e, BF16_TOL, "second compiled call")
    for name in grads_e:
        assert_close(grads_c[name], grads_e[name], BF16_TOL, f"second compiled call: {name}")


@pytest.mark.gpu
@requires_cuda
def test_bf16_shared_expert_overlap_bitwise(seed):
    """The shared experts on a side stream give bitwise the result of computing them inline,
    over several iterations with allocations in between (catches early reuse of memory)."""
    kwargs = dict(num_shared_experts=2, shared_ffn_dim=512, shared_expert_gate=True,
                  aux_loss_coeff=0.1, z_loss_coeff=0.01)
    side = make_layer(seed, 512, 256, 8, 2, dtype=torch.bfloat16, device=CUDA,
                      shared_expert_overlap=True, **kwargs)
    inline = make_layer(seed, 512, 256, 8, 2, dtype=torch.bfloat16, device=CUDA,
                        shared_expert_overlap=False, **kwargs)
    from moe_plugin import layer as layer_module
    layer_module._SIDE_STREAMS.clear()
    for it in range(4):
        x, gout = layer_inputs(seed + it, (4, 256, 512), torch.bfloat16, CUDA)
        results = []
        for layer in (inline, side):
            xl = x.clone().requires_grad_()
            params = present_params(layer)
            out, info = layer(xl)
            if it == 0 and layer is inline:
                assert not layer_module._SIDE_STREAMS  # inline made no side stream
            # allocate and scribble on fresh memory between forward and backward
            junk = [torch.full((1 << 20,), float("nan"), device=CUDA) for _ in range(8)]
            junk += [torch.full_like(out, float("nan")) for _ in range(4)]
            grads = torch.autograd.grad(_loss(out, info, gout), [xl, *params.values()])
            del junk
            results.append((out.detach().clone(), dict(zip(["x", *params], grads))))
            del out, info, grads, xl
        (out_i, grads_i), (out_s, grads_s) = results
        assert len(layer_module._SIDE_STREAMS) == 1   # the side layer really used a side stream
        assert_bitwise(out_s, out_i, f"iteration {it}: out")
        assert len(grads_s) == 7
        for name in grads_i:
            assert_bitwise(grads_s[name], grads_i[name], f"iteration {it}: grad {name}")


@pytest.mark.gpu
@requires_cuda
def test_bf16_cuda_graph_matches_eager(seed):
    """The layer's forward + backward (router, aux losses, expert-bias counter, shared experts
    on the side stream) captured in one CUDA graph (``moe_plugin.graphs.GraphedStep``) and
    replayed on new inputs gives the eager results: no host synchronisation, no stale input."""
    from moe_plugin.graphs import GraphedStep
    layer = make_layer(seed, 256, 128, 8, 2, dtype=torch.bfloat16, device=CUDA,
                       shared_expert_overlap=True, **COMPILE_KWARGS)
    eager = copy.deepcopy(layer)

    def run(mod, x, gout):
        xl = x.detach().requires_grad_()
        params = present_params(mod)
        out, info = mod(xl)
        grads = torch.autograd.grad(_loss(out, info, gout), [xl, *params.values()])
        return (out.detach(), info["aux_loss"].detach(), *grads)

    x, gout = layer_inputs(seed, (4, 128, 256), torch.bfloat16, CUDA)
    graphed = GraphedStep(lambda x, gout: run(layer, x, gout), dict(x=x, gout=gout))
    layer.local_tokens_per_expert.zero_()  # the warm-up runs counted tokens
    names = ["out", "aux_loss", "x", *present_params(layer)]
    for it in range(3):
        x, gout = layer_inputs(seed + 11 * it, (4, 128, 256), torch.bfloat16, CUDA)
        got = [t.clone() for t in graphed(x=x, gout=gout)]
        want = run(eager, x, gout)
        assert len(got) == len(want) == len(names)
        for name, g, w in zip(names, got, want):
            assert w.norm() > 0, name
            assert_close(g, w, FP32_TOL, f"iteration {it}: {name}")
    assert torch.equal(layer.local_tokens_per_expert, eager.local_tokens_per_expert)
    with pytest.raises(ValueError, match="gout"):
        graphed(x=x, gout=gout[:, :64])
