"""A training step's forward + backward captured in one CUDA graph.

Small models train host-bound: the GPU finishes each kernel before Python has launched the
next one (the 24-layer pretraining model of ``docs/megatron.md``, for one). Replaying a
captured graph launches the whole forward + backward with one call. moe_plugin's single-GPU
MoE path has no host synchronisation, so it captures; stock Megatron-Core's MoE layers
(host-side token counts) and the expert-parallel path (one host synchronisation per layer to
size its receive buffers) do not.

What a captured step may do: its inputs are copied into static buffers before every replay,
and it must not synchronise with the host or depend on host-side values that change between
steps. Gradients: a parameter whose ``.grad`` is None at capture gets a tensor from the graph's
memory pool that each replay overwrites (PyTorch's whole-network recipe: one backward per
step). To accumulate over replays (micro-batches), the gradients must be in memory that
outlives the capture: every parameter holds a ``.grad`` before capture (zeroed in place between
steps: ``zero_grad(set_to_none=False)``), or hooks accumulate into persistent buffers, as
Megatron's ``DistributedDataParallel`` does with ``main_grad``. The warm-up runs (before
capture, on a side stream, as PyTorch requires) execute ``fn`` for real: reset what they
accumulated (gradients, loss trackers) afterwards.

A parameter's gradient-accumulator node, once created, records the stream current at that
moment, and backward accumulates its gradient there. Wrappers that take these nodes to hook
them (Megatron's ``DistributedDataParallel``, PyTorch's DDP) must therefore be built under a
side stream (``with side_stream(): ...``): built on the default stream, capture fails with
"operation would make the legacy stream depend on a capturing blocking stream".
"""
import contextlib
from typing import Any, Callable, Dict, Iterator

import torch


@contextlib.contextmanager
def side_stream() -> Iterator[torch.cuda.Stream]:
    """Runs the block on a fresh CUDA stream that first waits for the current one, and makes
    the current stream wait for it afterwards: the way PyTorch asks for work that must not
    happen on the default stream before a capture (warm-up runs, building DDP wrappers)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        yield side
    torch.cuda.current_stream().wait_stream(side)


class GraphedStep:
    """``fn(**inputs)`` (a forward + backward returning tensors, e.g. the loss) as a CUDA graph.

    Args:
        fn: the step; called ``warmup`` times eagerly, then once under capture.
        inputs: example CUDA tensors by name; the graph keeps static copies of them.
        warmup: eager runs before capture (first-call work: Triton compiles, cuBLAS handles,
            lazily allocated state).

    Calling ``step(**inputs)`` copies the inputs into the static buffers (same names, shapes
    and dtypes), replays the graph and returns the static output: the next replay overwrites
    it, so consume it (stream-ordered ops are fine) before calling again. ``fn`` may return a
    tensor or a tuple of tensors (e.g. the loss and ``torch.autograd.grad``'s gradients).
    """

    def __init__(self, fn: Callable[..., Any], inputs: Dict[str, torch.Tensor], *,
                 warmup: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedStep needs CUDA")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (first calls compile and allocate), "
                             f"got {warmup}")
        for name, t in inputs.items():
            if not isinstance(t, torch.Tensor) or not t.is_cuda:
                raise ValueError(f"inputs['{name}'] must be a CUDA tensor")
        self.inputs = {name: t.detach().clone() for name, t in inputs.items()}
        with side_stream():
            for _ in range(warmup):
                fn(**self.inputs)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(**self.inputs)

    def __call__(self, **inputs: torch.Tensor) -> Any:
        if inputs.keys() != self.inputs.keys():
            raise ValueError(f"GraphedStep inputs: expected {sorted(self.inputs)}, "
                             f"got {sorted(inputs)}")
        for name, t in inputs.items():
            dst = self.inputs[name]
            if t.shape != dst.shape or t.dtype != dst.dtype:
                raise ValueError(f"inputs['{name}']: captured with {tuple(dst.shape)} "
                                 f"{dst.dtype}, got {tuple(t.shape)} {t.dtype}")
            dst.copy_(t, non_blocking=True)
        self.graph.replay()
        return self.output
