"""Worker for tests/test_megatron_patches.py: a tiny Megatron-Core GPT-MoE on CPU with gloo.

Two modes, both reading the usual torch.distributed env (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT; torchrun sets them):

    python tests/megatron_worker.py single --out DIR      # world size 1
    torchrun --nproc_per_node=2 --master_addr=127.0.0.1 --master_port=PORT \\
        tests/megatron_worker.py ep --out DIR             # expert_model_parallel_size=2

``single`` applies only the CPU shims, shows the MoE forward raising the ``te_general_gemm``
NameError, then applies ``patches.apply()`` and runs forward + backward. ``ep`` applies
``patches.apply()`` and trains 3 AdamW steps through Megatron's DDP + ``finalize_model_grads``.
Each rank writes ``DIR/<mode>_rank<r>.json`` (and, for ``ep``, ``DIR/ep_rank<r>.pt`` with its
final parameters); the test makes the assertions.
"""

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

VOCAB, SEQ, BATCH = 128, 16, 2


def build_model(ep=1):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=64,
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.1,  # runs inside the RNG tracker's fork(): exercises that shim
        use_cpu_initialization=True,
        expert_model_parallel_size=ep,
    )
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    model = GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ)
    return config, model


def batch(seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    pos = torch.arange(SEQ).expand(BATCH, SEQ).contiguous()
    mask = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)[None, None]  # True = masked out
    return ids, pos, mask, labels


def count_moe_layers(model):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return sum(isinstance(m, MoELayer) for m in model.modules())


def mode_single(args, rank):
    from moe_plugin import patches
    from moe_plugin.patches import megatron_cpu, megatron_te_general_gemm
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe import moe_utils

    res = {"cuda_available": torch.cuda.is_available()}
    try:
        import transformer_engine  # noqa: F401

        res["have_te"] = True
    except Exception:
        res["have_te"] = False

    # 1. CPU shims only: the te_general_gemm fix is NOT applied yet.
    res["cpu_shims"] = megatron_cpu.apply()
    res["te_bound_before"] = hasattr(moe_utils, "te_general_gemm")
    ps.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    torch.manual_seed(1234)
    model_parallel_cuda_manual_seed(1234)

    # RNG tracker shim: fork() gives a reproducible stream of its own and leaves the default
    # (CPU) generator untouched.
    tracker = get_cuda_rng_tracker()
    default_before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    with tracker.fork():
        b = torch.rand(4)
    res["rng_default_untouched"] = torch.equal(default_before, torch.get_rng_state())
    res["rng_fork_advances"] = not torch.equal(a, b)
    model_parallel_cuda_manual_seed(1234, force_reset_rng=True)
    with get_cuda_rng_tracker().fork():
        a2 = torch.rand(4)
    res["rng_reseed_reproduces"] = torch.equal(a, a2)

    config, model = build_model()
    res["moe_layers"] = count_moe_layers(model)
    ids, pos, mask, labels = batch(1)

    # 2. Unpatched: the MoE forward must fail with the NameError.
    t0 = time.perf_counter()
    try:
        model(ids, pos, mask, labels=labels)
        res["unpatched"] = {"raised": None}
    except Exception as e:  # noqa: BLE001 - recorded and asserted on by the test
        tb = traceback.extract_tb(e.__traceback__)
        res["unpatched"] = {
            "raised": type(e).__name__,
            "message": str(e),
            "frame": f"{os.path.basename(tb[-1].filename)}:{tb[-1].lineno}:{tb[-1].name}",
        }
    res["unpatched_s"] = time.perf_counter() - t0

    # 3. Patched: forward + backward.
    res["apply"] = patches.apply()
    res["apply_again"] = patches.apply()
    res["te_general_gemm_after"] = repr(moe_utils.te_general_gemm)
    res["te_fix_needed_after"] = megatron_te_general_gemm.is_needed()

    # The patched router GEMM equals upstream's torch fallback (x @ W^T in the router dtype),
    # forward and backward.
    x = torch.randn(6, 32, requires_grad=True)
    w = torch.randn(4, 32, requires_grad=True)
    out = moe_utils.router_gating_linear(x, w, None, torch.float32)
    gout = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), gout)
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    ref = torch.mm(xr, wr.t())
    gxr, gwr = torch.autograd.grad(ref, (xr, wr), gout)
    res["gating_matches_torch"] = bool(
        torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
        and torch.allclose(gx, gxr, rtol=1e-6, atol=1e-6)
        and torch.allclose(gw, gwr, rtol=1e-6, atol=1e-6)
    )

    # Expert-bias buffers (router.py:165-198) are allocated on torch.cuda.current_device():
    # with the shims they live on the CPU and the aux-loss-free router runs.
    from megatron.core.transformer.moe.router import TopKRouter

    bias_config = dataclasses.replace(
        config, moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid",
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
    )
    router = TopKRouter(bias_config, pg_collection=moe_utils.get_default_pg_collection())
    probs, routing_map = router(torch.randn(SEQ, BATCH, 32))
    res["expert_bias"] = {
        "device": str(router.expert_bias.device),
        "tokens_counted": router.local_tokens_per_expert.sum().item(),
        "routed": routing_map.sum().item(),
        "probs_finite": bool(probs.isfinite().all()),
    }

    t0 = time.perf_counter()
    loss = model(ids, pos, mask, labels=labels).float().mean()
    loss.backward()
    res["fwd_bwd_s"] = time.perf_counter() - t0
    res["loss"] = loss.item()
    grads = {n: p.grad for n, p in model.named_parameters()}
    res["n_params"] = len(grads)
    res["missing_grads"] = [n for n, g in grads.items() if g is None]
    res["nonfinite_grads"] = [
        n for n, g in grads.items() if g is not None and not g.isfinite().all()
    ]
    res["router_grad_norm"] = sum(
        g.norm().item() ** 2 for n, g in grads.items() if g is not None and "router" in n
    ) ** 0.5
    res["expert_grad_norm"] = sum(
        g.norm().item() ** 2 for n, g in grads.items() if g is not None and "experts" in n
    ) ** 0.5
    return res


def shared_grad_norm(ddp):
    """Norm of the non-expert parameters' ``main_grad`` (Megatron DDP's gradient buffer)."""
    grads = [
        p.main_grad.flatten() for p in ddp.module.parameters() if getattr(p, "allreduce", True)
    ]
    return torch.cat(grads).norm().item()


def mode_ep(args, rank):
    from moe_plugin import patches
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    res = {"apply": patches.apply()}  # auto: CPU shims because CUDA is not visible
    ps.initialize_model_parallel(1, 1, expert_model_parallel_size=2)
    res["ep_size"] = ps.get_expert_model_parallel_world_size()
    res["ep_rank"] = ps.get_expert_model_parallel_rank()
    res["dp_size"] = ps.get_data_parallel_world_size()
    # use_cpu_initialization draws from the default CPU generator: seed per rank so the two
    # EP ranks' experts differ; DDP.broadcast_params() below makes the shared parameters equal.
    torch.manual_seed(1234 + rank)
    model_parallel_cuda_manual_seed(1234)

    config, model = build_model(ep=2)
    res["moe_layers"] = count_moe_layers(model)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    ddp.broadcast_params()
    params = [p for p in ddp.parameters() if p.requires_grad]
    res["expert_params"] = sorted(
        n for n, p in ddp.module.named_parameters() if not getattr(p, "allreduce", True)
    )
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids, pos, mask, labels = batch(100 + rank)  # each DP rank its own tokens

    losses, step_s = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        ddp.zero_grad_buffer()
        opt.zero_grad(set_to_none=True)
        loss = ddp(ids, pos, mask, labels=labels).float().mean()
        loss.backward()
        if not losses:  # step 0: shared grads before and after the DP all-reduce
            res["shared_grad_norm_local"] = shared_grad_norm(ddp)
        finalize_model_grads([ddp])  # DP all-reduce of shared grads into param.main_grad
        if not losses:
            res["shared_grad_norm_synced"] = shared_grad_norm(ddp)
        for p in params:
            p.grad = p.main_grad
        opt.step()
        losses.append(loss.item())
        step_s.append(time.perf_counter() - t0)
    with torch.no_grad():
        losses.append(ddp(ids, pos, mask, labels=labels).float().mean().item())
    res["losses"] = losses
    res["step_s"] = step_s
    res["grads_finite"] = all(p.main_grad.isfinite().all().item() for p in params)
    torch.save(
        {n: p.detach().clone() for n, p in ddp.module.named_parameters()},
        os.path.join(args.out, f"ep_rank{rank}.pt"),
    )
    return res


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["single", "ep"])
    parser.add_argument("--out", required=True, help="directory for the per-rank results")
    args = parser.parse_args()

    t0 = time.perf_counter()
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    try:
        res = {"single": mode_single, "ep": mode_ep}[args.mode](args, rank)
    except Exception:  # noqa: BLE001 - reported to the test instead of a bare exit code
        res = {"error": traceback.format_exc()}
    res["total_s"] = time.perf_counter() - t0
    with open(os.path.join(args.out, f"{args.mode}_rank{rank}.json"), "w") as f:
        json.dump(res, f, indent=1)

    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    from torchrun_exit import exit_now
    exit_now(0)
