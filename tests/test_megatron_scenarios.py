"""Megatron-Core's own MoE unit-test scenarios, run on stock ``MoELayer`` and on
``PluginMoELayer`` side by side (CPU, a single-process gloo group, fp32).

The scenarios follow those of Megatron-LM's ``tests/unit_tests/transformer/moe/`` (tag
core_v0.19.0: test_moe_layer, test_routers, test_aux_loss, test_shared_experts,
test_sequential_mlp, the padding-mask tests), adapted to CPU: where Megatron's tests only
check that a layer runs, shapes, or that a gradient is non-zero, these build a stock layer
from Megatron's local layer spec (``SequentialMLP`` experts), load its state dict strictly
into a plugin layer built from the same submodules and the *same config object*, run both on
the same input, and require the plugin to match stock:

* the forward output, the gradient of the input and of every parameter (compared in stock's
  per-expert layout: the plugin's gradients go through its own ``state_dict`` hook);
* the aux / seq-aux / z losses Megatron's metrics tracker logs (``compat.reduced_aux_losses``);
* ``router.local_tokens_per_expert`` and the ``router.expert_bias`` update of
  ``finalize_model_grads``;

each within a relative L2 error of 1e-5 (the project's fp32 tolerance), bitwise where the
computation is stock's own code (the router module, the bias update).

Megatron-Core's own default MLP (exact-erf ``gelu``, not gated, ``add_bias_linear=True``)
is among the scenarios. Two stock defects are worked around, each where it is hit: stock's
biased experts cannot run backward at TP=1 (``_stock_expert_bias_backward_fix``), and stock's
router cannot count expert-bias loads under a padding mask (that test takes its reference
from stock without the mask). Stock's shared-expert overlap needs CUDA streams: not run here.
"""
import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("megatron.core")

from conftest import FP32_TOL, free_port, rel_err  # noqa: E402

S, B, D = 8, 2, 16  # sequence, micro-batch, hidden size: 16 tokens per run


# ---------------------------------------------------------------------------------------------
# set-up


@pytest.fixture(scope="module")
def _gloo():
    import torch.distributed as dist
    from moe_plugin import patches
    patches.apply()
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1)
    yield
    if own:
        dist.destroy_process_group()


def reset_loss_tracker():
    """Drops every entry of Megatron's MoE loss tracker (its ``clear`` only zeroes them): each
    run then shows just what it logged, and no entry sized for this file's one-layer configs
    outlives it."""
    from moe_plugin.megatron import compat
    if compat.get_moe_metrics_tracker is not None:  # 0.17+
        compat.get_moe_metrics_tracker().metrics.clear()
    else:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
        get_moe_layer_wise_logging_tracker().clear()


@pytest.fixture
def mp(_gloo):
    """Megatron's model-parallel state at size 1, seeded RNG tracker, empty loss tracker."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(123)
    reset_loss_tracker()
    yield
    reset_loss_tracker()
    parallel_state.destroy_model_parallel()


def version():
    from moe_plugin.megatron import compat
    return compat.VERSION


def make_config(**overrides):
    """A one-layer MoE TransformerConfig: 4 experts, top-2, hidden 16, expert FFN 8, swiglu,
    no biases, no losses -- what each scenario then overrides."""
    from megatron.core.transformer.transformer_config import TransformerConfig
    kw = dict(num_layers=1, hidden_size=D, num_attention_heads=4, num_moe_experts=4,
              moe_router_topk=2, moe_ffn_hidden_size=8, use_cpu_initialization=True,
              gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
              init_method_std=0.2, moe_aux_loss_coeff=0.0)
    kw.update(overrides)
    return TransformerConfig(**kw)


def megatron_default_config(**overrides):
    """Megatron-Core's own defaults for the MLP: exact-erf gelu, not gated, with biases."""
    from megatron.core.transformer.transformer_config import TransformerConfig
    kw = dict(num_layers=1, hidden_size=D, num_attention_heads=4, num_moe_experts=4,
              moe_router_topk=2, moe_ffn_hidden_size=8, use_cpu_initialization=True,
              init_method_std=0.2)
    kw.update(overrides)
    cfg = TransformerConfig(**kw)
    assert cfg.add_bias_linear
    if "activation_func" not in overrides:
        assert cfg.activation_func is F.gelu and not cfg.gated_linear_unit
    return cfg


def build_pair(cfg, layer_number=1, set_layer_number=True, expert_bias=None):
    """Stock ``MoELayer`` and ``PluginMoELayer`` from Megatron's local layer spec and one
    config object; the plugin loads stock's state dict (strict). Biases (router, experts,
    shared experts) are drawn non-zero first, so they matter."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from moe_plugin.megatron import PluginMoELayer, compat
    spec = get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts, moe_grouped_gemm=False)
    sub = compat.moe_submodules_of(spec.submodules.mlp)
    assert sub is not None
    torch.manual_seed(1234)
    stock = MoELayer(cfg, sub, layer_number=layer_number)
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, p in stock.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    plugin = PluginMoELayer(cfg, sub, layer_number=layer_number)
    assert str(plugin.load_state_dict(stock.state_dict(), strict=True)) \
        == "<All keys matched successfully>"
    if set_layer_number:  # what TransformerLayer does
        stock.set_layer_number(layer_number)
        plugin.set_layer_number(layer_number)
    if expert_bias is not None:
        for m in (stock, plugin):
            m.router.expert_bias.copy_(expert_bias)
    return stock, plugin


def inputs(seed=0, s=S, b=B):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(s, b, D, generator=g), torch.randn(s, b, D, generator=g)


@dataclasses.dataclass
class Run:
    out: torch.Tensor
    dx: torch.Tensor
    grads: dict     # stock parameter name -> gradient (stock's per-expert layout)
    losses: dict    # tracker name -> logged values [num_layers]
    tokens: object  # router.local_tokens_per_expert after the run (None without expert bias)


def grads_in_stock_layout(layer):
    """``{stock parameter name: gradient}``: the parameters' data swapped for their gradients
    while ``state_dict()`` runs, so the plugin's stacked experts come out per expert, under
    stock's names (a missing gradient reads as zeros)."""
    params = list(layer.named_parameters())
    saved = [p.data for _, p in params]
    try:
        for _, p in params:
            p.data = p.grad if p.grad is not None else torch.zeros_like(p)
        state = layer.state_dict()
    finally:
        for (_, p), d in zip(params, saved):
            p.data = d
    return {k: v.clone() for k, v in state.items()
            if isinstance(v, torch.Tensor) and not k.endswith(("_extra_state", "expert_bias"))}


@contextlib.contextmanager
def _stock_expert_bias_backward_fix(layer):
    """Stock's SequentialMLP with biases cannot run backward at tensor-parallel size 1 (both
    versions; megatron/core/transformer/mlp.py adds the expert's fc2 bias in place to
    RowParallelLinear's output, which ``_ReduceFromModelParallelRegion`` returns as a view of
    its input: autograd forbids the in-place add). For stock layers with biases, the size-1
    reduction returns a copy instead (the same values, the same gradient)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import layers
    if not layer.config.add_bias_linear or isinstance(layer, _plugin_cls()):
        yield
        return
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    orig = layers.reduce_from_tensor_model_parallel_region
    layers.reduce_from_tensor_model_parallel_region = lambda input_, group=None: input_.clone()
    try:
        yield
    finally:
        layers.reduce_from_tensor_model_parallel_region = orig


def _plugin_cls():
    from moe_plugin.megatron import PluginMoELayer
    return PluginMoELayer


def run(layer, x, gout, padding_mask=None, seed=7, grad_enabled=True):
    """One training forward and backward of ``(out * gout).sum()``; the RNG streams (jitter,
    random logits) seeded the same way for every layer."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from moe_plugin.megatron import compat
    reset_loss_tracker()
    layer.train()
    layer.zero_grad(set_to_none=True)
    tokens = getattr(layer.router, "local_tokens_per_expert", None)
    if tokens is not None:
        tokens.zero_()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    xi = x.clone().requires_grad_(grad_enabled)
    kw = {} if padding_mask is None else {"padding_mask": padding_mask}
    with torch.set_grad_enabled(grad_enabled), _stock_expert_bias_backward_fix(layer):
        out, bias = layer(xi, **kw)
        assert bias is None
        if grad_enabled:
            (out * gout).sum().backward()
    losses = {k: v.detach().clone() for k, v in compat.reduced_aux_losses().items()}
    reset_loss_tracker()
    return Run(out.detach(), xi.grad, grads_in_stock_layout(layer), losses,
               None if tokens is None else tokens.clone())


def assert_matches(got: Run, ref: Run, tol=FP32_TOL):
    """The plugin's run against stock's: output, input gradient, every parameter gradient,
    logged losses, expert-bias token counts."""
    errs = {"out": rel_err(got.out, ref.out)}
    if ref.dx is not None:
        errs["d_input"] = rel_err(got.dx, ref.dx)
    assert set(got.grads) == set(ref.grads), (sorted(got.grads), sorted(ref.grads))
    for k in ref.grads:
        errs[k] = rel_err(got.grads[k], ref.grads[k])
    bad = {k: f"{v:.3e}" for k, v in errs.items() if v > tol}
    assert not bad, f"relative errors above {tol:.0e}: {bad}"
    assert set(got.losses) == set(ref.losses), \
        f"logged losses: plugin {got.losses} vs stock {ref.losses}"
    for k, v in ref.losses.items():
        assert rel_err(got.losses[k], v) <= tol, f"{k}: plugin {got.losses[k]} vs stock {v}"
    if ref.tokens is not None:
        assert torch.equal(got.tokens, ref.tokens), \
            f"local_tokens_per_expert: plugin {got.tokens} vs stock {ref.tokens}"


def compare(cfg, x=None, gout=None, padding_mask=None, **pair_kw):
    """Builds both layers from ``cfg``, runs them, asserts the plugin matches stock; returns
    the two layers and runs."""
    if x is None:
        x, gout = inputs()
    stock, plugin = build_pair(cfg, **pair_kw)
    ref = run(stock, x, gout, padding_mask)
    got = run(plugin, x, gout, padding_mask)
    assert_matches(got, ref)
    return stock, plugin, ref, got


def nonzero(t, what):
    assert t is not None and t.abs().sum() > 0, f"{what} is zero: the scenario tests nothing"


# ---------------------------------------------------------------------------------------------
# test_moe_layer: the layer with legacy settings and with Megatron's default MLP


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_legacy_moe_layer(mp, dispatcher):
    """Megatron's legacy MoE layer test config: 4 experts, top-2, aux loss 0.01, no biases,
    the config's default activation (exact-erf gelu, not gated), both token dispatchers."""
    cfg = make_config(activation_func=F.gelu, gated_linear_unit=False,
                      moe_token_dispatcher_type=dispatcher,
                      moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01)
    _, _, ref, _ = compare(cfg)
    nonzero(ref.losses.get("load_balancing_loss"), "load_balancing_loss")


@pytest.mark.parametrize("case", ["gelu_bias", "swiglu_bias", "gelu_bias_sigmoid_capacity"])
def test_megatron_default_mlp(mp, case):
    """Megatron-Core's default MLP: exact gelu, not gated, ``add_bias_linear=True`` (expert
    fc1/fc2 biases and a router bias), with aux and z losses; biases with swiglu; and the
    default MLP with sigmoid scores, an expert bias and capacity dropping (a dropped slot adds
    no fc2 bias). (Stock refuses biases in shared experts.)"""
    if case == "swiglu_bias":
        cfg = megatron_default_config(activation_func=F.silu, gated_linear_unit=True)
    elif case == "gelu_bias":
        cfg = megatron_default_config(moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001)
    else:
        cfg = megatron_default_config(num_moe_experts=8, moe_router_score_function="sigmoid",
                                      moe_router_enable_expert_bias=True,
                                      moe_expert_capacity_factor=1.0,
                                      moe_token_drop_policy="probs", moe_aux_loss_coeff=0.01)
    _, plugin, ref, _ = compare(cfg, expert_bias=torch.linspace(-0.1, 0.1, 8)
                                if cfg.moe_router_enable_expert_bias else None)
    bias_grads = [k for k in ref.grads if k.endswith("bias")]
    assert "router.bias" in bias_grads and any("local_experts" in k for k in bias_grads)
    nonzero(ref.grads["router.bias"], "router.bias grad")
    for fc in ("linear_fc1", "linear_fc2"):  # (an expert may get no token)
        nonzero(torch.cat([ref.grads[k] for k in bias_grads if fc in k]), f"{fc}.bias grads")
    if cfg.moe_expert_capacity_factor:
        assert (plugin.last_info["topk_ids"] < 0).any()  # slots were dropped


# ---------------------------------------------------------------------------------------------
# test_routers: score functions, pre-softmax, groups, scaling, expert bias, capacity


@pytest.mark.parametrize("score,pre,scale,extra", [
    ("softmax", False, None, {}),
    ("softmax", True, None, {}),
    ("softmax", True, 2.5, {"moe_router_dtype": "fp32"}),
    ("sigmoid", False, None, {}),
    ("sigmoid", False, 2.5, {"moe_input_jitter_eps": 0.1}),
    ("sigmoid", True, None, {}),
])
def test_topk_router(mp, score, pre, scale, extra):
    """Top-2 of 8 experts with softmax / sigmoid scores, pre-softmax, a top-k scaling
    factor; aux and z losses on; the router in fp32; input jitter (seeded alike)."""
    cfg = make_config(num_moe_experts=8, moe_router_score_function=score,
                      moe_router_pre_softmax=pre, moe_router_topk_scaling_factor=scale,
                      moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01,
                      moe_z_loss_coeff=0.001, **extra)
    _, _, ref, _ = compare(cfg)
    nonzero(ref.grads["router.weight"], "router.weight grad")
    assert set(ref.losses) == {"load_balancing_loss", "z_loss"}


@pytest.mark.parametrize("group_topk,num_groups", [(3, 8), (2, 4)])
@pytest.mark.parametrize("score", ["softmax_pre", "sigmoid"])
def test_group_limited_router(mp, group_topk, num_groups, score):
    """Group-limited top-4 of 16 experts (Megatron's TestGroupLimitedRouter), with its
    scaling factor 16 where pre-softmax."""
    pre = score.endswith("_pre")
    cfg = make_config(num_moe_experts=16, moe_router_topk=4, moe_router_num_groups=num_groups,
                      moe_router_group_topk=group_topk, moe_router_pre_softmax=pre,
                      moe_router_score_function=score.split("_")[0],
                      moe_router_topk_scaling_factor=16.0 if pre else None,
                      moe_router_dtype="fp32")
    _, plugin, _, _ = compare(cfg)
    ids = plugin.last_info["topk_ids"].long()  # the groups the plugin picked
    groups = torch.zeros(ids.shape[0], num_groups, dtype=torch.bool)
    groups.scatter_(1, ids // (16 // num_groups), True)
    assert (groups.sum(1) <= group_topk).all()


def test_group_limited_softmax_on_logits_is_refused(mp):
    """Softmax scores without pre-softmax select groups on the logits in stock (the plugin
    selects on scores): the plugin refuses it at construction, naming the field."""
    from moe_plugin.megatron import UnsupportedConfigError
    cfg = make_config(num_moe_experts=16, moe_router_topk=4, moe_router_num_groups=8,
                      moe_router_group_topk=2, moe_router_score_function="softmax")
    with pytest.raises(UnsupportedConfigError, match="moe_router_num_groups"):
        build_pair(cfg)


def test_aux_loss_free_expert_bias(mp):
    """Megatron's TestAuxLossFreeTop2Router: 8 experts, sigmoid, expert bias, no aux loss,
    bias update rate 0.1; a non-zero bias steers the selection. Token counts and the bias
    after ``finalize_model_grads``' update equal stock's exactly."""
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias
    cfg = make_config(num_moe_experts=8, moe_router_score_function="sigmoid",
                      moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.1,
                      moe_router_load_balancing_type="none")
    bias = torch.linspace(-0.1, 0.1, 8)
    stock, plugin, ref, got = compare(cfg, expert_bias=bias)
    assert ref.tokens.sum() == S * B * 2 and (ref.tokens > 0).sum() >= 6  # spread out
    for m in (stock, plugin):
        _update_router_expert_bias([m], cfg)
    assert not torch.equal(stock.router.expert_bias, bias)
    assert torch.equal(plugin.router.expert_bias, stock.router.expert_bias), \
        (plugin.router.expert_bias, stock.router.expert_bias)


@pytest.mark.parametrize("capacity", [1.0, 2.0])
@pytest.mark.parametrize("policy", ["probs", "position"])
def test_token_dropping(mp, capacity, policy):
    """Capacity factor 1.0 / 2.0 with both drop policies (no padding to capacity).
    "probs": the plugin drops the same slots as stock's router (outputs and gradients
    equal). "position": stock keeps ``torch.topk(routing_map.int(), capacity, dim=0,
    sorted=False)`` of a 0/1 column -- which of the tied slots it keeps is torch's choice,
    not defined -- the plugin each expert's first slots in token order (docs/megatron.md, a
    known difference): both keep the same number of slots per expert, and the plugin keeps
    exactly the first ones of the undropped routing."""
    cfg = make_config(moe_expert_capacity_factor=capacity, moe_token_drop_policy=policy)
    x, gout = inputs(3, s=16)
    if policy == "probs":
        stock, plugin, _, _ = compare(cfg, x, gout)
    else:
        stock, plugin = build_pair(cfg)
        run(plugin, x, gout)
    ids = plugin.last_info["topk_ids"].long()
    kept = int((ids >= 0).sum())
    with torch.no_grad():
        _, routing_map = stock.router(x)
    assert kept == int(routing_map.sum()) <= 16 * B * 2 * capacity
    assert torch.equal(torch.bincount(ids[ids >= 0], minlength=routing_map.shape[1]),
                       routing_map.sum(0).long())
    if capacity == 1.0:
        assert kept < 16 * B * 2  # the scenario does drop
    if policy == "position":  # the first slots of each expert, in token order
        full = make_config(moe_expert_capacity_factor=None)
        _, undropped = build_pair(full)
        undropped.load_state_dict(plugin.state_dict())
        run(undropped, x, gout)
        routed = undropped.last_info["topk_ids"].long().reshape(-1)
        from moe_plugin.config import expert_capacity  # Megatron's get_capacity
        cap = expert_capacity(routing_map.shape[0], 2, routing_map.shape[1], capacity)
        want = routed.clone()
        for e in range(routing_map.shape[1]):
            slots = (routed == e).nonzero().flatten()
            want[slots[cap:]] = -1
        assert torch.equal(ids.reshape(-1), want)


def test_pad_to_capacity_is_refused(mp):
    from moe_plugin.megatron import UnsupportedConfigError
    cfg = make_config(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True)
    with pytest.raises(UnsupportedConfigError, match="moe_pad_expert_input_to_capacity"):
        build_pair(cfg)


@pytest.mark.parametrize("score", ["softmax", "sigmoid_bias_groups"])
def test_router_is_megatrons_topk_router(mp, score):
    """``layer.router`` is Megatron's ``TopKRouter``: its own forward returns stock's
    ``(probs, routing_map)`` (bitwise), and the plugin layer's fused routing picks the same
    experts with the same weights."""
    from megatron.core.transformer.moe.router import TopKRouter
    kw = {} if score == "softmax" else dict(
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_num_groups=2, moe_router_group_topk=1, moe_router_topk_scaling_factor=2.0)
    cfg = make_config(num_moe_experts=8, **kw)
    bias = torch.linspace(0.1, -0.1, 8) if kw else None
    stock, plugin = build_pair(cfg, expert_bias=bias)
    assert isinstance(plugin.router, TopKRouter)
    x, _ = inputs(5)
    with torch.no_grad():
        p_ref, map_ref = stock.router(x)
        p_got, map_got = plugin.router(x)
        plugin(x)
    assert torch.equal(p_got, p_ref) and torch.equal(map_got, map_ref)
    ids = plugin.last_info["topk_ids"].long()
    weights = plugin.last_info["topk_weights"]
    plugin_map = torch.zeros_like(map_ref).scatter_(1, ids, True)
    assert torch.equal(plugin_map, map_ref)
    assert rel_err(weights, p_ref.gather(1, ids)) <= FP32_TOL


# ---------------------------------------------------------------------------------------------
# test_aux_loss: loss values and their gradients


@pytest.mark.parametrize("lb_type,name", [("aux_loss", "load_balancing_loss"),
                                          ("seq_aux_loss", "seq_load_balancing_loss")])
def test_aux_loss_value_and_gradient(mp, lb_type, name):
    """8 experts, top-2, coefficient 0.1; the output's own gradient is zero, so every
    gradient is the aux loss's. Nothing is logged under no_grad."""
    cfg = make_config(num_moe_experts=8, moe_router_load_balancing_type=lb_type,
                      moe_aux_loss_coeff=0.1)
    x, _ = inputs(1, s=16)
    zero = torch.zeros_like(x)
    stock, plugin, ref, got = compare(cfg, x, zero)
    nonzero(ref.losses[name], name)
    nonzero(ref.dx, "aux-loss gradient of the input")
    nonzero(ref.grads["router.weight"], "aux-loss gradient of router.weight")
    for m in (stock, plugin):
        r = run(m, x, zero, grad_enabled=False)
        assert all(v.abs().sum() == 0 for v in r.losses.values()), r.losses


def test_seq_aux_loss_with_one_sequence_equals_aux_loss(mp):
    """With micro-batch 1 the sequence-level aux loss is the batch-level one (value and
    gradients), in the plugin as in stock."""
    x, _ = inputs(2, s=16, b=1)
    zero = torch.zeros_like(x)
    runs = {}
    for lb in ("aux_loss", "seq_aux_loss"):
        cfg = make_config(num_moe_experts=8, moe_router_load_balancing_type=lb,
                          moe_aux_loss_coeff=1.0)
        _, _, _, got = compare(cfg, x, zero)
        runs[lb] = got
    a, s = runs["aux_loss"], runs["seq_aux_loss"]
    assert rel_err(s.losses["seq_load_balancing_loss"], a.losses["load_balancing_loss"]) \
        <= FP32_TOL
    assert rel_err(s.dx, a.dx) <= FP32_TOL
    assert rel_err(s.grads["router.weight"], a.grads["router.weight"]) <= FP32_TOL


def test_loss_coefficients_changed_after_construction(mp):
    """Megatron's router aux-loss test: built with coefficient 0 (no aux-loss gradient),
    then ``config.moe_aux_loss_coeff = 1``, then back to 0 with ``moe_z_loss_coeff = 1``;
    each time the plugin follows the config as stock does."""
    cfg = make_config(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.0)
    stock, plugin = build_pair(cfg)
    x, _ = inputs(4)
    zero = torch.zeros_like(x)
    for aux, z, expect in ((0.0, None, set()), (1.0, None, {"load_balancing_loss"}),
                           (0.0, 1.0, {"z_loss"}), (0.5, 0.25, {"load_balancing_loss",
                                                                "z_loss"})):
        cfg.moe_aux_loss_coeff = aux
        cfg.moe_z_loss_coeff = z
        ref, got = run(stock, x, zero), run(plugin, x, zero)
        logged = {k for k, v in ref.losses.items() if v.abs().sum() > 0}
        assert logged == expect, (aux, z, ref.losses)
        if expect:
            nonzero(ref.grads["router.weight"], f"router grad at aux={aux} z={z}")
        else:
            assert ref.grads["router.weight"].abs().sum() == 0
        assert_matches(got, ref)


def test_uniform_router_aux_loss_is_one(mp):
    """Uniform router weights give uniform scores: every aux-loss type logs exactly 1 in
    stock; the plugin logs the same."""
    for lb, name in (("aux_loss", "load_balancing_loss"),
                     ("seq_aux_loss", "seq_load_balancing_loss")):
        cfg = make_config(num_moe_experts=8, moe_router_load_balancing_type=lb,
                          moe_aux_loss_coeff=1.0, moe_router_dtype="fp32")
        stock, plugin = build_pair(cfg)
        for m in (stock, plugin):
            with torch.no_grad():
                m.router.weight.fill_(1.0 / m.router.weight.numel())
        x, gout = inputs(6)
        ref, got = run(stock, x, gout), run(plugin, x, gout)
        assert ref.losses[name].item() == 1.0
        assert rel_err(got.losses[name], ref.losses[name]) <= FP32_TOL, \
            (got.losses[name], ref.losses[name])


# ---------------------------------------------------------------------------------------------
# padding mask


def _padding_mask():
    """[b, s], True = padding: the last 3 tokens of sequence 0, the last 5 of sequence 1."""
    m = torch.zeros(B, S, dtype=torch.bool)
    m[0, -3:] = True
    m[1, -5:] = True
    return m


@pytest.mark.parametrize("case", ["aux_loss", "seq_aux_loss", "z_loss"])
def test_padding_mask(mp, case):
    """``forward(hidden, padding_mask=[b, s])``: padded tokens stay out of the losses (they
    are still computed), as in stock; the losses do change with the mask."""
    kw = dict(num_moe_experts=8)
    if case == "z_loss":
        kw.update(moe_z_loss_coeff=0.1)
    else:
        kw.update(moe_router_load_balancing_type=case, moe_aux_loss_coeff=0.1)
    cfg = make_config(**kw)
    x, gout = inputs(8)
    stock, _, ref, _ = compare(cfg, x, gout, padding_mask=_padding_mask())
    unmasked = run(stock, x, gout)
    name = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
            "z_loss": "z_loss"}[case]
    nonzero(ref.losses[name], name)
    assert not torch.equal(ref.losses[name], unmasked.losses[name])


def test_padding_mask_expert_bias_loads(mp):
    """The expert-bias loads count the valid tokens only. Stock cannot be the reference
    here: its router masks the [tokens, experts] routing map with the flattened [tokens]
    padding mask (``routing_map & ~padding_mask``, router.py ``_apply_expert_bias``, both
    versions), which fails to broadcast unless tokens == experts (and then masks experts).
    Without losses the mask changes nothing else, so the reference is stock without the mask
    (output, gradients) and stock's routing map restricted to the valid tokens (loads)."""
    cfg = make_config(num_moe_experts=8, moe_router_score_function="sigmoid",
                      moe_router_enable_expert_bias=True, moe_router_load_balancing_type="none")
    stock, plugin = build_pair(cfg, expert_bias=torch.linspace(-0.1, 0.1, 8))
    x, gout = inputs(8)
    mask = _padding_mask()
    ref = run(stock, x, gout)
    got = run(plugin, x, gout, padding_mask=mask)
    with torch.no_grad():
        _, routing_map = stock.router(x)  # [s * b, E], tokens in [s, b] order
    valid = ~mask.transpose(0, 1).reshape(-1)
    ref.tokens = routing_map[valid].sum(0).float()
    assert ref.tokens.sum() == int(valid.sum()) * 2 < S * B * 2
    assert_matches(got, ref)


@pytest.mark.parametrize("lb_type,name", [("aux_loss", "load_balancing_loss"),
                                          ("seq_aux_loss", "seq_load_balancing_loss"),
                                          ("none", "z_loss")])
def test_padding_mask_equals_dropping_the_padding(mp, lb_type, name):
    """Megatron's padding-mask loss test: the second half of every sequence padded gives the
    loss (and its gradient of the router weight) of the first half alone."""
    cfg = make_config(num_moe_experts=8, moe_router_load_balancing_type=lb_type,
                      moe_aux_loss_coeff=1.0 if lb_type != "none" else 0.0,
                      moe_z_loss_coeff=1.0 if lb_type == "none" else None)
    stock, plugin = build_pair(cfg)
    x, _ = inputs(9, s=16)
    mask = torch.zeros(B, 16, dtype=torch.bool)
    mask[:, 8:] = True
    for m in (stock, plugin):
        padded = run(m, x, torch.zeros_like(x), padding_mask=mask)
        half = run(m, x[:8], torch.zeros_like(x[:8]))
        assert rel_err(padded.losses[name], half.losses[name]) <= FP32_TOL, \
            (type(m).__name__, padded.losses[name], half.losses[name])
        assert rel_err(padded.grads["router.weight"], half.grads["router.weight"]) <= FP32_TOL


# ---------------------------------------------------------------------------------------------
# recompute


@pytest.mark.parametrize("modules,shared,padded", [
    (["moe"], False, False),
    (["moe"], False, True),
    (["shared_experts"], True, False),
    (["moe", "shared_experts"], True, True),
    (["moe_act"], False, False),
    (["moe"], "expert_bias", False),
])
def test_recompute(mp, modules, shared, padded):
    """``recompute_granularity="selective"`` with ``recompute_modules`` ["moe"] (also with a
    padding mask, as Megatron's recompute test), ["shared_experts"], both, and ["moe_act"]
    (stock accepts it only with ``moe_grouped_gemm=True``; its SequentialMLP then computes as
    without recompute, the plugin recomputes GEMM1 + activation): aux loss on; and ["moe"]
    with an expert bias (its loads counted once: stock counts them in the recomputation)."""
    kw = dict(recompute_granularity="selective", recompute_modules=modules,
              moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01)
    if shared == "expert_bias":
        kw.update(num_moe_experts=8, moe_router_score_function="sigmoid",
                  moe_router_enable_expert_bias=True)
    elif shared:
        kw.update(moe_shared_expert_intermediate_size=16, moe_shared_expert_gate=True)
    if "moe_act" in modules:
        kw.update(moe_grouped_gemm=True)
    cfg = make_config(**kw)
    stock, plugin, ref, _ = compare(cfg, padding_mask=_padding_mask() if padded else None,
                                    expert_bias=torch.linspace(-0.1, 0.1, 8)
                                    if shared == "expert_bias" else None)
    if shared == "expert_bias":  # counted once per forward (stock: in the recompute only)
        assert ref.tokens.sum() == S * B * 2
    opts = plugin.opts
    assert opts.recompute_layer == ("moe" in modules)
    assert opts.recompute_shared == ("shared_experts" in modules)
    assert opts.recompute == ("moe_act" in modules)
    if "moe" in modules:
        assert stock.moe_layer_recompute
    if "shared_experts" in modules:
        assert stock.shared_experts_recompute


# ---------------------------------------------------------------------------------------------
# shared experts, force load balancing, sequential MLP


@pytest.mark.parametrize("gate", [False, True])
def test_shared_experts(mp, gate):
    """Megatron's shared-expert test: 2 routed experts, top-1, a shared expert of FFN 32,
    with and without the shared-expert gate. (Its overlap variant needs CUDA streams in
    stock.)"""
    cfg = make_config(num_moe_experts=2, moe_router_topk=1, moe_router_pre_softmax=True,
                      moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=gate,
                      moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01)
    stock, plugin, ref, _ = compare(cfg)
    assert type(plugin.shared_experts) is type(stock.shared_experts)
    shared = [k for k in ref.grads if k.startswith("shared_experts.")]
    assert any("gate" in k for k in shared) == gate
    for k in shared:
        nonzero(ref.grads[k], k)


def test_force_load_balancing(mp):
    """``moe_router_force_load_balancing``: stock's random logits (straight-through), drawn
    from the same seeded RNG tracker stream for both layers; the routing differs from the
    unforced one."""
    cfg = make_config(num_moe_experts=8, moe_router_force_load_balancing=True,
                      moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01)
    stock, plugin, ref, got = compare(cfg)
    forced = plugin.last_info["topk_ids"].clone()
    cfg.moe_router_force_load_balancing = False
    run(plugin, *inputs())
    assert not torch.equal(plugin.last_info["topk_ids"], forced)
    nonzero(ref.grads["router.weight"], "router.weight grad")


@pytest.mark.skipif("version() < (0, 17)", reason="moe_router_force_biased: megatron-core 0.17+")
@pytest.mark.parametrize("std", [0.5, -0.5])
def test_force_biased(mp, std):
    """0.19's ``moe_router_force_biased``: a shared random logit bias (new each forward for
    a positive std, cached per layer for a negative one), seeded alike."""
    cfg = make_config(num_moe_experts=8, moe_router_force_biased=std,
                      moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01)
    compare(cfg)


def test_sequential_mlp_gated_single_expert_topk1(mp):
    """test_sequential_mlp's config: gated silu experts, top-1; here a single expert (FFN
    32) that every token goes to."""
    cfg = make_config(num_moe_experts=1, moe_router_topk=1, moe_router_pre_softmax=True,
                      moe_ffn_hidden_size=32)
    compare(cfg)


def test_apply_probs_on_input_top1(mp):
    """``moe_apply_probs_on_input`` (top-1): the routing weight scales the expert's input."""
    cfg = make_config(moe_router_topk=1, moe_router_pre_softmax=True,
                      moe_apply_probs_on_input=True)
    compare(cfg)


def test_losses_logged_without_set_layer_number(mp):
    """A layer built with ``layer_number`` but never given ``set_layer_number`` (as
    Megatron's unit tests build layers, without a TransformerLayer around them): stock's
    router only learns its number from ``set_layer_number``, so stock logs no loss; the
    plugin must log the same."""
    cfg = make_config(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.1,
                      moe_z_loss_coeff=0.01)
    compare(cfg, layer_number=1, set_layer_number=False)
