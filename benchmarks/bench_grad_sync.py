"""Benchmark of gradient synchronisation for a dense transformer's parameters, data parallel.

Times "backward + gradient all-reduce" per iteration (forward not timed) in three ways:
  * ``backward_only``   -- backward, no communication (the floor)
  * ``flat_allreduce``  -- backward, then one all-reduce of all gradients copied into one flat
                           buffer, divided by the world size and copied back into ``.grad``
  * ``overlap``         -- ``moe_plugin.OverlappedGradSync``: bucketed all-reduces launched
                           during backward on a side stream, then ``finish()``
and, separately, ``allreduce_only``: the flat all-reduce alone (the communication cost).
"Exposed communication" = time - backward_only. One check iteration compares the overlapped
gradients with the flat ones (same inputs).

Timing: ``torch.cuda.synchronize()`` and a barrier before each timed iteration, wall clock
(perf_counter) to after ``synchronize()``; median over iterations, then the slowest rank.

    # two GPUs, NCCL (defaults: d_model 1024, 16 layers, vocab 32768, seq 1024, batch 8, bf16
    # -- about 268M parameters)
    torchrun --nproc_per_node=2 benchmarks/bench_grad_sync.py \
        --json benchmarks/results/h100_grad_sync.json \
        --markdown benchmarks/results/h100_grad_sync.md
    # CPU smoke check with gloo (small model)
    torchrun --nproc_per_node=2 benchmarks/bench_grad_sync.py --json /tmp/grad_sync.json
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from report import emit

GPU_DEFAULTS = dict(d_model=1024, layers=16, heads=16, vocab=32768, seq=1024, batch=8,
                    dtype="bfloat16", iters=20, warmup=5)
CPU_DEFAULTS = dict(d_model=128, layers=2, heads=4, vocab=512, seq=64, batch=2,
                    dtype="float32", iters=5, warmup=2)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Block(torch.nn.Module):
    def __init__(self, d, heads, dtype, device):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(d, **kw)
        self.qkv = torch.nn.Linear(d, 3 * d, **kw)
        self.proj = torch.nn.Linear(d, d, **kw)
        self.norm2 = torch.nn.LayerNorm(d, **kw)
        self.fc1 = torch.nn.Linear(d, 4 * d, **kw)
        self.fc2 = torch.nn.Linear(4 * d, d, **kw)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class DenseLM(torch.nn.Module):
    """GPT-style decoder: token + position embeddings, pre-norm blocks, untied head."""

    def __init__(self, vocab, d, layers, heads, seq, dtype, device):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.tok = torch.nn.Embedding(vocab, d, **kw)
        self.pos = torch.nn.Embedding(seq, d, **kw)
        self.blocks = torch.nn.ModuleList(Block(d, heads, dtype, device) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(d, **kw)
        self.head = torch.nn.Linear(d, vocab, bias=False, **kw)

    def forward(self, tokens):
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


def loss_of(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                           tokens[:, 1:].reshape(-1))


class FlatAllReduce:
    """The baseline: after backward, copy all grads into one flat buffer, one all-reduce, divide,
    copy back."""

    def __init__(self, params, dtype):
        self.params = params
        n = sum(p.numel() for p in params)
        self.flat = torch.empty(n, dtype=dtype, device=params[0].device)
        self.views, o = [], 0
        for p in params:
            self.views.append(self.flat[o:o + p.numel()].view(p.shape))
            o += p.numel()

    def __call__(self, world):
        torch._foreach_copy_(self.views, [p.grad for p in self.params])
        dist.all_reduce(self.flat)
        self.flat.div_(world)
        torch._foreach_copy_([p.grad for p in self.params], self.views)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for k in ("d_model", "layers", "heads", "vocab", "seq", "batch", "iters", "warmup"):
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    ap.add_argument("--dtype", choices=list(DTYPES), default=None,
                    help="parameter dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--grad-dtype", choices=list(DTYPES), default=None,
                    help="communication dtype of OverlappedGradSync and of the flat baseline "
                         "(default: the parameters' dtype)")
    ap.add_argument("--bucket-cap-mb", type=float, default=25.0)
    ap.add_argument("--backend", default=None, help="default: nccl with CUDA, else gloo")
    ap.add_argument("--json", default=None, help="write the results here (rank 0)")
    ap.add_argument("--markdown", default=None, help="also write a markdown table here")
    args = ap.parse_args()

    use_cuda = torch.cuda.is_available() and args.backend != "gloo"
    backend = args.backend or ("nccl" if use_cuda else "gloo")
    cfg = dict(GPU_DEFAULTS if use_cuda else CPU_DEFAULTS)
    for k in cfg:
        if getattr(args, k, None) is not None:
            cfg[k] = getattr(args, k)
    dtype = DTYPES[cfg["dtype"]]
    comm_dtype = DTYPES[args.grad_dtype] if args.grad_dtype else dtype

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()

    from moe_plugin.comm import OverlappedGradSync, get_dense_params

    torch.manual_seed(0)  # the same weights on every rank
    model = DenseLM(cfg["vocab"], cfg["d_model"], cfg["layers"], cfg["heads"], cfg["seq"] + 1,
                    dtype, device)
    params = get_dense_params(model)  # reverse registration order = backward order here
    n_params = sum(p.numel() for p in params)
    gen = torch.Generator(device=device).manual_seed(1234 + rank)

    def tokens():
        return torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"] + 1), device=device,
                             generator=gen)

    def sync_all():
        if use_cuda:
            torch.cuda.synchronize()
        dist.barrier()
        if use_cuda:
            torch.cuda.synchronize()

    def timed(step_fn, n):
        """step_fn(loss): backward + sync; returns per-iteration ms."""
        out = []
        for _ in range(n):
            model.zero_grad(set_to_none=True)
            loss = loss_of(model, tokens())
            sync_all()
            t0 = time.perf_counter()
            step_fn(loss)
            if use_cuda:
                torch.cuda.synchronize()
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    flat = FlatAllReduce(params, comm_dtype)
    modes = {}

    def backward_only(loss):
        loss.backward()

    def flat_allreduce(loss):
        loss.backward()
        flat(world)

    for name, fn in (("backward_only", backward_only), ("flat_allreduce", flat_allreduce)):
        timed(fn, cfg["warmup"])
        modes[name] = timed(fn, cfg["iters"])

    # the all-reduce alone
    for _ in range(cfg["warmup"]):
        dist.all_reduce(flat.flat)
    comm = []
    for _ in range(cfg["iters"]):
        sync_all()
        t0 = time.perf_counter()
        dist.all_reduce(flat.flat)
        if use_cuda:
            torch.cuda.synchronize()
        comm.append((time.perf_counter() - t0) * 1e3)
    modes["allreduce_only"] = comm

    sync = OverlappedGradSync(params, bucket_cap_mb=args.bucket_cap_mb,
                              grad_dtype=comm_dtype if args.grad_dtype else None)
    n_buckets = len(sync.buckets)

    def overlap(loss):
        loss.backward()
        sync.finish()

    timed(overlap, cfg["warmup"])
    modes["overlap"] = timed(overlap, cfg["iters"])

    # check: the same inputs through both paths
    state = gen.get_state()
    model.zero_grad(set_to_none=True)
    overlap(loss_of(model, tokens()))
    got = [p.grad.clone() for p in params]
    sync.remove()
    gen.set_state(state)
    model.zero_grad(set_to_none=True)
    flat_allreduce(loss_of(model, tokens()))
    num = sum((a.double() - p.grad.double()).norm().item() ** 2 for a, p in zip(got, params))
    den = sum(p.grad.double().norm().item() ** 2 for p in params)
    rel_err = math.sqrt(num / den) if den > 0 else math.sqrt(num)

    # median per rank, then the slowest rank
    med = torch.tensor([statistics.median(modes[m]) for m in sorted(modes)], dtype=torch.float64)
    med = med.to(device)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    med = dict(zip(sorted(modes), med.tolist()))
    err = torch.tensor([rel_err], dtype=torch.float64, device=device)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)

    if rank == 0:
        base = med["backward_only"]
        result = dict(
            benchmark="bench_grad_sync", world_size=world, backend=backend,
            device=torch.cuda.get_device_name(device) if use_cuda else platform.processor()
            or platform.machine(),
            torch=torch.__version__, config=cfg, param_dtype=str(dtype),
            comm_dtype=str(comm_dtype), dense_params=n_params,
            grad_bytes=n_params * comm_dtype.itemsize, bucket_cap_mb=args.bucket_cap_mb,
            num_buckets=n_buckets,
            median_ms=med,
            exposed_comm_ms={m: med[m] - base for m in ("flat_allreduce", "overlap")},
            speedup_overlap_vs_flat=med["flat_allreduce"] / med["overlap"],
            allreduce_bus_gbps=(2 * (world - 1) / world * n_params * comm_dtype.itemsize
                                / (med["allreduce_only"] * 1e-3) / 1e9),
            grad_rel_err_overlap_vs_flat=err.item(),
            per_iteration_ms_rank0=modes,
        )
        lines = [
            f"# Gradient sync: {n_params / 1e6:.1f}M dense parameters, {world} x {result['device']}"
            f" ({backend}), params {cfg['dtype']}, comm {str(comm_dtype).replace('torch.', '')}",
            "",
            "| mode | median ms | exposed comm ms |",
            "|---|---:|---:|",
            f"| backward only (no comm) | {med['backward_only']:.2f} | - |",
            f"| backward, then one flat all-reduce | {med['flat_allreduce']:.2f} | "
            f"{med['flat_allreduce'] - base:.2f} |",
            f"| backward with OverlappedGradSync ({args.bucket_cap_mb:g} MiB buckets) + finish |"
            f" {med['overlap']:.2f} | {med['overlap'] - base:.2f} |",
            f"| flat all-reduce alone | {med['allreduce_only']:.2f} | - |",
            "",
            f"Overlap vs flat: {result['speedup_overlap_vs_flat']:.2f}x; gradients agree to "
            f"{result['grad_rel_err_overlap_vs_flat']:.1e} (relative L2).",
        ]
        emit("\n".join(lines) + "\n", args.markdown, args.json, result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
