"""Every row of the Megatron options table (``moe_plugin.megatron.options.OPTIONS``, rendered in
docs/megatron.md) checked on the installed megatron-core:

* ``rejected``: a value other than the default raises ``UnsupportedConfigError`` naming the
  field, at build time;
* ``no effect``: the layer runs with exactly the options it runs with at the default;
* ``honoured``: one MoE layer built stock and with the plugin (same weights), forward and
  backward on the same input: output, input gradient, every parameter gradient and the logged
  losses agree (fp32, relative error <= 1e-5). Stock's SequentialMLP with biases fails in its
  own backward on both supported versions (it adds the fc2 bias in place into a custom
  Function's output), so with ``add_bias_linear`` stock gives the output and the plugin's
  plain-PyTorch backend the gradients.
"""
import os

import pytest
import torch

pytest.importorskip("megatron.core")

from conftest import FP32_TOL, assert_close  # noqa: E402
from test_megatron import model_parallel_1  # noqa: E402,F401  (the fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _options():
    from moe_plugin.megatron import options
    return options


def _rows():
    return [pytest.param(o, id=o.field) for o in _options().OPTIONS]


def _base(**kw):
    cfg = dict(num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32,
               num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=8,
               gated_linear_unit=True, activation_func=torch.nn.functional.silu,
               add_bias_linear=False, use_cpu_initialization=True, hidden_dropout=0.0,
               attention_dropout=0.0, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001,
               moe_token_dispatcher_type="alltoall")
    cfg.update(kw)
    return cfg


def _config(flag, **kw):
    from moe_plugin.megatron import MoEPluginConfig
    return MoEPluginConfig(moe_use_plugin=flag, **_base(**kw))


def _example(opt):
    if opt.example == "gpt-oss":
        from megatron.core.activations import quick_gelu
        return dict(activation_func=quick_gelu, activation_func_clamp_value=7.0,
                    glu_linear_offset=1.0)
    return dict(opt.example)


def _skip_if_absent(opt):
    from moe_plugin.megatron.compat import VERSION
    if VERSION[:2] < opt.since:
        pytest.skip(f"{opt.field} exists from megatron-core {opt.since} on")


def test_docs_table_is_the_code_table():
    """docs/megatron.md shows exactly ``options_table()``."""
    with open(os.path.join(ROOT, "docs", "megatron.md")) as fh:
        assert _options().options_table() in fh.read()


def _build_layer(cfg):
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module
    from moe_plugin.megatron import gpt_decoder_block_spec
    entry = gpt_decoder_block_spec(cfg, use_transformer_engine=False).layer_specs[0] \
        .submodules.mlp
    layer = build_module(entry, config=cfg) if isinstance(entry, ModuleSpec) \
        else entry(config=cfg)
    layer.set_layer_number(1)
    return layer


def _run_layer(layer, x, grad_out, stock_no_grad=False):
    """Output, input gradient, parameter gradients (by name) and logged losses of one
    forward + backward; the RNG streams (jitter, random logits) re-seeded the same way."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from moe_plugin.megatron import compat
    compat.clear_aux_losses()
    torch.manual_seed(11)
    model_parallel_cuda_manual_seed(11)
    layer.train()
    x = x.clone().requires_grad_(not stock_no_grad)
    with torch.no_grad() if stock_no_grad else torch.enable_grad():
        out, _ = layer(x)
        if not stock_no_grad:
            out.backward(grad_out)
    losses = {k: v.clone() for k, v in compat.reduced_aux_losses().items()}
    compat.clear_aux_losses()
    grads = {n: p.grad for n, p in layer.named_parameters()} if not stock_no_grad else {}
    return out.detach(), x.grad, grads, losses


def _stacked_grad(stock, name):
    """A stacked plugin expert gradient from stock's per-expert linear layers."""
    fc, kind = {"w_up": ("linear_fc1", "weight"), "w_down": ("linear_fc2", "weight"),
                "b_up": ("linear_fc1", "bias"), "b_down": ("linear_fc2", "bias")}[name]
    return torch.stack([getattr(getattr(e, fc), kind).grad
                        for e in stock.experts.local_experts])


def _check_against_stock(fields):
    stock = _build_layer(_config(False, **fields))
    plug = _build_layer(_config(True, **fields))
    if stock.config.add_bias_linear:  # zero at init: make them matter
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for n, p in stock.named_parameters():
                if n.endswith("bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    assert str(plug.load_state_dict(stock.state_dict(), strict=True)) \
        == "<All keys matched successfully>"
    if getattr(stock.router, "expert_bias", None) is not None:
        b = torch.linspace(-0.05, 0.05, stock.config.num_moe_experts)
        stock.router.expert_bias.copy_(b)
        plug.router.expert_bias.copy_(b)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 2, 16, generator=gen)  # [s, b, h]
    grad_out = torch.randn(6, 2, 16, generator=gen)
    biased = stock.config.add_bias_linear
    s_out, s_dx, s_grads, s_losses = _run_layer(stock, x, grad_out, stock_no_grad=biased)
    p_out, p_dx, p_grads, p_losses = _run_layer(plug, x, grad_out)
    assert_close(p_out, s_out, FP32_TOL, "output")
    if biased:  # gradients and losses against the plugin's plain-PyTorch backend
        ref = _build_layer(_config(True, **fields))
        ref.load_state_dict(plug.state_dict(), strict=True)
        ref.opts.backend = "torch"
        r_out, s_dx, s_grads, s_losses = _run_layer(ref, x, grad_out)
        assert_close(r_out, s_out, FP32_TOL, "output of the torch backend")
    assert sorted(p_losses) == sorted(s_losses)
    for name in s_losses:
        assert_close(p_losses[name], s_losses[name], FP32_TOL, name)
    assert_close(p_dx, s_dx, FP32_TOL, "input gradient")
    for name, g in p_grads.items():
        short = name.rsplit(".", 1)[-1]
        if biased:
            ref_g = s_grads[name]
        elif name.startswith("experts.") and short in ("w_up", "w_down", "b_up", "b_down"):
            ref_g = _stacked_grad(stock, short)
        else:
            ref_g = s_grads[name]
        assert_close(g, ref_g, FP32_TOL, name)
    return stock, plug


# rows checked without a run against stock (stock cannot run them here, or they act outside
# the layer): what the row claims, checked directly
def _honoured_elsewhere(field):
    from moe_plugin.megatron.compat import module_of
    from moe_plugin.megatron import PluginMoELayer, gpt_decoder_block_spec
    opts = _options()
    if field == "moe_shared_expert_overlap":
        assert opts.plugin_options(_config(True, moe_shared_expert_intermediate_size=16,
                                           moe_shared_expert_overlap=True)) \
            .shared_expert_overlap is True
    elif field == "moe_shared_expert_glu_interleave_size":
        cfg = _config(True, moe_shared_expert_intermediate_size=16)
        cfg.moe_shared_expert_glu_interleave_size = 8
        layer = _build_layer(cfg)
        assert type(layer.shared_experts).__module__.startswith("megatron.core")
    elif field == "moe_layer_freq":
        spec = gpt_decoder_block_spec(_config(True, num_layers=2, moe_layer_freq=[0, 1]),
                                      use_transformer_engine=False)
        assert [module_of(s.submodules.mlp) is PluginMoELayer for s in spec.layer_specs] \
            == [False, True]
    elif field == "moe_grad_scale_func":
        cfg = _config(True)
        cfg.moe_grad_scale_func = lambda: 1.0
        assert opts.plugin_options(cfg) == opts.plugin_options(_config(True))
    elif field == "expert_model_parallel_size":
        from test_megatron import test_plugin_matches_stock_megatron_cpu  # noqa: F401
        assert opts.plugin_options(_config(True, expert_model_parallel_size=2)).num_experts \
            == 4
    else:
        raise AssertionError(f"{field}: honoured without an example and without a check")


@pytest.mark.parametrize("opt", _rows())
def test_option_row(opt, model_parallel_1):  # noqa: F811
    _skip_if_absent(opt)
    options = _options()
    if opt.status == "rejected":
        cfg = _config(True)
        setattr(cfg, opt.field, opt.example)
        with pytest.raises(options.UnsupportedConfigError, match=opt.field):
            options.plugin_options(cfg)
    elif opt.status == "no effect":
        cfg = _config(True)
        setattr(cfg, opt.field, opt.example)
        assert options.plugin_options(cfg) == options.plugin_options(_config(True))
    else:
        assert opt.status == "honoured", opt
        if opt.example is None:
            _honoured_elsewhere(opt.field)
        else:
            _check_against_stock(_example(opt))


def test_coefficient_changed_after_construction(model_parallel_1):  # noqa: F811
    """Megatron's own aux-loss test changes ``moe_aux_loss_coeff`` on the config after the
    layer was built; stock reads it at every forward, so must the plugin layer."""
    stock = _build_layer(_config(False, moe_aux_loss_coeff=0.0))
    plug = _build_layer(_config(True, moe_aux_loss_coeff=0.0))
    plug.load_state_dict(stock.state_dict(), strict=True)
    for layer in (stock, plug):
        layer.config.moe_aux_loss_coeff = 0.5
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(6, 2, 16, generator=gen)
    zero = torch.zeros(6, 2, 16)  # only the aux loss drives the router's gradient
    _, _, s_grads, s_losses = _run_layer(stock, x, zero)
    _, _, p_grads, p_losses = _run_layer(plug, x, zero)
    assert p_grads["router.weight"].abs().max() > 0
    assert_close(p_grads["router.weight"], s_grads["router.weight"], FP32_TOL, "router grad")
    assert_close(p_losses["load_balancing_loss"], s_losses["load_balancing_loss"], FP32_TOL,
                 "logged aux loss")


def test_router_is_megatrons(model_parallel_1):  # noqa: F811
    """``layer.router`` is Megatron's TopKRouter: its own forward gives stock's
    ``(probs, routing_map)``."""
    from megatron.core.transformer.moe.router import TopKRouter
    stock = _build_layer(_config(False))
    plug = _build_layer(_config(True))
    plug.load_state_dict(stock.state_dict(), strict=True)
    assert isinstance(plug.router, TopKRouter)
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ps, ms = stock.router(x)
        pp, mp = plug.router(x)
    assert torch.equal(ms, mp) and torch.equal(ps, pp)
