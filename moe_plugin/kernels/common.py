"""Small helpers shared by the kernel launch wrappers."""
import functools
import os

import torch


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host code (``triton.cdiv`` is a constexpr function: a call from
    Python pays for unwrapping its arguments, ~1-3 µs)."""
    return -(-a // b)


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (the persistent kernels' program count)."""
    return torch.cuda.get_device_properties(device).multi_processor_count
