"""Tests of ``OverlappedGradSync`` and ``get_dense_params``.

Distributed cases run in several processes (gloo on CPU, world sizes 2 and 4; NCCL on two GPUs
under the ``gpu`` marker). Each world size is one spawn that runs every scenario and reports per
scenario "ok" or the failure; the pytest items below assert on those reports. The reference is
always the plain thing: a copy of the model run through the same micro-batches with ordinary
``backward()`` (gradients accumulating in ``.grad``), then one synchronous ``dist.all_reduce``
per parameter and a division by the group size; a parameter that got no gradient on a rank counts
as zeros there, and one that got none on any rank must keep ``.grad is None``.

Tolerances (relative L2 error per parameter): fp32 1e-6 (bucketed and per-tensor all-reduce may
add in a different order; the multi-round case adds one rounding of W·avg/W); bf16 1e-2 (the
project's bf16 tolerance: a different summation order of bf16 values can change the last bit).
"""
from __future__ import annotations

import copy
import datetime
import os
import pickle
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_plugin.comm import OverlappedGradSync, get_dense_params, get_expert_params

FP32_REL = 1e-6
BF16_REL = 1e-2
D = 8              # model width
N_EXPERTS = 4
TINY_MB = 0.0005   # 524 bytes: the 256-element (1 KiB) fp32 weights are larger than a bucket


# ------------------------------------------------------------------------------------------------
# model and data


class ToyMoE(torch.nn.Module):
    """Dense layers, a frozen layer, a dense parameter never used, and "experts" whose use the
    caller chooses per rank (rank-dependent graphs: different backward order, unused experts)."""

    def __init__(self, dtype=torch.float32, head_dtype=None, device="cpu"):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.inp = torch.nn.Linear(D, 4 * D, **kw)             # weight: 256 elements
        self.frozen = torch.nn.Linear(4 * D, 4 * D, **kw)      # requires_grad=False from the start
        self.frozen.requires_grad_(False)
        self.mid = torch.nn.Linear(4 * D, D, **kw)             # weight: 256 elements
        self.later_frozen = torch.nn.Linear(D, D, **kw)        # frozen after the sync is built
        self.experts = torch.nn.ModuleList(torch.nn.Linear(D, D, **kw) for _ in range(N_EXPERTS))
        for i, e in enumerate(self.experts):
            for p in e.parameters():
                if i == 0:
                    p.allreduce = False                        # Megatron's convention
                else:
                    p.moe_expert = True                        # this project's convention
        self.never = torch.nn.Parameter(torch.zeros(D, **kw))  # dense, never gets a gradient
        self.head = torch.nn.Linear(D, 1, dtype=head_dtype or dtype, device=device)

    def forward(self, x, experts=(0,), probe=None):
        h = torch.tanh(self.inp(x))
        if probe is not None:
            h.register_hook(probe)
        h = torch.tanh(self.mid(self.frozen(h)))
        h = h + self.later_frozen(h)
        for e in experts:
            h = h + torch.tanh(self.experts[e](h))
        return self.head(h.to(self.head.weight.dtype)).float().pow(2).sum()


def experts_for(rank: int, world: int, micro: int) -> list[int]:
    """Expert 0 everywhere; 1 only on rank 0; 2 only on the last rank in micro-batch 0; 3 nowhere.
    Odd ranks run them in reverse order (another backward order)."""
    ids = [0] + ([1] if rank == 0 else []) + ([2] if rank == world - 1 and micro == 0 else [])
    return ids[::-1] if rank % 2 else ids


def batch(rank: int, micro: int, step: int, dtype, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    return torch.randn(5, D, generator=g).to(device, dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


# ------------------------------------------------------------------------------------------------
# helpers that run inside the worker processes


class CountAllReduce:
    """Counts calls of ``dist.all_reduce`` (the sync object looks it up at call time)."""

    def __enter__(self):
        self.n = 0
        self._orig = dist.all_reduce

        def counting(*args, **kwargs):
            self.n += 1
            return self._orig(*args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def reference_grads(ref: torch.nn.Module, ctx: dict, edp_group=None, fp32_acc=None,
                    expert_divisor=None) -> dict:
    """name -> grad (None if no rank has one): plain synchronous all_reduce of the accumulated
    ``.grad`` (or of the fp32 accumulators ``fp32_acc``) over the dense / expert group, divided by
    the group size (experts: by ``expert_divisor`` if given)."""
    out = {}
    for name, p in ref.named_parameters():
        if not p.requires_grad:
            out[name] = None
            continue
        expert = name.startswith("experts.")
        group = edp_group if (expert and edp_group is not None) else None
        world = dist.get_world_size(group)
        if expert and expert_divisor is not None:
            world = expert_divisor
        g = fp32_acc.get(name) if fp32_acc is not None else p.grad
        t = torch.zeros(p.shape, dtype=torch.float32 if fp32_acc is not None else p.dtype,
                        device=p.device) if g is None else g.clone()
        flag = torch.tensor([0.0 if g is None else 1.0], device=p.device)
        dist.all_reduce(t, group=group)
        dist.all_reduce(flag, group=group)
        out[name] = (t / world).to(p.dtype) if flag.item() > 0 else None
    return out


def compare(model: torch.nn.Module, ref: dict, tol: float) -> None:
    for name, p in model.named_parameters():
        r = ref[name]
        if r is None:
            assert p.grad is None, f"{name}: expected grad None (no rank produced one)"
            continue
        assert p.grad is not None, f"{name}: grad is None, reference is not"
        assert p.grad.dtype == p.dtype and p.grad.shape == p.shape, name
        err = rel_err(p.grad, r)
        assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"


def make_pair(ctx, dtype=torch.float32, head_dtype=None, seed=0):
    torch.manual_seed(seed)
    model = ToyMoE(dtype, head_dtype, ctx["device"])
    ref = copy.deepcopy(model)
    return model, ref


def build_sync(model, ctx, edp_group=None, **kw):
    kw.setdefault("bucket_cap_mb", TINY_MB)
    sync = OverlappedGradSync(get_dense_params(model), expert_params=get_expert_params(model),
                              expert_group=edp_group, **kw)
    model.later_frozen.requires_grad_(False)  # frozen after construction: hooks never fire
    return sync


def run_window(model, ctx, step, n_micro, no_sync_upto, sync=None):
    """n_micro backward passes; the first ``no_sync_upto`` inside ``sync.no_sync()``."""
    rank, world, dev = ctx["rank"], ctx["world"], ctx["device"]
    dtype = model.inp.weight.dtype
    for m in range(n_micro):
        loss = model(batch(rank, m, step, dtype, dev), experts_for(rank, world, m))
        if sync is not None and m < no_sync_upto:
            with sync.no_sync():
                loss.backward()
        else:
            loss.backward()


def window_and_reference(ctx, n_micro, no_sync_upto, edp_group=None, dtype=torch.float32,
                         head_dtype=None, tol=FP32_REL, **kw):
    model, ref = make_pair(ctx, dtype, head_dtype)
    sync = build_sync(model, ctx, edp_group, **kw)
    expert_divisor = kw.get("expert_grad_divisor")
    ref.later_frozen.requires_grad_(False)
    with CountAllReduce() as c:
        run_window(model, ctx, 0, n_micro, no_sync_upto, sync)
        sync.finish()
    run_window(ref, ctx, 0, n_micro, 0)
    compare(model, reference_grads(ref, ctx, edp_group, expert_divisor=expert_divisor), tol)
    return sync, c.n, model


# ------------------------------------------------------------------------------------------------
# scenarios (each runs on every rank; raise on failure)


def sc_sync_every_backward(ctx):
    """Three backward passes, none in no_sync: one round of all-reduces per backward pass, and
    .grad = mean of the per-rank sums; finish() twice is a no-op."""
    sync, calls, _ = window_and_reference(ctx, 3, 0)
    n = len(sync.buckets)
    assert n >= 6, f"expected several tiny buckets, got {n}"
    assert calls == 3 * n, (calls, n)
    with CountAllReduce() as c:
        sync.finish()
    assert c.n == 0


def sc_no_sync(ctx):
    """Two no_sync micro-batches then one synced: communication only in the last backward."""
    sync, calls, _ = window_and_reference(ctx, 3, 2)
    assert calls == len(sync.buckets), (calls, len(sync.buckets))


def sc_all_no_sync(ctx):
    """Every micro-batch in no_sync: finish() launches the whole window (one round)."""
    sync, calls, _ = window_and_reference(ctx, 2, 2)
    assert calls == len(sync.buckets)


def sc_big_buckets(ctx):
    """Default 25 MiB buckets: one bucket per kind/dtype; same result."""
    sync, _, _ = window_and_reference(ctx, 2, 1, bucket_cap_mb=25)
    assert [b["kind"] for b in sync.buckets].count("dense") == 1
    assert [b["kind"] for b in sync.buckets].count("expert") == 1


def sc_expert_group(ctx):
    """Experts over the expert-data-parallel group, dense over the world."""
    edp = ctx["edp_group"]
    sync, _, _ = window_and_reference(ctx, 3, 2, edp_group=edp)
    assert {b["kind"] for b in sync.buckets} == {"dense", "expert"}


def sc_expert_group_every_backward(ctx):
    window_and_reference(ctx, 2, 0, edp_group=ctx["edp_group"])


def sc_expert_grad_divisor(ctx):
    """Expert sums over the expert group divided by the data-parallel size (Megatron's scaling
    under expert parallelism), with one multi-round window (carry of the group mean)."""
    for n_micro, no_sync_upto in ((3, 2), (2, 0)):
        window_and_reference(ctx, n_micro, no_sync_upto, edp_group=ctx["edp_group"],
                             expert_grad_divisor=ctx["world"] * 2)


def sc_bf16(ctx):
    """bf16 gradients communicated in bf16, a fp32 head in its own bucket set."""
    sync, _, model = window_and_reference(ctx, 3, 2, dtype=torch.bfloat16,
                                          head_dtype=torch.float32, tol=BF16_REL)
    assert {b["dtype"] for b in sync.buckets} == {torch.bfloat16, torch.float32}
    assert model.inp.weight.grad.dtype == torch.bfloat16
    assert model.head.weight.grad.dtype == torch.float32


def sc_bf16_fp32_comm(ctx):
    """bf16 gradients accumulated and reduced in fp32 (grad_dtype), .grad back in bf16; the
    reference accumulates the per-micro-batch bf16 grads in fp32 likewise."""
    model, ref = make_pair(ctx, torch.bfloat16)
    sync = build_sync(model, ctx, grad_dtype=torch.float32)
    ref.later_frozen.requires_grad_(False)
    assert {b["dtype"] for b in sync.buckets} == {torch.float32}
    run_window(model, ctx, 0, 3, 2, sync)
    sync.finish()
    acc = {}
    for m in range(3):
        ref(batch(ctx["rank"], m, 0, torch.bfloat16, ctx["device"]),
            experts_for(ctx["rank"], ctx["world"], m)).backward()
        for name, p in ref.named_parameters():
            if p.grad is not None:
                acc[name] = acc.get(name, 0) + p.grad.float()
                p.grad = None
    compare(model, reference_grads(ref, ctx, fp32_acc=acc), BF16_REL)


def sc_many_steps(ctx):
    """12 optimizer steps, windows of 1 to 3 micro-batches, no_sync on some: exact-to-1e-6 grads
    every step; one hook per parameter, the same buffers, nothing left pending."""
    model, ref = make_pair(ctx)
    sync = build_sync(model, ctx)
    ref.later_frozen.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ptrs = [b.buffer.data_ptr() for b in sync._order]
    hooked = [p for p in model.parameters() if p.requires_grad]
    for step in range(12):
        n_micro = 1 + step % 3
        no_sync_upto = (n_micro - 1) if step % 2 == 0 else 0
        ref.load_state_dict(model.state_dict())
        run_window(model, ctx, step, n_micro, no_sync_upto, sync)
        sync.finish()
        run_window(ref, ctx, step, n_micro, 0)
        compare(model, reference_grads(ref, ctx), FP32_REL)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        assert all(len(p._post_accumulate_grad_hooks or {}) == 1 for p in hooked)
        assert [b.buffer.data_ptr() for b in sync._order] == ptrs
        assert all(b.work is None and not b.sum_pending for b in sync._order)
        assert not sync._pending and not sync._round_open
        assert all(float(b.buffer.abs().max()) == 0 for b in sync._order), "buffers not reset"


def sc_overlap(ctx):
    """The all-reduces start during backward: when backward reaches the output of `inp`, the
    buckets of `head` and `mid` have been launched, those of `inp` not yet (the rest at the end
    of the backward pass)."""
    model, _ = make_pair(ctx)
    m = model
    sync = OverlappedGradSync([m.head.bias, m.head.weight, m.mid.bias, m.mid.weight, m.inp.bias,
                               m.inp.weight], bucket_cap_mb=TINY_MB)
    assert [b["num_params"] for b in sync.buckets] == [3, 1, 1, 1], sync.buckets
    seen = []
    loss = model(batch(ctx["rank"], 0, 0, torch.float32, ctx["device"]), [0],
                 probe=lambda g: seen.append(sync._next))
    loss.backward()
    n = len(sync.buckets)
    assert seen == [2], (seen, n)
    assert sync._next == n  # the rest at the end of the backward pass
    sync.finish()


def sc_remove(ctx):
    """remove(): no hooks left, no communication, backward leaves the local grads."""
    model, ref = make_pair(ctx)
    sync = build_sync(model, ctx)
    sync.remove()
    assert all(not (p._post_accumulate_grad_hooks or {}) for p in model.parameters())
    ref.later_frozen.requires_grad_(False)
    with CountAllReduce() as c:
        run_window(model, ctx, 0, 2, 0)
        run_window(ref, ctx, 0, 2, 0)
        sync.finish()
    assert c.n == 0
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name


def sc_nothing_pending(ctx):
    """finish() with nothing pending: no collective, fast."""
    model, _ = make_pair(ctx)
    sync = build_sync(model, ctx)
    with CountAllReduce() as c:
        t0 = time.perf_counter()
        for _ in range(100):
            sync.finish()
        dt = time.perf_counter() - t0
    assert c.n == 0 and dt < 0.05, (c.n, dt)
    assert all(p.grad is None for p in model.parameters())


def sc_layout_mismatch(ctx):
    """Different parameters on one rank: ValueError on every rank at construction (no hang)."""
    model, _ = make_pair(ctx)
    params = get_dense_params(model)
    if ctx["rank"] == 0:
        params = params + [torch.nn.Parameter(torch.zeros(3, device=ctx["device"]))]
    try:
        OverlappedGradSync(params)
    except ValueError as e:
        assert "different bucket layouts" in str(e)
    else:
        raise AssertionError("no ValueError for different layouts")


def sc_bad_args(ctx):
    model, _ = make_pair(ctx)
    dense, experts = get_dense_params(model), get_expert_params(model)
    for kw, exc, word in ((dict(bucket_cap_mb=0), ValueError, "bucket_cap_mb"),
                          (dict(grad_dtype=torch.int32), TypeError, "grad_dtype"),
                          (dict(expert_grad_divisor=0), ValueError, "expert_grad_divisor"),
                          (dict(expert_params=dense[:1]), ValueError, "expert_params")):
        try:
            OverlappedGradSync(dense, **kw)
        except exc as e:
            assert word in str(e), (word, str(e))
        else:
            raise AssertionError(f"no {exc.__name__} for {kw}")
    try:
        OverlappedGradSync(dense[0])
    except TypeError as e:
        assert "params" in str(e)
    else:
        raise AssertionError("no TypeError for a single tensor")
    assert experts and all(getattr(p, "moe_expert", False) or p.allreduce is False
                           for p in experts)


def sc_probe_consistent(ctx):
    """get_dense_params with rank-dependent example inputs: rank 0's probed order everywhere."""
    model, _ = make_pair(ctx)
    names = {id(p): n for n, p in model.named_parameters()}
    x = batch(ctx["rank"], 0, 0, torch.float32, ctx["device"])
    order = [names[id(p)] for p in get_dense_params(
        model, example_inputs=(x, experts_for(ctx["rank"], ctx["world"], 0)))]
    everyone = [None] * ctx["world"]
    dist.all_gather_object(everyone, order)
    assert all(o == everyone[0] for o in everyone), everyone
    assert order[0] == "head.bias" or order[0] == "head.weight", order


SCENARIOS = {name[3:]: fn for name, fn in globals().items() if name.startswith("sc_")}


def _worker(rank, world, init_file, backend, out_dir):
    results = {}
    try:
        torch.set_num_threads(1)
        device = "cpu"
        if backend == "nccl":
            torch.cuda.set_device(rank)
            device = f"cuda:{rank}"
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=60))
        # expert-data-parallel groups: pairs of ranks ({0,1}, {2,3}); with 2 ranks a distinct
        # group object over both
        groups = [dist.new_group(list(range(s, min(s + 2, world)))) for s in range(0, world, 2)]
        ctx = dict(rank=rank, world=world, device=device, edp_group=groups[rank // 2])
        for name, fn in SCENARIOS.items():
            try:
                fn(ctx)
                results[name] = "ok"
            except Exception:
                results[name] = traceback.format_exc()
            dist.barrier()
        dist.destroy_process_group()
    except Exception:
        results["_setup"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)


def run_world(world: int, backend: str = "gloo", timeout: float = 120.0) -> list[dict]:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_worker, args=(r, world, init_file, backend, tmp))
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.time() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.time()))
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
            p.join()
        results = []
        for r in range(world):
            path = os.path.join(tmp, f"{r}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    results.append(pickle.load(f))
            else:
                results.append({})
    if hung:
        pytest.fail(f"{len(hung)} of {world} worker(s) hung (killed after {timeout:.0f} s); "
                    f"reports: {results}")
    return results


_RESULTS: dict = {}


def _results(world: int, backend: str = "gloo") -> list[dict]:
    key = (world, backend)
    if key not in _RESULTS:
        _RESULTS[key] = run_world(world, backend)
    return _RESULTS[key]


def _check(results: list[dict], name: str) -> None:
    for rank, res in enumerate(results):
        assert "_setup" not in res, f"rank {rank} set-up failed:\n{res['_setup']}"
        assert res.get(name) == "ok", f"rank {rank}, scenario {name}:\n{res.get(name)}"


# ------------------------------------------------------------------------------------------------
# pytest items


@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.parametrize("world", [2, 4])
def test_gloo(world, name):
    _check(_results(world), name)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_nccl_two_gpus(name):
    _check(_results(2, "nccl"), name)


# -- single process ------------------------------------------------------------------------------


class Shuffled(torch.nn.Module):
    """Registration order differs from use order; dropout (RNG) and a tied weight."""

    def __init__(self):
        super().__init__()
        self.c = torch.nn.Linear(4, 4)
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.e = torch.nn.Linear(4, 4)
        self.e.weight.moe_expert = True
        self.e.bias.allreduce = False
        self.tied = torch.nn.Linear(4, 4)
        self.tied.weight = self.a.weight
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        h = torch.nn.functional.dropout(self.frozen(self.a(x)), 0.5)
        return self.c(self.e(self.b(h))) + self.tied(h)


def _hook_order(model, x) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    order = []
    hs = [p.register_post_accumulate_grad_hook(lambda p: order.append(names[id(p)]))
          for p in model.parameters() if p.requires_grad]
    model(x).sum().backward()
    for h in hs:
        h.remove()
    return order


def test_get_dense_params_selection_and_default_order():
    m = Shuffled()
    names = {id(p): n for n, p in m.named_parameters()}
    reg = [n for n, p in m.named_parameters() if p.requires_grad and not n.startswith("e.")]
    assert [names[id(p)] for p in get_dense_params(m, backward_order=False)] == reg
    assert [names[id(p)] for p in get_dense_params(m)] == reg[::-1]
    assert [names[id(p)] for p in get_expert_params(m, backward_order=False)] == ["e.weight",
                                                                                   "e.bias"]
    assert "tied.weight" not in reg and "frozen.weight" not in reg  # tied once, frozen left out


def test_get_dense_params_probe_matches_backward():
    m = Shuffled()
    x = torch.randn(3, 4)
    names = {id(p): n for n, p in m.named_parameters()}
    torch.manual_seed(7)
    probed = [names[id(p)] for p in get_dense_params(m, example_inputs=x)]
    after_probe = torch.rand(4)
    torch.manual_seed(7)
    assert torch.equal(after_probe, torch.rand(4)), "the probe changed the RNG state"
    assert all(p.grad is None for p in m.parameters()), "the probe left gradients"
    real = [n for n in _hook_order(m, x) if not n.startswith("e.")]
    assert probed == real, (probed, real)
    default = [names[id(p)] for p in get_dense_params(m)]
    assert probed != default, "the model should make the default order differ from the real one"


def test_needs_init_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        OverlappedGradSync(list(Shuffled().parameters()))
