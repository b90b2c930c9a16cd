"""Expert-parallel benchmark (2+ GPUs, NCCL): dispatch / combine against a raw all-to-all of
the same bytes, and an MoE layer forward+backward with the shared-expert overlap on and off.

    torchrun --nproc_per_node=2 benchmarks/bench_ep.py --json out.json --md out.md

Timing: every rank runs the same fixed number of iterations (collectives must match), timed
with CUDA events after warm-up; the reported figure is the median over iterations of the
slowest rank. Bandwidth = bytes this rank sends / time (rows × packed row bytes).
"""
import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist
from report import emit, run_meta

CONFIGS = {  # name: (tokens per rank, D, F, E, k, shared FFN)
    "fine_30b": (8192, 4096, 512, 128, 8, 2048),
    "mixtral": (4096, 4096, 14336, 8, 2, 14336),
}


def timed(fn, iters, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    t = torch.tensor([statistics.median(times)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def routing(T, E, k, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(T, E, device="cuda", generator=g)
    w, ids = torch.softmax(logits, -1).topk(k, dim=-1)
    return ids.to(torch.int32), (w / w.sum(-1, keepdim=True))


def bench_config(name, args, group):
    from moe_plugin import MoELayer
    from moe_plugin.comm.dispatch import AllToAllBackend, combine, dispatch, dispatch_layout
    from moe_plugin.kernels.pack import pack_rows, packed_row_bytes
    T, D, F, E, k, FS = CONFIGS[name]
    rank, P = dist.get_rank(group), dist.get_world_size(group)
    backend = AllToAllBackend()
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    ids, w = routing(T, E, k, seed=rank)
    res = {"config": name, "tokens_per_rank": T, "D": D, "F": F, "E": E, "k": k, "ep": P}

    recv, layout = dispatch(x, ids, w, E, group, backend)
    row_bytes = packed_row_bytes(D, x.dtype)
    send_bytes = layout.num_send * row_bytes
    # dispatch data path (pack + exchange, layout given); the layout (sort, count exchange,
    # one host sync) is timed on its own, and the whole dispatch too
    res["layout_ms"] = timed(lambda: dispatch_layout(ids, E, group), args.iters)
    res["dispatch_ms"] = timed(lambda: backend.exchange(
        pack_rows(x, ids, w, layout.send_slot, layout.num_local_experts).buf,
        layout.send_splits, layout.recv_splits, group), args.iters)
    res["dispatch_total_ms"] = timed(lambda: dispatch(x, ids, w, E, group, backend),
                                     args.iters)
    send_buf = torch.empty(layout.num_send, row_bytes, dtype=torch.uint8, device="cuda")
    out_buf = torch.empty(layout.num_recv, row_bytes, dtype=torch.uint8, device="cuda")
    res["raw_dispatch_ms"] = timed(lambda: dist.all_to_all_single(
        out_buf, send_buf, layout.recv_splits, layout.send_splits, group=group), args.iters)
    y_recv = torch.randn(layout.num_recv, D, device="cuda", dtype=torch.bfloat16)
    res["combine_ms"] = timed(lambda: combine(y_recv, layout, x.dtype), args.iters)
    y_back = torch.empty(layout.num_send, D, device="cuda", dtype=torch.bfloat16)
    res["raw_combine_ms"] = timed(lambda: dist.all_to_all_single(
        y_back, y_recv, layout.send_splits, layout.recv_splits, group=group), args.iters)
    comb_bytes = layout.num_recv * D * 2
    res["dispatch_GBps"] = send_bytes / res["dispatch_ms"] / 1e6
    res["raw_dispatch_GBps"] = send_bytes / res["raw_dispatch_ms"] / 1e6
    res["combine_GBps"] = comb_bytes / res["combine_ms"] / 1e6
    res["raw_combine_GBps"] = comb_bytes / res["raw_combine_ms"] / 1e6
    res["dispatch_vs_raw"] = res["raw_dispatch_ms"] / res["dispatch_ms"]
    res["combine_vs_raw"] = res["raw_combine_ms"] / res["combine_ms"]
    del send_buf, out_buf, y_back, recv

    # layer forward+backward, shared expert on a side stream (overlap) or inline
    for overlap in (True, False):
        torch.manual_seed(0)
        layer = MoELayer(D, F, E, k, num_shared_experts=1, shared_ffn_dim=FS,
                         shared_expert_overlap=overlap, ep_group=group,
                         dtype=torch.bfloat16, device="cuda")
        xin = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dout = torch.randn_like(xin)

        def step():
            out, _ = layer(xin)
            out.backward(dout)
        res[f"layer_fwd_bwd_ms_overlap_{'on' if overlap else 'off'}"] = timed(step, args.iters)
        del layer
    # time of the layer's all-to-alls: forward dispatch + combine and their backward twins
    a2a = 2 * (res["raw_dispatch_ms"] + res["raw_combine_ms"])
    res["a2a_ms_per_fwd_bwd"] = a2a
    res["hidden_fraction"] = (res["layer_fwd_bwd_ms_overlap_off"]
                              - res["layer_fwd_bwd_ms_overlap_on"]) / a2a
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args()
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    group = dist.group.WORLD
    rows = [bench_config(name, args, group) for name in args.configs]
    if dist.get_rank() == 0:
        meta = run_meta(gpus=dist.get_world_size())
        for r in rows:
            print(json.dumps(r), flush=True)
        md = [f"{meta['gpus']}× {meta['device']}, torch {meta['torch']}, triton "
              f"{meta['triton']}, {meta['date']}. dispatch = pack + exchange (layout given); "
              "layout = sort + count exchange + host sync; total = the whole dispatch.", "",
              "| config | dispatch ms (GB/s) | raw a2a ms (GB/s) | dispatch/raw | layout ms | "
              "dispatch total ms | combine ms (GB/s) | raw a2a ms (GB/s) | combine/raw | "
              "layer fwd+bwd ms overlap on / off | a2a ms per fwd+bwd | hidden |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            md.append(
                f"| {r['config']} | {r['dispatch_ms']:.3f} ({r['dispatch_GBps']:.0f}) | "
                f"{r['raw_dispatch_ms']:.3f} ({r['raw_dispatch_GBps']:.0f}) | "
                f"{r['dispatch_vs_raw']:.2f} | {r['layout_ms']:.3f} | "
                f"{r['dispatch_total_ms']:.3f} | {r['combine_ms']:.3f} ({r['combine_GBps']:.0f}) "
                f"| {r['raw_combine_ms']:.3f} ({r['raw_combine_GBps']:.0f}) | "
                f"{r['combine_vs_raw']:.2f} | {r['layer_fwd_bwd_ms_overlap_on']:.2f} / "
                f"{r['layer_fwd_bwd_ms_overlap_off']:.2f} | {r['a2a_ms_per_fwd_bwd']:.2f} | "
                f"{r['hidden_fraction'] * 100:.0f}% |")
        emit("\n".join(md) + "\n", args.md, args.json, {"meta": meta, "rows": rows})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
