"""Worker for tests/test_megatron.py (torchrun, gloo on CPU / NCCL on GPU).

Builds the same tiny Megatron-Core GPTModel twice — stock MoE layers and moe_plugin's — loads
the stock weights into the plugin model, runs the same batch through both, and records the
relative errors of the loss and of every parameter gradient (each rank its own parameters),
plus state-dict round trips and the expert-bias update through Megatron's own
finalize_model_grads helper. Rank 0 writes JSON to ``--out``.
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_plugin import patches  # noqa: E402

patches.apply()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias  # noqa
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.activations import quick_gelu  # noqa: E402

from moe_plugin.megatron import MoEPluginConfig, PluginMoELayer, gpt_decoder_block_spec  # noqa
from moe_plugin.megatron import compat  # noqa: E402

SEQ, VOCAB = 16, 64
CASES = {
    "swiglu_softmax_shared": dict(moe_shared_expert_intermediate_size=16,
                                  moe_shared_expert_gate=True),
    "sigmoid_bias_groups": dict(moe_router_score_function="sigmoid",
                                moe_router_enable_expert_bias=True, moe_router_num_groups=2,
                                moe_router_group_topk=1, moe_router_topk_scaling_factor=2.0),
    "pre_softmax": dict(moe_router_pre_softmax=True),
    "seq_aux": dict(moe_router_load_balancing_type="seq_aux_loss"),
    "capacity_probs": dict(moe_expert_capacity_factor=1.0, moe_token_drop_policy="probs"),
    # Megatron-Core's default MoE MLP: exact gelu, not gated, biases (experts and router)
    "default_gelu_bias": dict(gated_linear_unit=False, activation_func=torch.nn.functional.gelu,
                              add_bias_linear=True),
    # gpt-oss: quick_gelu's clamped GLU (moe_plugin's swiglu_oai) with biases
    "gpt_oss_bias": dict(activation_func=quick_gelu, activation_func_clamp_value=7.0,
                         glu_linear_offset=1.0, add_bias_linear=True),
    # stock's random logits and input jitter (the same RNG streams, re-seeded per model)
    "force_lb_jitter": dict(moe_router_force_load_balancing=True, moe_input_jitter_eps=0.1),
}
# options set on the plugin model only (stock Megatron-Core cannot run them here)
PLUGIN_ONLY = {
    "recompute": dict(recompute_granularity="selective", recompute_modules=["moe"]),
}


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def build(flag, extra, ep, device, dtype, seed=None):
    kw = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
              num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=24,
              gated_linear_unit=True, activation_func=torch.nn.functional.silu,
              moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001,
              moe_token_dispatcher_type="alltoall", use_cpu_initialization=True,
              add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
              expert_model_parallel_size=ep, params_dtype=dtype,
              bf16=dtype == torch.bfloat16, moe_use_plugin=flag)
    kw.update(extra)
    cfg = MoEPluginConfig(**kw)
    torch.manual_seed(1234 + dist.get_rank() if seed is None else seed)
    model = GPTModel(cfg, gpt_decoder_block_spec(cfg, use_transformer_engine=False),
                     vocab_size=VOCAB, max_sequence_length=SEQ).to(device)
    return cfg, model


def run_case(name, extra, ep, device, dtype, plugin_extra=None):
    rank = dist.get_rank()
    cfg_s, stock = build(False, extra, ep, device, dtype)
    cfg_p, plug = build(True, {**extra, **(plugin_extra or {})}, ep, device, dtype)
    res = {"plugin_layers": all(isinstance(l.mlp, PluginMoELayer) for l in plug.decoder.layers),
           "stock_layers": not any(isinstance(l.mlp, PluginMoELayer)
                                   for l in stock.decoder.layers)}
    if cfg_s.add_bias_linear:  # zero at init: make them matter (experts, router, the rest)
        gb = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for n_, p_ in stock.named_parameters():
                if n_.endswith(".bias"):
                    p_.copy_(0.1 * torch.randn(p_.shape, generator=gb))
    res["load_stock_strict"] = str(plug.load_state_dict(stock.state_dict(), strict=True))
    res["load_stock_strict"] = res["load_stock_strict"] == "<All keys matched successfully>"
    if cfg_s.moe_router_enable_expert_bias:  # a non-zero bias, the same in both models
        for ls, lp in zip(stock.decoder.layers, plug.decoder.layers):
            b = torch.linspace(-0.05, 0.05, cfg_s.num_moe_experts, device=device)
            ls.mlp.router.expert_bias.copy_(b)
            lp.mlp.router.expert_bias.copy_(b)
    g = torch.Generator().manual_seed(77 + rank)
    tok = torch.randint(0, VOCAB, (2, SEQ), generator=g).to(device)
    pos = torch.arange(SEQ, device=device).expand(2, SEQ)
    labels = torch.randint(0, VOCAB, (2, SEQ), generator=g).to(device)
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool, device=device), 1)[None, None]
    # Stock's SequentialMLP with biases fails in training on megatron-core 0.16.1 and 0.19.2
    # (mlp.py adds the fc2 bias in place into the output of a custom Function that returned
    # its input: "a view ... is being modified inplace"): there stock gives the loss (no grad)
    # and the gradients are checked against the plugin layer on its plain-PyTorch backend.
    stock_grads = not cfg_s.add_bias_linear

    logged = []

    def run(m):
        m.train()
        torch.manual_seed(4321 + rank)  # the same jitter / random logits for every model
        model_parallel_cuda_manual_seed(4321)
        compat.clear_aux_losses()
        with torch.enable_grad() if (m is not stock or stock_grads) else torch.no_grad():
            loss = m(tok, pos, mask, labels=labels).float().mean()
            if loss.requires_grad:
                loss.backward()
        # what Megatron's training loop logs: reduced across ranks as the version does (the
        # z-loss: each rank's own on 0.16, averaged over DP on 0.19)
        logged.append({k: v.clone() for k, v in compat.reduced_aux_losses().items()})
        compat.clear_aux_losses()
        return loss

    losses = [run(stock), run(plug)]
    res["loss"] = rel(losses[1], losses[0])
    if stock_grads:  # (stock without grad computes no losses)
        res["logged_names"] = sorted(logged[0]) == sorted(logged[1]) and len(logged[0]) > 0
        res["logged_losses"] = max(rel(logged[1][k], logged[0][k]) for k in logged[0]) \
            if logged[0] else 0.0
    grad_ref = None
    if not stock_grads:
        _, grad_ref = build(True, {**extra, **(plugin_extra or {})}, ep, device, dtype)
        grad_ref.load_state_dict(plug.state_dict(), strict=True)
        for layer in grad_ref.decoder.layers:
            layer.mlp.opts.backend = "torch"
        res["loss_torch_backend"] = rel(run(grad_ref), losses[0])
    if "moe_expert_capacity_factor" in extra:  # the case really drops slots
        res["dropped_some"] = any(bool((l.mlp.last_info["topk_ids"] < 0).any())
                                  for l in plug.decoder.layers)
    gs = dict(stock.named_parameters())
    worst, worst_name = 0.0, ""
    stacked = {"w_up": ("linear_fc1", "weight"), "w_down": ("linear_fc2", "weight"),
               "b_up": ("linear_fc1", "bias"), "b_down": ("linear_fc2", "bias")}
    ref_params = dict(grad_ref.named_parameters()) if grad_ref is not None else None
    for n, p in plug.named_parameters():
        if ref_params is not None:
            ref = ref_params[n].grad
        elif ".experts." in n and n.rsplit(".", 1)[-1] in stacked:
            layer = int(n.split(".")[2])
            fc, kind = stacked[n.rsplit(".", 1)[-1]]
            ref = torch.stack([getattr(getattr(e, fc), kind).grad for e in
                               stock.decoder.layers[layer].mlp.experts.local_experts])
        else:
            ref = gs[n].grad
        e = rel(p.grad, ref)
        if e > worst:
            worst, worst_name = e, n
    res["grads"] = worst
    res["worst_grad_param"] = worst_name
    res["save_plugin_load_stock_strict"] = str(stock.load_state_dict(plug.state_dict(),
                                                                      strict=True)) \
        == "<All keys matched successfully>"
    if cfg_s.moe_router_enable_expert_bias:
        _update_router_expert_bias([stock], cfg_s)
        _update_router_expert_bias([plug], cfg_p)
        res["bias_update"] = max(rel(lp.mlp.router.expert_bias, ls.mlp.router.expert_bias)
                                 for ls, lp in zip(stock.decoder.layers, plug.decoder.layers))
        res["bias_moved"] = bool((plug.decoder.layers[0].mlp.router.expert_bias.abs().sum()
                                  > 0).item())
    ep_ok = all(getattr(l.mlp.experts.w_up, "allreduce", True) is (ep == 1)
                for l in plug.decoder.layers)
    res["allreduce_flags"] = ep_ok
    return res


def run_checkpoint_case(tmp, device, dtype):
    """dist_checkpointing across EP sizes and between stock and plugin experts: a stock model
    saved at EP=1 loads into a plugin model at EP=2 (each rank its slice of the experts), and
    that plugin model saved at EP=2 loads back into a stock model at EP=1."""
    from megatron.core import dist_checkpointing
    rank, ws = dist.get_rank(), dist.get_world_size()
    extra = dict(moe_shared_expert_intermediate_size=16)
    res = {}

    for sub in ("stock_ep1", f"plugin_ep{ws}"):
        os.makedirs(os.path.join(tmp, sub), exist_ok=True)
    dist.barrier()

    def reinit(ep):
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=ep)
        model_parallel_cuda_manual_seed(123)

    def experts_of(model):  # {layer: (fc1 [E_loc, 2F, h], fc2 [E_loc, h, F])}
        out = {}
        for i, layer in enumerate(model.decoder.layers):
            ex = layer.mlp.experts
            if isinstance(layer.mlp, PluginMoELayer):
                out[i] = (ex.w_up.detach().clone(), ex.w_down.detach().clone())
            else:
                out[i] = (torch.stack([e.linear_fc1.weight.detach() for e in ex.local_experts]),
                          torch.stack([e.linear_fc2.weight.detach() for e in ex.local_experts]))
        return out

    reinit(1)
    _, stock = build(False, extra, 1, device, dtype, seed=5)  # same weights on every rank
    ref = experts_of(stock)
    ref_router = stock.decoder.layers[0].mlp.router.weight.detach().clone()
    dist_checkpointing.save(stock.sharded_state_dict(), os.path.join(tmp, "stock_ep1"))
    dist.barrier()
    reinit(ws)
    _, plug = build(True, extra, ws, device, dtype)
    state = dist_checkpointing.load(plug.sharded_state_dict(), os.path.join(tmp, "stock_ep1"))
    plug.load_state_dict(state)
    el = 4 // ws
    got = experts_of(plug)
    res["stock_ep1_to_plugin_ep%d" % ws] = max(
        rel(got[i][j], ref[i][j][rank * el:(rank + 1) * el]) for i in got for j in (0, 1))
    res["router_loaded"] = rel(plug.decoder.layers[0].mlp.router.weight, ref_router)
    dist_checkpointing.save(plug.sharded_state_dict(), os.path.join(tmp, "plugin_ep%d" % ws))
    dist.barrier()
    reinit(1)
    _, stock2 = build(False, extra, 1, device, dtype, seed=99)  # overwritten by the load
    state = dist_checkpointing.load(stock2.sharded_state_dict(),
                                    os.path.join(tmp, "plugin_ep%d" % ws))
    stock2.load_state_dict(state)
    back = experts_of(stock2)
    res["plugin_ep%d_to_stock_ep1" % ws] = max(rel(back[i][j], ref[i][j])
                                               for i in back for j in (0, 1))
    return {k: (v if isinstance(v, bool) else float(v)) for k, v in res.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--cases", nargs="*", default=list(CASES) + list(PLUGIN_ONLY))
    ap.add_argument("--checkpoint-dir", default=None,
                    help="run the dist_checkpointing case (needs 2 ranks) in this folder")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=args.ep)
    model_parallel_cuda_manual_seed(123)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    results = {}
    if args.checkpoint_dir:
        args.cases = []
        try:
            results["checkpoint"] = run_checkpoint_case(args.checkpoint_dir, device, dtype)
        except Exception as ex:
            import traceback
            results["checkpoint"] = {"error": repr(ex)[:500],
                                     "trace": traceback.format_exc()[-2000:]}
    for name in args.cases:
        if args.ep > 1 and CASES.get(name, {}).get("add_bias_linear"):
            continue  # the gradient reference (the plugin's torch backend) runs without EP;
            # biases under EP: tests/ep_worker.py against one process
        try:
            if name in PLUGIN_ONLY:
                results[name] = run_case(name, {}, args.ep, device, dtype, PLUGIN_ONLY[name])
            else:
                results[name] = run_case(name, CASES[name], args.ep, device, dtype)
        except Exception as ex:  # reported; the test fails on it
            import traceback
            results[name] = {"error": repr(ex), "trace": traceback.format_exc()[-1500:]}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        with open(args.out, "w") as fh:
            json.dump(gathered, fh, indent=1)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    from torchrun_exit import exit_now
    exit_now(0)
