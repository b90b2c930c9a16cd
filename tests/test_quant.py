"""Quantised experts: the formats (moe_plugin.quant), the INT8 / FP8 inference entry point
``fused_moe_quantized`` and FP8 block-scaled training (``quant="fp8_block"``).

Two kinds of check:

* against a *simulation* of the same quantisation in float64 (``reference.experts_quantized``
  and ``_fp8_train_sim`` below): the kernels must compute exactly what the format defines,
  to fp32 (CPU interpreter) or bf16 (GPU) accuracy;
* against the unquantised float64 reference: the error the format itself costs, bounded per
  format (random-normal data, e4m3's 3 mantissa bits: ~6% relative L2 measured; int8
  per-channel/per-token: ~2%).

On CPU the kernels run in fp32 under the interpreter (its fp32 -> e4m3 cast is emulated, see
``_round_e4m3``); on a GPU in bf16.
"""
import pytest
import torch
import triton
import triton.language as tl

from conftest import BF16_TOL, DEVICE, FP32_TOL, HAS_CUDA, assert_close, rel_err
from moe_plugin import MoELayer, fused_experts, fused_moe, fused_moe_quantized, quant as Q
from moe_plugin import reference
from moe_plugin.kernels import gluon_gemm as GF
from moe_plugin.kernels import grouped_gemm as G
from moe_plugin.kernels import quantize as KQ
from moe_plugin.kernels import tuning
from moe_plugin.kernels import wgrad_fp8 as W8

DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
TOL = BF16_TOL if HAS_CUDA else FP32_TOL
# what re-quantising an intermediate (h, dpre) may add: a value computed in a different
# order can round to the neighbouring e4m3 / int8 level
REQUANT_TOL = 3e-2 if HAS_CUDA else 2e-3
# the formats' own error against unquantised float64 on these random-normal problems
FORMAT_TOL = {"fp8": 0.10, "int8": 0.04}


def _problem(seed, n=16, d=128, f=128, e=4, k=2, dtype=DTYPE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w_up = torch.randn(e, 2 * f, d, generator=g) / d ** 0.5
    w_down = torch.randn(e, d, f, generator=g) / f ** 0.5
    logits = torch.randn(n, e, generator=g)
    w, ids = torch.softmax(logits, -1).topk(k)
    to = dict(device=DEVICE, dtype=dtype)
    return (x.to(**to), ids.to(DEVICE, torch.int32), w.to(DEVICE), w_up.to(**to),
            w_down.to(**to))


# ----------------------------------------------------------------------------------------------
# formats


@pytest.mark.parametrize("shape", [(5, 128), (3, 300), (0, 64)])
def test_fp8_rows_format(shape):
    x = torch.randn(*shape) * 7
    q, s = Q.quantize_fp8_rows(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.shape == (shape[0], -(-shape[1] // 128)) and s.dtype == torch.float32
    if x.numel():
        # the largest magnitude of every group maps to 448 (e4m3's largest finite value)
        groups = torch.nn.functional.pad(q.float().abs(), (0, -shape[1] % 128))
        assert torch.equal(groups.view(shape[0], -1, 128).amax(-1), torch.full_like(s, 448.0))
        assert rel_err(Q.dequantize_rows(q, s), x) < 0.04


def test_fp8_blocks_format_and_zero_block():
    w = torch.randn(2, 200, 300)
    w[1, :128, :128] = 0
    q, s = Q.quantize_fp8_blocks(w)
    assert s.shape == (2, 2, 3)
    assert (q[1, :128, :128].float() == 0).all() and s[1, 0, 0] > 0
    # every block is scaled on its own: a block 1000x larger does not touch its neighbours
    w2 = w.clone()
    w2[0, 128:, 128:256] *= 1000
    q2, s2 = Q.quantize_fp8_blocks(w2)
    assert torch.equal(q2[0, :128].float(), q[0, :128].float())
    assert rel_err(Q.dequantize_weight(q, s), w) < 0.04


def test_int8_formats():
    x = torch.randn(6, 50)
    q, s = Q.quantize_int8_rows(x)
    assert q.dtype == torch.int8 and s.shape == (6,)
    assert torch.equal(q.abs().amax(1), torch.full((6,), 127, dtype=torch.int8))
    assert rel_err(Q.dequantize_rows(q, s), x) < 0.01
    w = torch.randn(3, 40, 50)
    qw, sw = Q.quantize_int8_channels(w)
    assert sw.shape == (3, 40)
    assert rel_err(Q.dequantize_weight(qw, sw), w) < 0.01


def test_quant_helpers_reject_bad_input():
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        Q.quantize_fp8_rows(torch.randn(3))
    with pytest.raises(TypeError, match="w: expected a floating-point"):
        Q.quantize_int8_channels(torch.zeros(2, 3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="quant_mode"):
        Q.quantize_expert_weights(torch.randn(1, 2, 2), torch.randn(1, 2, 1), "int4")


def test_cached_weight_without_a_cache_quantises_anew():
    w = torch.nn.Parameter(torch.randn(2, 256, 128, device=DEVICE))
    q1, s1, t1 = Q.cached_weight(w, "fp8")
    # the dgrad copy: the same values, K-major (on a GPU a separate transposed copy)
    assert t1.shape == q1.shape
    assert torch.equal(t1.contiguous().view(torch.uint8), q1.view(torch.uint8))
    if HAS_CUDA:
        assert t1.stride() == (256 * 128, 1, 256)
    q2, _, _ = Q.cached_weight(w, "fp8")
    assert q2 is not q1 and torch.equal(q2.view(torch.uint8), q1.view(torch.uint8))
    w.data.mul_(2)  # a write autograd does not see (no _version bump)
    assert torch.allclose(Q.cached_weight(w, "fp8")[1], 2 * s1)
    assert Q.cached_weight(w, "int8")[2] is None


def test_weight_cache_keeps_a_copy_until_refreshed():
    w = torch.nn.Parameter(torch.randn(2, 256, 128, device=DEVICE))
    cache = Q.WeightCache()
    q1, s1, _ = Q.cached_weight(w, "fp8", cache)
    assert Q.cached_weight(w, "fp8", cache)[0] is q1  # micro-batches of one step share it
    assert Q.cached_weight(w, "fp8")[0] is not q1     # no cache: anew
    with torch.no_grad():
        w.mul_(2)  # an in-place update autograd sees drops the copy by itself
    q2, s2, _ = Q.cached_weight(w, "fp8", cache)
    assert q2 is not q1 and torch.allclose(s2, 2 * s1)
    w.data.mul_(2)  # one it does not see keeps it until the refresh ...
    assert Q.cached_weight(w, "fp8", cache)[0] is q2
    cache.refresh()  # ... which drops it
    assert torch.allclose(Q.cached_weight(w, "fp8", cache)[1], 4 * s1)


def test_fp8_experts_follow_weights_written_through_data():
    """Optimizers that write the model's weights through ``.data`` (Megatron-Core's) do not
    bump ``_version``: by default the FP8 path still uses the new weights; a ``WeightCache``
    tied to the optimizer's ``step`` does too."""
    x, ids, w, w_up, w_down = _problem(11)
    w_down = torch.nn.Parameter(w_down)
    assert fused_experts(x, ids, w, w_up, w_down, quant="fp8_block").abs().max() > 0
    w_down.data.mul_(0)
    assert fused_experts(x, ids, w, w_up, w_down, quant="fp8_block").abs().max() == 0

    class DataWriter:  # an optimizer that is not a torch.optim.Optimizer, writing via .data
        def step(self):
            w_down.data.copy_(torch.ones_like(w_down))
            return "stepped"
    for opt in (DataWriter(), torch.optim.SGD([w_down], lr=1.0)):
        cache = Q.WeightCache()
        hook = cache.refresh_on_step(opt)
        assert (hook is None) == isinstance(opt, DataWriter)
        w_down.data.zero_()
        out0 = fused_experts(x, ids, w, w_up, w_down, quant="fp8_block", weight_cache=cache)
        assert out0.abs().max() == 0
        if isinstance(opt, DataWriter):
            assert opt.step() == "stepped"
        else:
            w_down.grad = -torch.ones_like(w_down)
            opt.step()
        out1 = fused_experts(x, ids, w, w_up, w_down, quant="fp8_block", weight_cache=cache)
        assert torch.equal(out1, fused_experts(x, ids, w, w_up, w_down, quant="fp8_block"))
        assert out1.abs().max() > 0


def test_cache_quantized_weights_on_a_model():
    """``cache_quantized_weights`` gives every moe_plugin layer one cache, refreshed after each
    optimizer step and after ``load_state_dict``; a model without such a layer is refused."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        MoELayer(128, 128, 4, 2, quant="fp8_block", dtype=DTYPE, device=DEVICE),
        MoELayer(128, 128, 4, 2, quant="fp8_block", dtype=DTYPE, device=DEVICE))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cache = Q.cache_quantized_weights(model, opt)
    assert all(m.quant_weight_cache is cache for m in model)
    x = torch.randn(8, 128, device=DEVICE, dtype=DTYPE)
    generations = [cache.generation]
    model[0](x)[0].float().sum().backward()
    opt.step()
    generations.append(cache.generation)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    generations.append(cache.generation)
    assert generations[0] < generations[1] < generations[2]
    with pytest.raises(ValueError, match="model"):
        Q.cache_quantized_weights(torch.nn.Linear(2, 2), opt)
    with pytest.raises(TypeError, match="weight_cache"):
        fused_experts(x, torch.zeros(8, 2, dtype=torch.long, device=DEVICE),
                      torch.ones(8, 2, device=DEVICE), model[0].w_up, model[0].w_down,
                      quant="fp8_block", weight_cache="yes")


@pytest.mark.parametrize("shape", [(37, 300), (8, 128), (1, 1000), (0, 64)])
def test_fp8_rows_kernel_equals_torch(shape):
    """The one-pass Triton quantiser (used for CUDA tensors) is bitwise the PyTorch reference:
    scales, values, ragged last group, a row count that is no multiple of the row tile, an
    all-zero row."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(*shape, generator=g) * torch.logspace(-3, 3, shape[1])).to(DEVICE, DTYPE)
    if shape[0] > 2:
        x[2] = 0
    q, s = KQ.fp8_quantize_rows(x)
    q_ref, s_ref = KQ.quantize_fp8_rows_torch(x)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_fp8_rows_kernel_in_expert_order():
    """dout quantised straight into expert order (the FP8 dh' GEMM's A operand): row p is the
    quantised token row ``sorted_slot[p] // k``, bitwise the reference on the gathered rows;
    rows past the routed slots (unused slots) are zeros."""
    from moe_plugin.kernels.quantize import quantize_rows_expert_order
    from moe_plugin.kernels.permute import permute_metadata
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(9, 300, generator=g) * 3).to(DEVICE, DTYPE)
    ids = torch.randint(0, 3, (9, 2), generator=g, dtype=torch.int32)
    ids[1, 0] = ids[6, 1] = -1
    meta = permute_metadata(ids.to(DEVICE), 3)
    got = quantize_rows_expert_order(x, meta)
    valid = int(meta.offsets[-1])
    rows = meta.sorted_slot[:valid].long() // 2
    q_ref, s_ref = KQ.quantize_fp8_rows_torch(x[rows])
    assert got.q.shape == (18, 300) and valid == 16
    assert torch.equal(got.scale[:valid], s_ref)
    assert torch.equal(got.q[:valid].view(torch.uint8), q_ref.view(torch.uint8))
    assert not got.q[valid:].view(torch.uint8).any()


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "geglu_erf", "gelu_erf"])
def test_act_quant_pass_equals_fused_gemm1_epilogue(activation):
    """Where GEMM1 runs as the Gluon kernel (Hopper), h comes from a pass over the stored
    pre-activation (``act_quant``); it must give the fused Triton epilogue's h and scales
    bitwise, for the routed rows."""
    from moe_plugin.config import check_activation
    from moe_plugin.kernels.quantize import quantize_rows_expert_order
    from moe_plugin.kernels.permute import permute_metadata
    act, gated = check_activation(activation)
    x, ids, w, w_up, w_down = _problem(6, n=40, d=128, f=256, e=4)
    if not gated:
        w_up = w_up[:, :256].contiguous()
    ids[3, 1] = -1
    meta = permute_metadata(ids, 4)
    wq = KQ.QTensor(*Q.cached_weight(w_up, "fp8"))
    with tuning.override(gluon=False):  # the fused Triton epilogue, even on Hopper
        pre, hq = G.expert_up(quantize_rows_expert_order(x, meta), wq, meta, act, gated,
                              store_pre=True, store_h=False, out_dtype=x.dtype, quant_h=True,
                              expert_order=True)
    got = G.act_quant(pre, meta, act, gated)
    valid = int(meta.offsets[-1])
    assert torch.equal(got.scale[:valid], hq.scale[:valid])
    assert torch.equal(got.q[:valid].view(torch.uint8), hq.q[:valid].view(torch.uint8))


def test_fp8_blocks_kernel_equals_torch():
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(3, 200, 300, generator=g) * 5).to(DEVICE, DTYPE)
    w[1, :128, :128] = 0
    q, s, q_t = KQ.fp8_quantize_blocks(w, transposed=True)
    q_ref, s_ref = KQ.quantize_fp8_blocks_torch(w)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert q_t.shape == q.shape and q_t.stride() == (300 * 200, 1, 200)
    assert torch.equal(q_t.contiguous().view(torch.uint8), q.view(torch.uint8))
    assert KQ.fp8_quantize_blocks(w)[2] is None


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + i, mask=i < n, other=0.0)
    tl.store(y_ptr + i, KQ._round_e4m3(v), mask=i < n)


def test_e4m3_rounding_emulation_matches_torch():
    """The interpreter-only rounding helper equals torch's fp32 -> e4m3 cast (ties to even,
    subnormals, the binade carries that the interpreter's own cast gets wrong), bit for bit:
    -0.0 (and negatives rounding to zero) keep their sign."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(3000, generator=g) * 100, torch.randn(1000, generator=g) * 1e-2,
                   torch.tensor([0.0, -0.0, -1e-6, 448.0, -448.0, 124.6, 2 ** -10, 1.5 * 2 ** -9,
                                 17.0, 19.0, 9.0 * 2 ** -7])]).clamp(-448, 448).to(DEVICE)
    y = torch.empty_like(x)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    assert torch.equal(y.view(torch.int32), x.to(torch.float8_e4m3fn).float().view(torch.int32))


# ----------------------------------------------------------------------------------------------
# inference entry point


@pytest.mark.parametrize("mode", ["fp8", "int8"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_fused_moe_quantized_matches_simulation(mode, activation, seed):
    x, ids, w, w_up, w_down = _problem(seed, d=160 if activation == "gelu" else 128)
    if activation == "gelu":
        w_up = w_up[:, :128].contiguous()
        ids[3, 1] = -1  # an unused slot
    qs = Q.quantize_expert_weights(w_up, w_down, mode)
    out, counts = fused_moe_quantized(x, ids, w, *qs, quant_mode=mode, activation=activation)
    assert out.dtype == x.dtype and out.shape == x.shape
    flat = ids.reshape(-1).long()
    want = torch.bincount(flat[flat >= 0], minlength=w_up.shape[0]).to(counts.dtype)
    assert torch.equal(counts, want)
    sim = reference.experts_quantized(x.float(), ids, w, *qs, activation, mode)
    assert_close(out, sim, REQUANT_TOL, f"{mode} vs simulated quantisation")
    full = reference.experts(x.double(), ids, w.double(), w_up.double(), w_down.double(),
                             activation)
    assert_close(out, full, FORMAT_TOL[mode], f"{mode} vs unquantised")


def test_fused_moe_quantized_no_tokens():
    x, ids, w, w_up, w_down = _problem(1, n=0)
    out, counts = fused_moe_quantized(x, ids, w, *Q.quantize_expert_weights(w_up, w_down, "fp8"),
                                      quant_mode="fp8")
    assert out.shape == (0, 128) and int(counts.sum()) == 0


def test_fused_moe_quantized_bad_input():
    x, ids, w, w_up, w_down = _problem(2)
    uq, us, dq, ds = Q.quantize_expert_weights(w_up, w_down, "int8")
    with pytest.raises(ValueError, match="quant_mode"):
        fused_moe_quantized(x, ids, w, uq, us, dq, ds, quant_mode="int4")
    with pytest.raises(TypeError, match="w_up_q"):
        fused_moe_quantized(x, ids, w, uq, us, dq, ds, quant_mode="fp8")
    with pytest.raises(ValueError, match="w_up_scale"):
        fused_moe_quantized(x, ids, w, uq, us[:, :3], dq, ds, quant_mode="int8")
    with pytest.raises(ValueError, match="w_down_q"):
        fused_moe_quantized(x, ids, w, uq, us, dq[:, :, :5], ds, quant_mode="int8")
    with pytest.raises(ValueError, match="num_max_tokens_per_rank"):
        fused_moe_quantized(x, ids, w, uq, us, dq, ds, quant_mode="int8",
                            num_max_tokens_per_rank=4)
    with pytest.raises(ValueError, match="topk_ids"):
        fused_moe_quantized(x, ids[:3], w[:3], uq, us, dq, ds, quant_mode="int8")


# ----------------------------------------------------------------------------------------------
# FP8 training


def _fp8_cols(a: torch.Tensor) -> torch.Tensor:
    """FP8 wgrad operand ``a [P, C]`` (the rows of one expert, in order) quantised per column
    and group of 128 rows, dequantised (float64)."""
    q, s = KQ.quantize_fp8_rows_torch(a.float().t().contiguous())
    return Q.dequantize_rows(q, s, torch.float64).t()


def _fp8_train_sim(x, ids, w, w_up, w_down, dout, activation="swiglu", fp8_wgrad=False):
    """The FP8 training path's forward and backward, simulated in float64 from its
    definition (FusedExpertsFunction's docstring): quantised x, weights, h (forward),
    dout and dpre (dgrad); straight-through h in the weight gradients, whose operands are
    unquantised, or with ``fp8_wgrad`` quantised per column and 128 tokens of the expert."""
    wq = _fp8_cols if fp8_wgrad else (lambda t: t.to(torch.float64))
    f64 = torch.float64
    wu_q = Q.dequantize_weight(*Q.quantize_fp8_blocks(w_up), f64)
    wd_q = Q.dequantize_weight(*Q.quantize_fp8_blocks(w_down), f64)
    xq = Q.dequantize_rows(*Q.quantize_fp8_rows(x), dtype=f64)
    dq = Q.dequantize_rows(*Q.quantize_fp8_rows(dout), dtype=f64)
    x64, d64, w64 = x.to(f64), dout.to(f64), w.to(f64)
    out, dx = torch.zeros_like(x64), torch.zeros_like(x64)
    dw = torch.zeros_like(w64)
    dwu, dwd = torch.zeros(w_up.shape, dtype=f64), torch.zeros(w_down.shape, dtype=f64)
    for ex in range(w_up.shape[0]):
        tok, slot = (ids == ex).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        pre = (xq[tok] @ wu_q[ex].t()).requires_grad_()
        h = reference.activation(activation, pre)
        hq = Q.dequantize_rows(*Q.quantize_fp8_rows(h.detach().float()), dtype=f64)
        wt = w64[tok, slot, None]
        out.index_add_(0, tok, (hq @ wd_q[ex].t()) * wt)
        dh = dq[tok] @ wd_q[ex]                       # dgrad 1, fp8 operands
        dw[tok, slot] = (dh * h.detach()).sum(1)
        (dpre,) = torch.autograd.grad(h, pre, dh * wt)
        dpq = Q.dequantize_rows(*Q.quantize_fp8_rows(dpre.float()), dtype=f64)
        dx.index_add_(0, tok, dpq @ wu_q[ex])         # dgrad 2, fp8 operands
        dwd[ex] = wq(d64[tok]).t() @ wq(h.detach() * wt)    # wgrad
        dwu[ex] = wq(dpre).t() @ wq(x64[tok])
    return out, dx, dw, dwu, dwd


@pytest.mark.parametrize("quant,recompute,activation", [
    ("fp8_block", False, "swiglu"), ("fp8_block", True, "swiglu"),
    ("fp8_block_wgrad", False, "swiglu"), ("fp8_block", True, "geglu_erf")])
def test_fp8_training_matches_simulation_and_bounds(quant, recompute, activation, seed):
    x, ids, w, w_up, w_down = _problem(seed)
    ids[5, 0] = -1
    leaves = [t.clone().requires_grad_() for t in (x, w, w_up, w_down)]
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x)
    out = fused_experts(leaves[0], ids, leaves[1], leaves[2], leaves[3], activation,
                        quant=quant, recompute=recompute)
    grads = torch.autograd.grad(out, leaves, dout)
    sim = _fp8_train_sim(x.float(), ids, w, w_up.float(), w_down.float(), dout.float(),
                         activation, fp8_wgrad=quant == "fp8_block_wgrad")
    names = ("out", "dx", "d_topk_weights", "dw_up", "dw_down")
    for name, got, want in zip(names, (out, *grads), sim):
        assert_close(got, want, REQUANT_TOL, f"fp8 training {name} vs simulation")
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, w_up, w_down)]
    ref = reference.experts(ref_leaves[0], ids, ref_leaves[1], ref_leaves[2], ref_leaves[3],
                            activation)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    for name, got, want in zip(names, (out, *grads), (ref, *ref_grads)):
        assert_close(got, want, FORMAT_TOL["fp8"], f"fp8 training {name} vs unquantised")


@pytest.mark.parametrize("accumulate", [False, True])
def test_fp8_wgrad_kernel_matches_simulation(accumulate):
    """The FP8 weight-gradient GEMM (``kernels/wgrad_fp8.py``) on experts with several
    128-token groups (a partial last one), an empty expert and gathered token rows: exactly
    ``Σ_p q(A)[p]ᵀ q(B)[p]`` with both operands quantised per column and 128 tokens of the
    expert, to fp32 (CPU) / accumulation-order (GPU) accuracy; added into a buffer with
    ``out``."""
    from moe_plugin.kernels.permute import permute_metadata
    g = torch.Generator().manual_seed(3)
    n, k, e, mo, no = 250, 2, 4, 40, 72
    ids = torch.randint(0, e - 1, (n, k), generator=g, dtype=torch.int32)  # expert 3: empty
    ids[3, 1] = -1
    meta = permute_metadata(ids.to(DEVICE), e)
    s = int(meta.offsets[-1])
    # operands rounded to the kernels' dtype first: the simulation quantises the same values
    a_tok = torch.randn(n, mo, generator=g).to(DTYPE).float()  # read through the gather (x)
    b_perm = torch.randn(meta.sorted_slot.numel(), no, generator=g)  # expert order (hw)
    b_perm[5] *= 100                                            # an outlier token
    b_perm = b_perm.to(DTYPE).float()
    off, cnt = meta.offsets.tolist(), meta.counts.tolist()
    assert max(cnt) > 128 and cnt[3] == 0
    want = torch.zeros(e, mo, no, dtype=torch.float64)
    for ex in range(e):
        if cnt[ex]:
            p = meta.sorted_slot[off[ex]:off[ex] + cnt[ex]].long().cpu()
            want[ex] = _fp8_cols(a_tok[p // k]).t() @ _fp8_cols(b_perm[off[ex]:off[ex] + cnt[ex]])
    to = dict(device=DEVICE, dtype=DTYPE)
    out = torch.ones(e, mo, no, device=DEVICE) if accumulate else None
    b_perm[s:] = float("nan")  # unused slots' rows: never read
    got = W8.wgrad_fp8("t", a_tok.to(**to), True, b_perm.to(**to), False, meta, out=out)
    if accumulate:
        assert got is out
        got = got - 1
    assert_close(got, want, TOL, "fp8 wgrad vs simulation")


def test_fp8_recompute_gives_identical_results():
    x, ids, w, w_up, w_down = _problem(7)
    res = []
    for rc in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, w, w_up, w_down)]
        out = fused_experts(leaves[0], ids, leaves[1], leaves[2], leaves[3],
                            quant="fp8_block", recompute=rc)
        res.append((out, *torch.autograd.grad(out, leaves, torch.ones_like(out))))
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_fp8_quant_argument_checks():
    x, ids, w, w_up, w_down = _problem(3)
    with pytest.raises(ValueError, match="quant"):
        fused_experts(x, ids, w, w_up, w_down, quant="fp4")
    with pytest.raises(ValueError, match="quant: 'fp8_block' runs the Triton kernels"):
        fused_experts(x, ids, w, w_up, w_down, quant="fp8_block", backend="torch")
    with pytest.raises(ValueError, match="quant"):
        MoELayer(128, 128, 4, 2, quant="int8")


def test_fp8_moe_layer_and_fused_moe_train():
    torch.manual_seed(0)
    layer = MoELayer(128, 128, 4, 2, quant="fp8_block", aux_loss_coeff=1e-2, dtype=DTYPE,
                     device=DEVICE)
    ref = MoELayer(128, 128, 4, 2, aux_loss_coeff=1e-2, dtype=DTYPE, device=DEVICE)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 128, device=DEVICE, dtype=DTYPE)
    out, info = layer(x)
    out_ref, _ = ref(x)
    assert_close(out, out_ref, FORMAT_TOL["fp8"], "MoELayer fp8 vs unquantised")
    (out.float().square().mean() + info["aux_loss"]).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    gate = torch.randn(4, 128, device=DEVICE, dtype=DTYPE)
    o, _ = fused_moe(x.reshape(-1, 128), gate, layer.w_up, layer.w_down, 2, quant="fp8_block")
    o2, _ = fused_moe(x.reshape(-1, 128), gate, layer.w_up, layer.w_down, 2)
    assert_close(o, o2, FORMAT_TOL["fp8"], "fused_moe fp8 vs unquantised")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("quant", ["fp8_block", "fp8_block_wgrad"])
def test_fp8_cuda_graph_follows_weight_updates(quant):
    """FP8 experts captured in a CUDA graph (``moe_plugin.graphs.GraphedStep``) and replayed
    after in-place weight updates (an optimizer step) give the eager results on the updated
    weights: the weights' quantisation is part of the graph, not a stale cached copy."""
    from moe_plugin.graphs import GraphedStep
    x, ids, w, w_up, w_down = _problem(5, n=256, d=256, f=256, e=8)
    w_up.requires_grad_()
    w_down.requires_grad_()

    def step(x, gout):
        out = fused_experts(x, ids, w, w_up, w_down, quant=quant)
        return (out.detach(), *torch.autograd.grad(out, [w_up, w_down], gout))

    gout = torch.randn_like(x)
    graphed = GraphedStep(step, dict(x=x, gout=gout))
    g = torch.Generator(device=DEVICE).manual_seed(1)
    for it in range(3):
        with torch.no_grad():  # the "optimizer step": in place, as Megatron's and torch's
            w_up.add_(torch.randn(w_up.shape, generator=g, device=DEVICE).to(w_up.dtype), alpha=0.1)
            w_down.mul_(0.9)
        x2 = torch.randn(x.shape, generator=g, device=DEVICE).to(x.dtype)
        got = [t.clone() for t in graphed(x=x2, gout=gout)]
        want = step(x2, gout)
        for name, a, b in zip(("out", "dw_up", "dw_down"), got, want):
            assert torch.equal(a, b), f"iteration {it}: {name} differs from eager"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("config", [None, dict(BC=64, num_warps=4, WC=1)])
@pytest.mark.parametrize("e", [6, 130])
def test_fp8_cols_gluon_pass_equals_triton(gather, config, e, tune):
    """The column quantisation of the FP8 wgrad operands (per column and 128 tokens of one
    expert, stored transposed in the padded group layout) runs on Hopper as a Gluon pass
    (``gluon_gemm._fp8_cols_gl``): bitwise the Triton kernel's values and scales in every
    written group, with an empty expert, segments not multiples of 128, unused slots and a
    column count that is not a multiple of the column block; 6 experts (one 32-wide vector of
    experts) and 130 (256 wide: several per lane)."""
    from moe_plugin.kernels.permute import permute_metadata
    if not GF.available(tuning.current(), torch.empty(0, device=DEVICE)):
        pytest.skip("Gluon Hopper kernels not available here")
    if config is not None:
        tune(gluon_cols_config=config)
    g = torch.Generator().manual_seed(8)
    n, k, c = (500, 2, 200) if e == 6 else (1200, 8, 200)
    ids = torch.randint(0, e, (n, k), generator=g, dtype=torch.int32)
    ids[ids == 2] = 3   # expert 2: no tokens
    ids[:5, 0] = -1     # unused slots
    meta = permute_metadata(ids.to(DEVICE), e)
    rows = n if gather else meta.sorted_slot.numel()
    src = (torch.randn(rows, c, generator=g) * 4).to(DEVICE, DTYPE)
    src[3] = 0
    used = int(((meta.counts + 127) // 128).sum())
    res = []
    for enabled in (False, True):
        with tuning.override(gluon=enabled):
            q, sc = W8.quantize_cols_grouped(src, meta, gather)
        res.append((q[:used].view(torch.uint8), sc[:used]))
    assert torch.equal(res[0][1], res[1][1]), "scales differ"
    assert torch.equal(res[0][0], res[1][0]), "quantised values differ"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("mode,dtype", [(1, torch.float32), (2, torch.float32),
                                        (2, torch.bfloat16)])
def test_fp8_wgrad_gluon_accumulate_modes_equal_triton(mode, dtype, tune):
    """The Gluon FP8 weight gradient added into a buffer (gradient-accumulation fusion: mode 1
    atomic adds, mode 2 read-add-write with the buffer's tile loaded ahead by the producer's
    TMA) gives the Triton kernel's results bitwise; MO not a multiple of the tile (a tile's
    rows past it read the next expert's, masked), an empty expert, few persistent programs."""
    from moe_plugin.kernels.permute import permute_metadata
    if not GF.available(tuning.current(), torch.empty(0, device=DEVICE)):
        pytest.skip("Gluon Hopper kernels not available here")
    tune(wgrad_accum_mode=mode, gluon_programs=5)
    g = torch.Generator().manual_seed(12)
    n, k, e, mo, no = 600, 2, 5, 200, 136
    ids = torch.randint(0, e, (n, k), generator=g, dtype=torch.int32)
    ids[ids == 3] = 0   # expert 3: no tokens
    meta = permute_metadata(ids.to(DEVICE), e)
    s = meta.sorted_slot.numel()
    a = torch.randn(s, mo, generator=g).to(DEVICE, DTYPE)
    b = torch.randn(n, no, generator=g).to(DEVICE, DTYPE)
    init = torch.randn(e, mo, no, generator=g).to(DEVICE, dtype)
    res = []
    for enabled in (False, True):
        with tuning.override(gluon=enabled):
            out = init.clone()
            got = W8.wgrad_fp8("t", a, False, b, True, meta, out=out)
        assert got is out
        res.append(out)
    assert torch.equal(res[0], res[1]), "Gluon and Triton accumulation differ"
    assert torch.equal(res[1][3], init[3]), "the empty expert's gradient changed"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("activation,f", [("swiglu", 256), ("swiglu_oai", 200), ("silu", 136)])
def test_fp8_dh_gemm_fused_act_bwd_equals_split(activation, f, tune):
    """On Hopper the FP8 dh' GEMM runs the activation backward in its epilogue
    (``gluon_gemm._act_bwd_epilogue``: the pre-activation tiles TMA-loaded by the producer,
    dh' never stored). Against the split form (the same GEMM storing dh', then
    ``_act_bwd_kernel``): dpre and hw, and so dx, dW_up and dW_down, bitwise equal; the
    routing-weight gradient (row sums of dh'·h per 128-column tile, summed in a different
    order) to fp32 rounding. Gated and ungated, F not a multiple of the tile, an empty expert,
    unused slots, 3 persistent programs."""
    if not GF.available(tuning.current(), torch.empty(0, device=DEVICE)):
        pytest.skip("Gluon Hopper kernels not available here")
    tune(gluon_programs=3)
    x, ids, w, w_up, w_down = _problem(13, n=600, d=256, f=f, e=6, k=2)
    if activation in ("gelu", "relu2", "silu"):  # ungated: W_up [E, F, D]
        w_up = w_up[:, :f].contiguous()
    ids[ids == 4] = 1   # expert 4: no tokens
    ids[:6, 0] = -1     # unused slots
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(x)
    res = []
    for fused in (False, True):
        tune(gluon_fuse_act_bwd=fused)
        leaves = [t.clone().requires_grad_() for t in (x, w, w_up, w_down)]
        out = fused_experts(leaves[0], ids, leaves[1], leaves[2], leaves[3], activation,
                            quant="fp8_block_wgrad")
        res.append((out, *torch.autograd.grad(out, leaves, dout)))
    for name, a, b in zip(("out", "dx", "d_topk_weights", "dw_up", "dw_down"), *res):
        if name == "d_topk_weights":
            assert rel_err(b, a) < 1e-6, f"{activation}: {name} {rel_err(b, a):.2e}"
        else:
            assert torch.equal(a, b), f"{activation} {name}: fused and split forms differ"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("quant,programs", [("fp8_block", None), ("fp8_block_wgrad", None),
                                            ("fp8_block_wgrad", 3)])
def test_fp8_gluon_kernels_equal_triton_kernels(quant, programs, tune):
    """On Hopper the FP8 GEMMs without a row gather (GEMM1 on expert-order x, GEMM2, dh' on
    expert-order dout, dx, FP8 wgrad) run as Gluon kernels (``kernels/gluon_gemm.py``: TMA
    loads, warp-specialised ping-pong consumers, persistent over tiles); they compute the same
    sums in the same order as the Triton kernels: outputs and every gradient bitwise equal,
    with uneven experts (one empty, segments not multiples of the tile) and unused slots;
    ``programs``: the persistent kernels on 3 programs (many tiles, and empty experts' tiles,
    through each program's ring)."""
    if not GF.available(tuning.current(), torch.empty(0, device=DEVICE)):
        pytest.skip("Gluon Hopper kernels not available here")
    tune(gluon_programs=programs)
    x, ids, w, w_up, w_down = _problem(11, n=700, d=384, f=256, e=8, k=2)
    ids[ids == 5] = 4   # expert 5: no tokens
    ids[:7, 1] = -1     # unused slots
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x)
    res = []
    for enabled in (False, True):
        with tuning.override(gluon=enabled):
            leaves = [t.clone().requires_grad_() for t in (x, w, w_up, w_down)]
            out = fused_experts(leaves[0], ids, leaves[1], leaves[2], leaves[3], quant=quant)
            res.append((out, *torch.autograd.grad(out, leaves, dout)))
    for name, a, b in zip(("out", "dx", "d_topk_weights", "dw_up", "dw_down"), *res):
        assert torch.equal(a, b), f"{quant} {name}: Gluon and Triton kernels differ"
