"""Host time of one ``fused_experts`` (or ``fused_moe``) forward + backward on a machine without
a GPU: the Triton interpreter's launches are replaced by no-ops, so what is timed is the Python
and PyTorch work around the kernels -- autograd, the custom ops' calls, argument checks, the
launchers' configuration and grids, the metadata's torch ops -- which a GPU step waits for
where the host is the bottleneck (fine_7b: ``profile_kernels.py --host``). The kernels' own
launch path (Triton's binding, or ``fast_launch``) is not in it: ``launch_cost.py`` times
that. Outputs a stubbed kernel would write are zeros (``torch.empty`` & co. zero-filled in
this process), so index tensors stay in range. Each figure alternates ``tuning.eager_ops`` on
and off (the custom ops called directly or through PyTorch's dispatcher).

    python benchmarks/host_cost.py [--mode experts|moe] [--steps 300] [--profile 25]
"""
import argparse
import cProfile
import json
import os
import pstats
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton / moe_plugin are imported

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

InterpretedFunction.run = lambda self, *args, **kwargs: None
for _name in ("empty", "empty_like"):
    setattr(torch, _name, (lambda make: lambda *a, **k: make(*a, **k).zero_())(
        getattr(torch, _name)))
_new_empty = torch.Tensor.new_empty
torch.Tensor.new_empty = lambda self, *a, **k: _new_empty(self, *a, **k).zero_()

from moe_plugin import fused_experts, fused_moe  # noqa: E402
from moe_plugin.kernels import tuning  # noqa: E402


def make_step(mode: str, T=64, D=64, F=32, E=8, k=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    ids = torch.randint(0, E, (T, k), generator=g)
    w = torch.rand(T, k, generator=g, requires_grad=True)
    w_up = torch.randn(E, 2 * F, D, generator=g, requires_grad=True)
    w_down = torch.randn(E, D, F, generator=g, requires_grad=True)
    gate = torch.randn(E, D, generator=g, requires_grad=True)
    gout = torch.randn(T, D)

    def step():
        if mode == "experts":
            out = fused_experts(x, ids, w, w_up, w_down, "swiglu", validate_ids=False)
        else:
            out = fused_moe(x, gate, w_up, w_down, k, activation="swiglu")[0]
        out.backward(gout)
    return step


def timed(step, steps: int) -> float:
    """Microseconds a forward + backward (after 30 untimed)."""
    for _ in range(30):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("experts", "moe"), default="experts")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also the N functions with the most own time (cProfile)")
    args = ap.parse_args(argv)
    step = make_step(args.mode)
    res = {"direct": [], "dispatched": []}
    for _ in range(args.rounds):
        for name, on in (("direct", True), ("dispatched", False)):
            with tuning.override(eager_ops=on):
                res[name].append(round(timed(step, args.steps), 1))
    print(json.dumps({"mode": args.mode, "host_us_per_fwd_bwd": res}))
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            step()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
