"""Worker for tests/test_megatron_checkpoint.py (torchrun, 2 processes, gloo on CPU).

A full resume across implementations and expert-parallel sizes, through Megatron's
dist_checkpointing (moe_plugin.megatron.checkpoint): model, Megatron's distributed optimizer
(``get_megatron_optimizer(OptimizerConfig(use_distributed_optimizer=True))``, torch AdamW
underneath, clipping on) and ``OptimizerParamScheduler``.

  1. stock Megatron-Core at EP=1 trains steps 1-2, saves checkpoint A, and trains on
     (steps 3 and 4): the uninterrupted run;
  2. a plugin model at EP=2 (built from another seed) loads A: its weights, optimizer state
     (fp32 main params, exp_avg, exp_avg_sq), parameter groups and scheduler must equal A's
     exactly; it trains step 3 (compared with the uninterrupted run's step 3) and saves B;
  3. a stock model at EP=1 (another seed) loads B: equal to the plugin's state after step 3
     exactly; it trains step 4 (compared with the uninterrupted run's step 4).

State is compared in one canonical form on rank 0: every tensor by its stock name, the
experts one per global expert (``...mlp.experts.{e}.linear_fc1.weight``), the optimizer's
state gathered into full parameter-shaped tensors. Rank 0 writes JSON to ``--out``.
"""
import argparse
import json
import os
import re
import sys

import torch
import torch.distributed as dist

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_plugin import patches  # noqa: E402

patches.apply()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.distributed import (DistributedDataParallel,  # noqa: E402
                                       DistributedDataParallelConfig)
from megatron.core.distributed.finalize_model_grads import finalize_model_grads  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402

from moe_plugin.megatron import MoEPluginConfig, PluginMoELayer, gpt_decoder_block_spec  # noqa
from moe_plugin.megatron.checkpoint import (load_checkpoint, save_checkpoint,  # noqa: E402
                                            sub_optimizers)

SEQ, VOCAB, BATCH, EXPERTS = 16, 64, 2, 4
LR, STEPS = 1e-2, 10


def reinit(ep):
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(123)


def build(plugin: bool, ep: int, seed: int):
    """(DDP model, distributed optimizer, scheduler): fp32, the same weights on every rank."""
    cfg = MoEPluginConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
        num_moe_experts=EXPERTS, moe_router_topk=2, moe_ffn_hidden_size=24,
        moe_shared_expert_intermediate_size=16, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, moe_aux_loss_coeff=0.01,
        moe_z_loss_coeff=0.001, moe_token_dispatcher_type="alltoall",
        use_cpu_initialization=True, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, expert_model_parallel_size=ep, moe_use_plugin=plugin)
    torch.manual_seed(seed)
    model = GPTModel(cfg, gpt_decoder_block_spec(cfg, use_transformer_engine=False),
                     vocab_size=VOCAB, max_sequence_length=SEQ)
    assert all(isinstance(l.mlp, PluginMoELayer) is plugin for l in model.decoder.layers)
    ddp = DistributedDataParallel(
        cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                           use_distributed_optimizer=True), model)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, min_lr=LR / 10, weight_decay=0.01,
                        adam_beta2=0.95, clip_grad=1.0, use_distributed_optimizer=True),
        [ddp])
    sched = OptimizerParamScheduler(
        opt, init_lr=0.0, max_lr=LR, min_lr=LR / 10, lr_warmup_steps=2, lr_decay_steps=STEPS,
        lr_decay_style="cosine", start_wd=0.01, end_wd=0.01, wd_incr_steps=STEPS,
        wd_incr_style="constant")
    return ddp, opt, sched


def train_step(ddp, opt, sched, it: int) -> float:
    """One iteration on this rank's batch of iteration ``it``; returns the mean loss over ranks."""
    g = torch.Generator().manual_seed(1000 * it + dist.get_rank())
    tok = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None, None]
    ddp.train()
    ddp.zero_grad_buffer()
    opt.zero_grad()
    loss = ddp(tok, pos, mask, labels=labels).float().mean()
    loss.backward()
    finalize_model_grads([ddp])
    ok, _, _ = opt.step()
    assert ok
    sched.step(increment=1)
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    return loss.item() / dist.get_world_size()


_EXPERT = re.compile(r"(.*\.mlp\.experts\.)(?:local_experts\.(\d+)\.(linear_fc[12])\.(weight)|"
                     r"(w_up|w_down))$")


def _canonical(name: str, tensor, ep_rank: int, num_local: int) -> dict:
    """``{stock name with the global expert index: tensor}`` for one parameter-shaped tensor."""
    m = _EXPERT.match(name)
    if m is None:
        return {name: tensor}
    base = m.group(1)
    if m.group(5) is None:  # stock: one local expert
        e = ep_rank * num_local + int(m.group(2))
        return {f"{base}{e}.{m.group(3)}.weight": tensor}
    fc = "linear_fc1" if m.group(5) == "w_up" else "linear_fc2"
    return {f"{base}{ep_rank * num_local + i}.{fc}.weight": tensor[i]
            for i in range(num_local)}


def snapshot(ddp, opt, sched, weights_only=False) -> dict:
    """Canonical copies of the weights, the optimizer state and groups, the scheduler state;
    gathered over the ranks (the same on every rank afterwards)."""
    ep = parallel_state.get_expert_model_parallel_world_size()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    num_local = EXPERTS // ep
    names = {p: n for n, p in ddp.module.named_parameters()}
    out = {"weight": {}, "param": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for n, p in ddp.module.named_parameters():
        out["weight"].update(_canonical(n, p.detach().clone(), ep_rank, num_local))
    for sub in [] if weights_only else sub_optimizers(opt):
        # every rank gets every DP rank's shards, concatenated per buffer
        world = sub.get_parameter_state_dp_zero(use_gloo_comm=True, return_on_all_ranks=True)
        for gbuf_idx, buffer in enumerate(sub.buffers):
            (tensors,) = world[gbuf_idx].values()
            for p, (start, end, _) in buffer.param_index_map.items():
                for key in ("param", "exp_avg", "exp_avg_sq"):
                    full = tensors[key][start:end].view(p.shape).clone()
                    out[key].update(_canonical(names[p], full, ep_rank, num_local))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, out)
    merged = {k: {} for k in out}
    for part in gathered:
        for k, d in part.items():
            for n, t in d.items():
                if n in merged[k]:  # replicated on several ranks: the copies agree
                    assert torch.equal(merged[k][n], t), (k, n)
                merged[k][n] = t
    if weights_only:
        return merged
    # the groups' hyper-parameters (EP > 1 has the experts' group twice: dense and expert)
    merged["groups"] = sorted({(g["wd_mult"], g["lr_mult"], g["lr"], g["weight_decay"],
                                g["max_lr"], g["min_lr"]) for g in opt.param_groups})
    # every optimizer's Adam step count (torch keeps one per parameter)
    merged["adam_steps"] = sorted({float(s["step"]) for sub in sub_optimizers(opt)
                                   for s in sub.optimizer.state.values()})
    merged["scheduler"] = sched.state_dict()
    return merged


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def compare(got: dict, ref: dict, what: str, res: dict, exact: bool) -> None:
    """Exact: every tensor equal (a copy); else the largest relative L2 error per kind."""
    for kind in ("weight", "param", "exp_avg", "exp_avg_sq"):
        if set(got[kind]) != set(ref[kind]):
            res[f"{what}_{kind}_names"] = sorted(set(got[kind]) ^ set(ref[kind]))[:6]
            continue
        if exact:
            bad = [n for n in ref[kind] if not torch.equal(got[kind][n], ref[kind][n])]
            res[f"{what}_{kind}_equal"] = bad == [] or bad[:4]
        else:
            res[f"{what}_{kind}_err"] = max(rel(got[kind][n], ref[kind][n]) for n in ref[kind])
    res[f"{what}_groups_equal"] = got["groups"] == ref["groups"] or [got["groups"],
                                                                     ref["groups"]]
    res[f"{what}_adam_steps_equal"] = got["adam_steps"] == ref["adam_steps"] or \
        [got["adam_steps"], ref["adam_steps"]]
    res[f"{what}_scheduler_equal"] = got["scheduler"] == ref["scheduler"] or \
        [got["scheduler"], ref["scheduler"]]


def update(after: dict, before: dict) -> dict:
    """The weights' change over one step, per canonical name."""
    return {n: after["weight"][n] - before["weight"][n] for n in after["weight"]}


def check_next_step(ddp, opt, sched, it: int, before: dict, ref_before: dict, ref_after: dict,
                    ref_loss: float, name: str, res: dict) -> dict:
    """Step ``it`` after a resume against the uninterrupted run's: the loss, the state (within
    fp32 rounding) and the update itself. Returns the state after the step."""
    res[f"{name}_loss_err"] = abs(train_step(ddp, opt, sched, it) - ref_loss) / abs(ref_loss)
    after = snapshot(ddp, opt, sched)
    compare(after, ref_after, name, res, exact=False)
    upd, ref_upd = update(after, before), update(ref_after, ref_before)
    res[f"{name}_update_err"], res[f"{name}_update_worst"] = max(
        (rel(upd[n], ref_upd[n]), n) for n in ref_upd)
    return after


def run(tmp: str) -> dict:
    res = {}
    ws = dist.get_world_size()
    # 1. stock, EP=1: steps 1-2, checkpoint A, then the uninterrupted steps 3 and 4
    reinit(1)
    ddp, opt, sched = build(False, 1, seed=5)
    ref_loss = {it: train_step(ddp, opt, sched, it) for it in (1, 2)}
    save_checkpoint(os.path.join(tmp, "A"), 2, ddp, opt, sched, consumed_samples=8)
    state_a = snapshot(ddp, opt, sched)
    ref_loss[3] = train_step(ddp, opt, sched, 3)
    ref3 = snapshot(ddp, opt, sched)
    ref_loss[4] = train_step(ddp, opt, sched, 4)
    ref4 = snapshot(ddp, opt, sched)
    res["ref_losses"] = [ref_loss[i] for i in (1, 2, 3, 4)]
    res["ref_step4_moved_experts"] = min(
        rel(ref4["weight"][n], ref3["weight"][n]) for n in ref4["weight"] if ".experts." in n) > 0

    # 2. plugin, EP=ws: load A, compare, step 3, checkpoint B
    reinit(ws)
    ddp, opt, sched = build(True, ws, seed=6)
    fresh = snapshot(ddp, opt, sched, weights_only=True)
    res["fresh_plugin_differs"] = not torch.equal(
        fresh["weight"]["decoder.layers.0.mlp.experts.0.linear_fc1.weight"],
        state_a["weight"]["decoder.layers.0.mlp.experts.0.linear_fc1.weight"])
    res["plugin_chained"] = len(sub_optimizers(opt))
    common = load_checkpoint(os.path.join(tmp, "A"), ddp, opt, sched)
    res["common_a"] = common == {"iteration": 2, "consumed_samples": 8} or str(common)
    compare(snapshot(ddp, opt, sched), state_a, "stock_to_plugin", res, exact=True)
    plugin3 = check_next_step(ddp, opt, sched, 3, state_a, state_a, ref3, ref_loss[3],
                              "plugin_step3", res)
    save_checkpoint(os.path.join(tmp, "B"), 3, ddp, opt, sched, consumed_samples=12)

    # 3. stock, EP=1: load B, compare with the plugin's state, step 4
    reinit(1)
    ddp, opt, sched = build(False, 1, seed=7)
    common = load_checkpoint(os.path.join(tmp, "B"), ddp, opt, sched)
    res["common_b"] = common == {"iteration": 3, "consumed_samples": 12} or str(common)
    compare(snapshot(ddp, opt, sched), plugin3, "plugin_to_stock", res, exact=True)
    check_next_step(ddp, opt, sched, 4, plugin3, ref3, ref4, ref_loss[4], "stock_step4", res)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--dir", required=True, help="checkpoint folder (shared by the ranks)")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    try:
        res = run(args.dir)
    except Exception as ex:  # reported; the test fails on it
        import traceback
        res = {"error": repr(ex)[:500], "trace": traceback.format_exc()[-3000:]}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, res)
    if dist.get_rank() == 0:
        with open(args.out, "w") as fh:
            json.dump(gathered, fh, indent=1, default=str)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    from torchrun_exit import exit_now
    exit_now(0)
