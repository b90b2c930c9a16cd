"""Worker for tests/test_megatron_patches.py: the CPU shims of Megatron's distributed optimizer
(world size 1, gloo, CUDA hidden), each shown necessary and sufficient.

    python tests/megatron_distopt_worker.py --out FILE

Applies the te_general_gemm fix and the CPU shims except the three under test, then records
what fails without each and what works once it is applied:

* ``patch_grad_sync_current_stream``: ``finalize_model_grads`` after a backward (megatron-core
  0.19 asks for ``torch.cuda.current_stream()`` there; 0.16.1 does not);
* ``patch_optimizer_tensor_type_checks``: building the distributed optimizer
  (``get_megatron_optimizer``) and ``clip_grad_by_total_norm_fp32`` on CPU gradients;
* ``patch_distributed_optimizer_gather``: the ``fully_reshardable`` optimizer state
  (``get_parameter_state_dp_zero`` moves its buffers with ``.cuda()``).

Then two optimizer steps with clipping, and the gathered state against the optimizer's own.
Writes JSON to FILE; the test makes the assertions.
"""
import argparse
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

UNDER_TEST = ("patch_grad_sync_current_stream", "patch_optimizer_tensor_type_checks",
              "patch_distributed_optimizer_gather")


def _error(fn):
    """None if ``fn()`` runs, else ``"<type>: <message>"`` of what it raised."""
    try:
        fn()
        return None
    except Exception as e:  # noqa: BLE001 - recorded and asserted on by the test
        return f"{type(e).__name__}: {str(e)[:300]}"


def run() -> dict:
    from moe_plugin.patches import megatron_cpu, megatron_te_general_gemm
    res = {"cuda_available": torch.cuda.is_available()}
    megatron_te_general_gemm.apply()
    res["others"] = [s.__name__ for s in megatron_cpu.SHIMS
                     if s.__name__ not in UNDER_TEST and s()]

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, clip_grads, get_megatron_optimizer
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron_worker import batch, build_model

    ps.initialize_model_parallel(1, 1)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    config, model = build_model()
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=True), model)
    ids, pos, mask, labels = batch(3)

    def backward():
        ddp.zero_grad_buffer()
        ddp(ids, pos, mask, labels=labels).float().mean().backward()

    # 1. finalize_model_grads
    backward()
    res["finalize_without"] = _error(lambda: finalize_model_grads([ddp]))
    res["stream_shim_applied"] = megatron_cpu.patch_grad_sync_current_stream()
    res["stream_shim_again"] = megatron_cpu.patch_grad_sync_current_stream()
    backward()
    res["finalize_with"] = _error(lambda: finalize_model_grads([ddp]))

    # 2. the distributed optimizer's tensor-type checks, and the clipping's
    opt_cfg = OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.5,
                              use_distributed_optimizer=True)
    res["build_without"] = _error(lambda: get_megatron_optimizer(opt_cfg, [ddp]))
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    res["clip_without"] = _error(
        lambda: clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0))
    res["types_shim_applied"] = megatron_cpu.patch_optimizer_tensor_type_checks()
    res["types_shim_again"] = megatron_cpu.patch_optimizer_tensor_type_checks()
    opt = get_megatron_optimizer(opt_cfg, [ddp])
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)
    res["clipped_grad"] = p.grad.tolist()  # 2 * 1 / (4 + 1e-6)
    res["type_outside_shim"] = torch.ones(1).type()  # torch's own answer again
    losses = []
    for _ in range(2):
        backward()
        finalize_model_grads([ddp])
        ok, grad_norm, _ = opt.step()
        losses.append(ddp(ids, pos, mask, labels=labels).float().mean().item())
        res.setdefault("steps_ok", []).append(ok)
        res.setdefault("grad_norms", []).append(grad_norm)
    res["losses"] = losses

    # 3. the fully_reshardable gather
    (sub,) = opt.chained_optimizers
    res["gather_without"] = _error(
        lambda: sub.get_parameter_state_dp_zero(use_gloo_comm=False, return_on_all_ranks=True))
    res["gather_shim_applied"] = megatron_cpu.patch_distributed_optimizer_gather()
    res["gather_shim_again"] = megatron_cpu.patch_distributed_optimizer_gather()
    world = sub.get_parameter_state_dp_zero(use_gloo_comm=False, return_on_all_ranks=True)
    (tensors,) = world[0].values()
    # one data-parallel rank: the gathered state is the optimizer's own, parameter by parameter
    same = []
    for param, (start, end, _) in sub.buffers[0].param_index_map.items():
        own = sub._get_main_param_and_optimizer_states(param)
        same.append(all(torch.equal(tensors[k][start:end], own[k].detach().view(-1))
                        for k in ("param", "exp_avg", "exp_avg_sq")))
    res["gathered_params"] = len(same)
    res["gathered_equal"] = all(same)
    res["exp_avg_nonzero"] = bool(tensors["exp_avg"].abs().sum() > 0)
    res["cuda_outside_shim"] = _error(lambda: torch.ones(1).cuda())
    res["shims_in_list"] = all(getattr(megatron_cpu, n) in megatron_cpu.SHIMS
                               for n in UNDER_TEST)
    ps.destroy_model_parallel()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    try:
        res = run()
    except Exception:  # noqa: BLE001 - reported to the test
        res = {"error": traceback.format_exc()}
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    from torchrun_exit import exit_now
    exit_now(0)
