"""Megatron-Core integration: moe_plugin's MoE layer against stock Megatron-Core's.

The torchrun worker (tests/megatron_equiv_worker.py) builds one tiny GPTModel with stock MoE
layers and one with moe_plugin's (``MoEPluginConfig(moe_use_plugin=True)``), loads the stock
weights into the plugin model (strict), runs the same batch, and compares the loss and every
parameter gradient; also the state-dict round trip both ways, the expert-bias update through
Megatron's ``finalize_model_grads`` helper, and Megatron's ``allreduce`` flags under EP."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("megatron.core")

from conftest import BF16_TOL, FP32_TOL, assert_close, free_port, worker_env  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "megatron_equiv_worker.py")
ERR_KEYS = ("loss", "loss_torch_backend", "logged_losses", "grads", "bias_update",
            "router_loaded", "stock_ep1_to_plugin_ep2", "plugin_ep2_to_stock_ep1")


def _run(nproc, tmp_path, *extra):
    out = tmp_path / "megatron.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", WORKER,
           "--out", str(out), *extra]
    proc = subprocess.run(cmd, env=worker_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _check(results, tol, min_cases=7):
    for rank, res in enumerate(results):
        assert len(res) >= min_cases
        for case, r in res.items():
            assert "error" not in r, f"rank {rank} {case}: {r.get('trace', r['error'])}"
            for key, val in r.items():
                if key in ERR_KEYS:
                    assert val <= tol, f"rank {rank} {case} {key}: {val:.3e} > {tol} " \
                                       f"({r.get('worst_grad_param')})"
                elif key != "worst_grad_param":
                    assert val is True, f"rank {rank} {case} {key}: {val}"


@pytest.mark.parametrize("ep", [1, 2])
def test_plugin_matches_stock_megatron_cpu(ep, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CPU gloo variant")
    _check(_run(ep, tmp_path, "--ep", str(ep)), FP32_TOL)


def test_dist_checkpoint_across_ep_and_stock_cpu(tmp_path):
    """stock EP=1 checkpoint -> plugin EP=2 -> checkpoint -> stock EP=1: weights exact."""
    if torch.cuda.is_available():
        pytest.skip("CPU gloo variant")
    res = _run(2, tmp_path, "--checkpoint-dir", str(tmp_path))
    _check(res, 0.0, min_cases=1)
    assert all(set(r["checkpoint"]) == {"stock_ep1_to_plugin_ep2", "router_loaded",
                                        "plugin_ep2_to_stock_ep1"} for r in res)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_plugin_matches_stock_megatron_gpu_bf16(tmp_path):
    _check(_run(2, tmp_path, "--ep", "2", "--device", "cuda", "--dtype", "bf16"), BF16_TOL)


# ---------------------------------------------------------------------------------------------
# configuration: the flag, and clear errors for unsupported settings


def _cfg(**kw):
    from moe_plugin.megatron import MoEPluginConfig
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                num_moe_experts=4, moe_router_topk=2, gated_linear_unit=True,
                activation_func=torch.nn.functional.silu, add_bias_linear=False,
                use_cpu_initialization=True, moe_use_plugin=True)
    base.update(kw)
    return MoEPluginConfig(**base)


@pytest.fixture
def model_parallel_1():
    """A single-process gloo group with Megatron's model-parallel state (torn down after)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from moe_plugin import patches
    patches.apply()
    own = not dist.is_initialized()
    if own:
        # CUDA tensors (the distributed optimizer's collectives on a GPU) go through NCCL
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    if own:
        dist.destroy_process_group()


def test_flag_selects_the_spec(model_parallel_1):
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from moe_plugin.megatron import PluginMoELayer, gpt_decoder_block_spec
    from moe_plugin.megatron.compat import module_of  # (ModuleSpec on 0.16, partial on 0.19)
    on = gpt_decoder_block_spec(_cfg(), use_transformer_engine=False)
    off = gpt_decoder_block_spec(_cfg(moe_use_plugin=False), use_transformer_engine=False)
    assert [module_of(s.submodules.mlp) for s in on.layer_specs] == [PluginMoELayer] * 2
    assert [module_of(s.submodules.mlp) for s in off.layer_specs] == [MoELayer] * 2
    # moe_layer_freq: dense layers stay dense
    mixed = gpt_decoder_block_spec(_cfg(moe_layer_freq=[0, 1]), use_transformer_engine=False)
    assert module_of(mixed.layer_specs[0].submodules.mlp) is not PluginMoELayer
    assert module_of(mixed.layer_specs[1].submodules.mlp) is PluginMoELayer


def test_cli_flag():
    import argparse
    from moe_plugin.megatron import add_plugin_args
    p = add_plugin_args(argparse.ArgumentParser())
    assert p.parse_args(["--moe-use-plugin"]).moe_use_plugin is True
    assert p.parse_args([]).moe_use_plugin is False


@pytest.mark.parametrize("field,kw", [
    ("moe_router_score_function", dict(moe_router_score_function="sparsemixer")),
    ("add_bias_linear", dict(add_bias_linear=True, moe_plugin_quant="fp8_block")),
    ("activation_func", dict(activation_func=torch.sigmoid)),
    ("activation_func_clamp_value", dict(activation_func_clamp_value=5.0)),
    ("moe_router_dtype", dict(moe_router_dtype="fp64")),
    ("moe_router_load_balancing_type", dict(moe_router_load_balancing_type="sinkhorn")),
    ("moe_pad_expert_input_to_capacity", dict(moe_pad_expert_input_to_capacity=True,
                                              moe_expert_capacity_factor=1.0)),
    ("moe_router_num_groups", dict(moe_router_num_groups=2, moe_router_group_topk=1)),
    ("glu_linear_offset", dict(glu_linear_offset=0.5)),
    ("context_parallel_size", dict(context_parallel_size=2)),
    ("moe_plugin_quant", dict(moe_plugin_quant="int8")),
])
def test_unsupported_settings_name_the_field(field, kw):
    from moe_plugin.megatron import UnsupportedConfigError
    with pytest.raises((UnsupportedConfigError, ValueError), match=field):
        _cfg(**kw)


@pytest.mark.parametrize("fields,expect", [
    (dict(fp8="e4m3", fp8_recipe="blockwise"), "fp8_block_wgrad"),  # fp8_wgrad defaults on
    (dict(fp8="e4m3", fp8_recipe="blockwise", fp8_wgrad=True), "fp8_block_wgrad"),
    (dict(fp8="e4m3", fp8_recipe="blockwise", fp8_wgrad=False), "fp8_block"),
    (dict(fp8="e4m3", fp8_recipe="delayed"), "fp8_recipe"),
    (dict(fp8="hybrid", fp8_recipe="blockwise"), "fp8"),
    (dict(fp8="e4m3", fp8_recipe="blockwise", fp8_param=True), "fp8_param"),
    (dict(fp4="nvfp4"), "fp4"),
])
def test_megatron_fp8_settings_map_to_quant(fields, expect):
    """Megatron's own FP8 fields (which megatron-core accepts for MoE models only with
    TransformerEngine installed, so they are set on a built config here): the blockwise e4m3
    recipe maps to quant='fp8_block_wgrad', or 'fp8_block' with fp8_wgrad off; everything
    else raises naming the field."""
    from moe_plugin.megatron import UnsupportedConfigError
    from moe_plugin.megatron.options import plugin_options
    cfg = _cfg()
    assert plugin_options(cfg).quant is None
    for name, value in fields.items():
        setattr(cfg, name, value)
    if expect.startswith("fp8_block"):  # the quant it maps to, else the field named
        assert plugin_options(cfg).quant == expect
    else:
        with pytest.raises(UnsupportedConfigError, match=expect):
            plugin_options(cfg)


def test_plugin_quant_flag():
    import argparse
    from moe_plugin.megatron import add_plugin_args
    from moe_plugin.megatron.options import plugin_options
    p = add_plugin_args(argparse.ArgumentParser())
    assert p.parse_args(["--moe-plugin-quant", "fp8_block"]).moe_plugin_quant == "fp8_block"
    assert p.parse_args([]).moe_plugin_quant is None
    assert plugin_options(_cfg(moe_plugin_quant="fp8_block")).quant == "fp8_block"
    assert p.parse_args(["--moe-plugin-quant", "fp8_block_wgrad"]).moe_plugin_quant \
        == "fp8_block_wgrad"
    assert plugin_options(_cfg(moe_plugin_quant="fp8_block_wgrad")).quant == "fp8_block_wgrad"


def test_unsupported_only_when_flag_on():
    # the same setting is fine for stock Megatron-Core (flag off)
    _cfg(moe_use_plugin=False, moe_router_dtype="fp64")


@pytest.mark.parametrize("groups,masked", [(4, False), (2, False), (4, True)])
def test_sdpa_attention_matches_megatron_dot_product_attention(model_parallel_1, groups, masked):
    """SDPAttention (the pretraining example's default core attention) against Megatron's
    DotProductAttention: output and the gradients of q, k, v, fp32 -- causal through ``None``
    and through an explicit mask, grouped-query attention, a padding mask."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from moe_plugin.megatron.attention import SDPAttention
    model_parallel_cuda_manual_seed(0)  # DotProductAttention's dropout forks this RNG state
    cfg = _cfg(num_query_groups=groups, attention_dropout=0.0)
    s, b, h, d = 12, 2, cfg.num_attention_heads, cfg.kv_channels
    g = torch.Generator().manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # Megatron's score buffer lives there
    q = torch.randn(s, b, h, d, generator=g).to(dev)
    k, v = (torch.randn(s, b, groups, d, generator=g).to(dev) for _ in range(2))
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool, device=dev), diagonal=1)[None, None]
    if masked:  # the last 3 keys of the second sequence are padding
        causal = causal.repeat(b, 1, 1, 1)
        causal[1, :, :, -3:] = True
    outs = []
    for cls, mask in ((DotProductAttention, causal), (SDPAttention, causal if masked else None)):
        mod = cls(cfg, 1, AttnMaskType.causal, "self")
        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        out = mod(*qkv, mask)
        out.backward(torch.ones_like(out) + out.detach())
        outs.append([out.detach()] + [t.grad for t in qkv])
    for a, ref, what in zip(*outs, ("out", "dq", "dk", "dv")):  # (no fully masked query row)
        assert_close(a, ref, FP32_TOL, what)


def test_sdpa_attention_rejects_unsupported_settings(model_parallel_1):
    from megatron.core.transformer.enums import AttnMaskType
    from moe_plugin.megatron import UnsupportedConfigError
    from moe_plugin.megatron.attention import SDPAttention
    with pytest.raises(UnsupportedConfigError, match="window_size"):
        SDPAttention(_cfg(window_size=(4, 0)), 1, AttnMaskType.causal, "self")


_DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _gpt_ddp(cfg, state=None, **ddp_kw):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from moe_plugin.megatron import gpt_decoder_block_spec
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    model = GPTModel(cfg, gpt_decoder_block_spec(cfg, use_transformer_engine=False),
                     vocab_size=64, max_sequence_length=16)
    if state is not None:
        model.load_state_dict(state)
    model.to(_DEV)
    if cfg.bf16:  # as Megatron's training loop wraps a bf16 model (casts in and out)
        from megatron.core.transformer.module import Float16Module
        model = Float16Module(cfg, model)
    return DistributedDataParallel(
        cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True, **ddp_kw), model)


def test_expert_wgrad_accumulates_into_main_grad(model_parallel_1):
    """Gradient-accumulation fusion (``moe_plugin_accumulate_wgrad``, on by default): under
    Megatron's DDP, over two micro-batches, the expert weights' ``main_grad`` equals the one
    built the stock way (gradient returned, added by DDP's hook), the parameters are flagged
    ``grad_added_to_main_grad`` and keep no ``.grad``; every other gradient is unchanged.
    (fp32; on CPU through the Triton interpreter, on a GPU the compiled kernels.)"""
    runs = {}
    state = None
    for fuse in (False, True):
        ddp = _gpt_ddp(_cfg(moe_plugin_accumulate_wgrad=fuse, moe_aux_loss_coeff=0.01), state)
        state = state or ddp.module.state_dict()
        ddp.zero_grad_buffer()
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            tokens = torch.randint(0, 64, (2, 16), generator=g).to(_DEV)
            pos = torch.arange(16, device=_DEV)[None].expand(2, 16)
            causal = torch.triu(torch.ones(16, 16, dtype=torch.bool, device=_DEV),
                                diagonal=1)[None, None]
            ddp(tokens, pos, causal, labels=tokens).float().mean().backward()
        runs[fuse] = {n: (p, p.main_grad.clone()) for n, p in ddp.module.named_parameters()}
    experts = [n for n in runs[True] if ".experts.w_" in n]
    assert len(experts) == 4  # w_up, w_down of two MoE layers
    for n, (p, main_grad) in runs[True].items():
        ref_p, ref = runs[False][n]
        assert ref.norm() > 0, n
        assert_close(main_grad, ref, FP32_TOL, n)
        assert p.grad is None, n
        fused = n in experts
        assert getattr(p, "grad_added_to_main_grad") is fused, n
        assert getattr(p, "moe_plugin_accumulate_wgrad", False) is fused, n
        assert ref_p.grad_added_to_main_grad is False, n


def test_fused_cross_entropy_matches_megatron_loss(model_parallel_1, monkeypatch):
    """``use_fused_cross_entropy``: a GPTModel's per-token loss and every parameter gradient
    equal those of Megatron's own cross entropy (fp32); tensor parallelism is refused."""
    from moe_plugin.megatron import UnsupportedConfigError
    from moe_plugin.megatron.loss import use_fused_cross_entropy
    # (gradients read with autograd.grad: no accumulation into main_grad)
    ddp = _gpt_ddp(_cfg(hidden_dropout=0.0, attention_dropout=0.0,
                        moe_plugin_accumulate_wgrad=False))
    model = ddp.module
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 64, (2, 16), generator=g).to(_DEV)
    labels = torch.randint(0, 64, (2, 16), generator=g).to(_DEV)
    pos = torch.arange(16, device=_DEV)[None].expand(2, 16)
    causal = torch.triu(torch.ones(16, 16, dtype=torch.bool, device=_DEV), diagonal=1)[None, None]
    results = []
    for fused in (False, True):
        if fused:
            use_fused_cross_entropy(model)
        model.zero_grad(set_to_none=True)
        loss = model(tokens, pos, causal, labels=labels)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad((loss * torch.linspace(0.5, 1.5, 32).view(2, 16).to(_DEV))
                                    .sum(), params)
        results.append((loss.detach(), grads))
    (ref, ref_grads), (got, got_grads) = results
    assert got.shape == ref.shape == (2, 16) and got.dtype == ref.dtype == torch.float32
    assert_close(got, ref, FP32_TOL, "loss")
    for i, (a, b) in enumerate(zip(got_grads, ref_grads)):
        assert_close(a, b, FP32_TOL, f"grad {i}")
    monkeypatch.setattr("megatron.core.parallel_state.get_tensor_model_parallel_world_size",
                        lambda: 2)
    with pytest.raises(UnsupportedConfigError, match="tensor_model_parallel_size"):
        use_fused_cross_entropy(model)


def _fp8_cache_after_megatron_step(opt_cfg, **cfg_kw):
    """Builds the FP8 plugin model under Megatron's DDP and ``get_megatron_optimizer``, ties the
    quantised-weight cache to the optimizer, takes one step, and returns ``(loss before,
    loss after with the cache, loss after quantising anew, loss after with a cache that only
    the weights' ``_version`` can refresh, expert weight before, after)``."""
    from megatron.core.optimizer import get_megatron_optimizer
    from moe_plugin.megatron import PluginMoELayer
    from moe_plugin.quant import WeightCache, cache_quantized_weights
    ddp = _gpt_ddp(_cfg(moe_plugin_quant="fp8_block", hidden_dropout=0.0, attention_dropout=0.0,
                        **cfg_kw), use_distributed_optimizer=opt_cfg.use_distributed_optimizer)
    opt = get_megatron_optimizer(opt_cfg, [ddp])
    cache = cache_quantized_weights(ddp, opt)
    layers = [m for m in ddp.modules() if isinstance(m, PluginMoELayer)]
    assert len(layers) == 2 and all(m.quant_weight_cache is cache for m in layers)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 64, (2, 16), generator=g).to(_DEV)
    pos = torch.arange(16, device=_DEV)[None].expand(2, 16)
    causal = torch.triu(torch.ones(16, 16, dtype=torch.bool, device=_DEV), diagonal=1)[None, None]

    def loss():
        return ddp(tokens, pos, causal, labels=tokens).float().mean()

    def loss_with(c):
        for m in layers:
            m.quant_weight_cache = c
        with torch.no_grad():
            return loss()

    version_only = WeightCache()  # never refreshed: what a _version-keyed cache would do
    loss_with(version_only)
    for m in layers:
        m.quant_weight_cache = cache
    ddp.zero_grad_buffer()
    opt.zero_grad()
    before = loss()
    before.backward()
    w_down = layers[0].experts.w_down
    w_old = w_down.detach().clone()
    ok, _, _ = opt.step()
    assert ok
    after_cached = loss_with(cache)
    after_fresh = loss_with(None)  # quantise anew from the current weights
    after_version_only = loss_with(version_only)
    return before.detach(), after_cached, after_fresh, after_version_only, w_old, w_down.detach()


def test_fp8_weight_cache_follows_megatron_optimizer_step(model_parallel_1):
    """FP8 experts under a real Megatron-Core optimizer (fp32, on CPU as on a GPU): with the
    quantised-weight cache tied to it (``cache_quantized_weights``), the forward after
    ``step()`` runs on the new weights -- bitwise what quantising anew gives."""
    from megatron.core.optimizer import OptimizerConfig
    before, cached, fresh, _, w_old, w_new = _fp8_cache_after_megatron_step(
        OptimizerConfig(optimizer="adam", lr=0.05, clip_grad=0.0))
    assert not torch.equal(w_new, w_old)  # the step did move the expert weights
    assert torch.equal(cached, fresh), (cached.item(), fresh.item())
    assert not torch.equal(cached, before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("distributed", [False, True])
def test_fp8_weight_cache_follows_megatron_bf16_optimizers_gpu(model_parallel_1, distributed):
    """The same with bf16 parameters and Megatron's bf16 optimizers, which keep fp32 main
    copies and write the model's parameters from them after the step: the forward after the
    step sees the new weights. Neither optimizer's write (Float16OptimizerWithFloat16Params
    through ``param.data``, the distributed optimizer into its parameter buffer) bumps
    ``_version``: a cache keyed on ``_version`` alone stays stale (the control)."""
    from megatron.core.optimizer import OptimizerConfig
    before, cached, fresh, version_only, w_old, w_new = _fp8_cache_after_megatron_step(
        OptimizerConfig(optimizer="adam", lr=0.05, bf16=True,
                        use_distributed_optimizer=distributed),
        bf16=True, params_dtype=torch.bfloat16)
    assert not torch.equal(w_new, w_old)
    assert torch.equal(cached, fresh), (cached.item(), fresh.item())
    assert not torch.equal(cached, before)
    assert not torch.equal(version_only, fresh), version_only.item()


def test_expert_biases_get_no_weight_decay_like_stock(model_parallel_1):
    """Megatron's optimizer keeps parameters named ``*.bias`` (and 1-D ones) out of weight
    decay. Stock's per-expert biases are 1-D; the plugin's stacked ones are 2-D, named
    ``experts.linear_fc1.bias`` / ``linear_fc2.bias`` so that the same rule applies."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    decay = {}
    for flag in (False, True):
        ddp = _gpt_ddp(_cfg(moe_use_plugin=flag, add_bias_linear=True))
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3,
                                                     weight_decay=0.1, clip_grad=0.0), [ddp])
        names = {id(p): n for n, p in ddp.named_parameters()}
        groups = opt.param_groups if hasattr(opt, "param_groups") else opt.optimizer.param_groups
        # (Megatron's scheduler applies weight_decay x wd_mult)
        decay[flag] = {names[id(p)]: g["weight_decay"] * g.get("wd_mult", 1.0)
                       for g in groups for p in g["params"]}
    plugin_biases = {n: wd for n, wd in decay[True].items() if ".experts.linear_fc" in n}
    assert len(plugin_biases) == 4, sorted(decay[True])  # 2 layers x (fc1, fc2)
    assert all(wd == 0.0 for wd in plugin_biases.values()), plugin_biases
    stock_biases = {n: wd for n, wd in decay[False].items() if ".local_experts." in n
                    and n.endswith(".bias")}
    assert stock_biases and all(wd == 0.0 for wd in stock_biases.values())
    assert decay[True][next(n for n in decay[True] if n.endswith("experts.w_up"))] == 0.1
