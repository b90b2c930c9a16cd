"""Quantised formats of the expert GEMMs' operands, and the helpers that produce them.

Two formats (``QUANT_MODES``):

``"fp8"`` (``quant="fp8_block"`` in training) -- DeepSeek-V3's block-scaled e4m3:

* activations ``[M, K]``: one fp32 scale per row and group of ``GROUP`` = 128 consecutive
  columns along K (``scale [M, ceil(K/128)]``); ``x ≈ q · scale``.
* weights ``[E, N, K]``: one fp32 scale per 128 × 128 block (``scale [E, ceil(N/128),
  ceil(K/128)]``). A square block keeps its scale when the GEMM uses the weight transposed
  (the backward's dgrad), so one quantised copy serves both directions.
* scale = amax / 448 (e4m3's largest finite value) of the group or block, at least
  ``1e-12 / 448`` so an all-zero group quantises to zeros.

``"int8"`` -- W8A8 with symmetric scales:

* activations ``[M, K]``: one scale per row (per token, computed on the fly): ``scale [M]``.
* weights ``[E, N, K]``: one scale per output channel (row ``n`` of ``W[e]``): ``scale [E, N]``.
* scale = amax / 127; values are rounded to nearest (ties to even) and clamped to ±127.

The fp8 quantisers run as one Triton pass each on CUDA tensors (``kernels/quantize.py``,
bitwise the same as the plain-PyTorch references ``_quantize_fp8_*_torch`` used elsewhere);
nothing here synchronises with the host. The GEMM kernels consume these tensors directly
(``kernels/grouped_gemm.py``, ``QUANT``).

``cached_weight`` quantises a weight for the FP8 training path: anew in every call by default,
or once per ``WeightCache`` refresh (tied to the optimizer step by ``cache_quantized_weights``),
so that micro-batches of one step share the copy.
"""
from __future__ import annotations

import weakref

import torch

__all__ = ["QUANT_MODES", "GROUP", "FP8_MAX", "INT8_MAX", "quantize_fp8_rows",
           "quantize_fp8_blocks", "quantize_int8_rows", "quantize_int8_channels",
           "dequantize_rows", "dequantize_weight", "quantize_expert_weights", "cached_weight",
           "WeightCache", "cache_quantized_weights"]

QUANT_MODES = ("fp8", "int8")
GROUP = 128          # fp8: columns per activation scale, rows and columns per weight block
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
_TINY = 1e-12


def _check_float(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if not t.is_floating_point() or t.dtype == FP8_DTYPE:
        raise TypeError(f"{name}: expected a floating-point (unquantised) tensor, got {t.dtype}")


def _div_fp8_max(amax: torch.Tensor) -> torch.Tensor:
    """``amax / 448`` with IEEE division on every device (the fp8 scale): dividing by a Python
    scalar, PyTorch's CUDA kernel multiplies by the reciprocal, which differs in the last bit
    for some values (and from the Triton quantisers, which divide)."""
    return amax / torch.full_like(amax, FP8_MAX)


def _pad_last(t: torch.Tensor, mult: int) -> torch.Tensor:
    pad = -t.shape[-1] % mult
    return torch.nn.functional.pad(t, (0, pad)) if pad else t


def quantize_fp8_rows(x: torch.Tensor):
    """``x [M, K]`` → ``(q e4m3 [M, K], scale fp32 [M, ceil(K/128)])``, one scale per row
    and 128 consecutive columns. CUDA tensors: one Triton pass (``kernels/quantize.py``, the
    same values bitwise); otherwise plain PyTorch."""
    _check_float("x", x, 2)
    if x.is_cuda:
        from .kernels.quantize import fp8_quantize_rows
        return fp8_quantize_rows(x)
    return _quantize_fp8_rows_torch(x)


def _quantize_fp8_rows_torch(x: torch.Tensor, group: int = GROUP):
    """The reference of ``quantize_fp8_rows`` in plain PyTorch."""
    m, k = x.shape
    groups = -(-k // group)
    xp = _pad_last(x.float(), group).view(m, groups, group)
    scale = _div_fp8_max(xp.abs().amax(-1).clamp(min=_TINY))
    q = (xp / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(m, groups * group)[:, :k].contiguous(), scale.contiguous()


def quantize_fp8_blocks(w: torch.Tensor):
    """``w [E, N, K]`` → ``(q e4m3 [E, N, K], scale fp32 [E, ceil(N/128), ceil(K/128)])``,
    one scale per 128 × 128 tile. CUDA tensors: one Triton pass, else plain PyTorch."""
    _check_float("w", w, 3)
    return _fp8_blocks(w, transposed=False)[:2]


def _fp8_blocks(w: torch.Tensor, transposed: bool):
    """``(q, scale, q_t)``: Triton on CUDA tensors (``q_t`` a K-major copy when
    ``transposed``), else PyTorch (``q_t`` = ``q``: the layout matters to tensor cores only)."""
    if w.is_cuda:
        from .kernels.quantize import fp8_quantize_blocks
        return fp8_quantize_blocks(w, transposed=transposed)
    q, s = _quantize_fp8_blocks_torch(w)
    return q, s, (q if transposed else None)


def _quantize_fp8_blocks_torch(w: torch.Tensor, block: int = GROUP):
    """The reference of ``quantize_fp8_blocks`` in plain PyTorch."""
    e, n, k = w.shape
    wp = _pad_last(w.float(), block)
    wp = _pad_last(wp.transpose(1, 2), block).transpose(1, 2)  # pad N too
    nb, kb = wp.shape[1] // block, wp.shape[2] // block
    tiles = wp.reshape(e, nb, block, kb, block)
    scale = _div_fp8_max(tiles.abs().amax(dim=(2, 4)).clamp(min=_TINY))
    q = (tiles / scale[:, :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.reshape(e, nb * block, kb * block)[:, :n, :k].contiguous(), scale.contiguous()


def quantize_int8_rows(x: torch.Tensor):
    """``x [M, K]`` → ``(q int8 [M, K], scale fp32 [M])``, one scale per row (per token)."""
    _check_float("x", x, 2)
    xf = x.float()
    scale = xf.abs().amax(-1).clamp(min=_TINY) / INT8_MAX
    q = torch.round(xf / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_int8_channels(w: torch.Tensor):
    """``w [E, N, K]`` → ``(q int8 [E, N, K], scale fp32 [E, N])``, one scale per output
    channel (row ``n`` of each expert's matrix)."""
    _check_float("w", w, 3)
    wf = w.float()
    scale = wf.abs().amax(-1).clamp(min=_TINY) / INT8_MAX
    q = torch.round(wf / scale[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Inverse of ``quantize_fp8_rows`` (2-D scale) or ``quantize_int8_rows`` (1-D scale)."""
    m, k = q.shape
    if scale.dim() == 1:
        return (q.to(dtype) * scale.to(dtype)[:, None])
    full = scale.to(dtype).repeat_interleave(GROUP, dim=1)[:, :k]
    return q.to(dtype) * full


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Inverse of ``quantize_fp8_blocks`` (3-D scale) or ``quantize_int8_channels`` (2-D)."""
    e, n, k = q.shape
    if scale.dim() == 2:
        return q.to(dtype) * scale.to(dtype)[..., None]
    full = scale.to(dtype).repeat_interleave(GROUP, 1).repeat_interleave(GROUP, 2)[:, :n, :k]
    return q.to(dtype) * full


def quantize_expert_weights(w_up: torch.Tensor, w_down: torch.Tensor, quant_mode: str):
    """``(w_up_q, w_up_scale, w_down_q, w_down_scale)`` for ``fused_moe_quantized``: fp8
    128 × 128 blocks or int8 per output channel, from high-precision ``w_up [E, 2F|F, D]`` and
    ``w_down [E, D, F]``."""
    if quant_mode not in QUANT_MODES:
        raise ValueError(f"quant_mode: expected one of {list(QUANT_MODES)}, got {quant_mode!r}")
    fn = quantize_fp8_blocks if quant_mode == "fp8" else quantize_int8_channels
    with torch.no_grad():
        return (*fn(w_up.detach()), *fn(w_down.detach()))


class WeightCache:
    """Quantised copies of weights, reused from one ``refresh()`` to the next.

    Without a cache the FP8 training path quantises each weight in every forward (always
    right, whatever wrote the weights). A cache keeps one copy per weight and mode until
    ``refresh()``, so the micro-batches of one optimizer step share it. It must be refreshed
    whenever the weights change in a way PyTorch cannot see: a write through ``.data`` (e.g.
    ``p.data.copy_(new)``) does not bump ``_version``, so a version check alone would keep a
    stale copy. Tie the refresh to what writes the weights: ``refresh_on_step(optimizer)``
    (every ``step()``), and ``cache_quantized_weights(model, optimizer)`` also refreshes after
    the layers' ``load_state_dict``. A copy is also dropped when the weight's ``_version``,
    storage, shape or dtype change. ``generation`` counts the refreshes."""

    def __init__(self):
        self.generation = 0
        self._copies = {}  # (id(weight), mode) -> (weakref to the weight, its state, copy)

    def refresh(self) -> None:
        """Drops every copy: the next forward quantises each weight again."""
        self.generation += 1
        self._copies.clear()

    def _lookup(self, w: torch.Tensor, mode: str, state):
        entry = self._copies.get((id(w), mode))
        if entry is not None and entry[0]() is w and entry[1] == state:
            return entry[2]
        return None

    def _store(self, w: torch.Tensor, mode: str, state, out) -> None:
        self._copies[(id(w), mode)] = (weakref.ref(w), state, out)

    def refresh_on_step(self, optimizer):
        """Refreshes after every ``optimizer.step()``: a ``torch.optim.Optimizer`` through its
        step post-hook (the returned handle removes it), any other object with a ``step``
        method (e.g. Megatron-Core's ``MegatronOptimizer`` / ``ChainedOptimizer``) by wrapping
        that method on the instance (returns None)."""
        if isinstance(optimizer, torch.optim.Optimizer):
            return optimizer.register_step_post_hook(lambda *_: self.refresh())
        step = getattr(optimizer, "step", None)
        if not callable(step):
            raise TypeError(f"optimizer: expected an object with a step() method, got "
                            f"{type(optimizer).__name__}")

        def step_then_refresh(*args, **kwargs):
            try:
                return step(*args, **kwargs)
            finally:
                self.refresh()
        optimizer.step = step_then_refresh
        return None


def cache_quantized_weights(model: torch.nn.Module, optimizer) -> WeightCache:
    """Gives every moe_plugin layer of ``model`` (modules with a ``quant_weight_cache``
    attribute: ``MoELayer``, the Megatron ``PluginMoELayer``) one shared ``WeightCache``,
    refreshed after every ``optimizer.step()`` and after a layer's ``load_state_dict``.
    Returns the cache (call ``refresh()`` after writing weights any other way)."""
    layers = [m for m in model.modules() if hasattr(m, "quant_weight_cache")]
    if not layers:
        raise ValueError(f"model: no moe_plugin layer (MoELayer, PluginMoELayer) in "
                         f"{type(model).__name__}")
    cache = WeightCache()
    cache.refresh_on_step(optimizer)
    for layer in layers:
        layer.quant_weight_cache = cache
        layer.register_load_state_dict_post_hook(lambda *_: cache.refresh())
    return cache


def check_weight_cache(weight_cache) -> None:
    if weight_cache is not None and not isinstance(weight_cache, WeightCache):
        raise TypeError(f"weight_cache: expected None or a moe_plugin.quant.WeightCache, got "
                        f"{type(weight_cache).__name__}")


def cached_weight(w: torch.Tensor, quant_mode: str, cache: "WeightCache | None" = None):
    """``(q, scale, q_t)`` of weight ``w`` in ``quant_mode``.

    Without ``cache`` the weight is quantised now. With one, the cache's copy is reused until
    its ``refresh()`` (see ``WeightCache``) or until ``w._version`` (bumped by in-place updates
    autograd sees), its storage, shape or dtype change.

    ``q_t`` (fp8; None for int8): the same values stored transposed (K-major strides, shape
    of ``q``), the operand layout of the dgrad GEMMs (``kernels/quantize.py``). On CPU it is
    ``q`` itself (no tensor cores: the layout does not matter there).

    Under CUDA graph capture the weight is always quantised (and nothing cached): the graph
    then re-quantises on every replay. A cached copy would be baked into the graph and go
    stale after the first optimizer step, silently (the checks run on the host, at capture
    only)."""
    capturing = w.is_cuda and torch.cuda.is_current_stream_capturing()
    use_cache = cache is not None and not capturing
    if use_cache:
        state = (w._version, w.data_ptr(), tuple(w.shape), w.dtype)
        kept = cache._lookup(w, quant_mode, state)
        if kept is not None:
            return kept
    with torch.no_grad():
        if quant_mode != "fp8":
            out = (*quantize_int8_channels(w.detach()), None)
        else:
            out = _fp8_blocks(w.detach(), transposed=True)
    if use_cache:
        cache._store(w, quant_mode, state, out)
    return out
