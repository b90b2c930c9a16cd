"""Expert GEMMs in Gluon on Hopper (bf16 and FP8): TMA loads, warp-specialised consumers.

One family of kernels, the operand type and its scale handling being parameters. The FP8
block-scaled GEMMs (``grouped_gemm.py`` with ``QUANT_FP8``, ``wgrad_fp8.py``) and the 16-bit
weight gradients (``grouped_gemm.wgrad_up`` / ``wgrad_down``) run here where ``available``;
the Triton kernels they replace compute the same sums in the same order (bitwise the same
results: ``tests/test_quant.py``, ``tests/test_gpu.py``) and stay the portable path. The
structure (``gl.warp_specialize``):

* a producer partition (1 warp, few registers) runs a ring of ``STAGES`` shared-memory slots:
  for each k-step it waits until both consumers released the slot (mbarrier ``empty``),
  ``expect``s the bytes on mbarrier ``ready`` and issues the slot's TMA copies (the operand
  tiles; for the weight gradient also the step's two scale vectors);
* two consumer partitions (one warpgroup each; the default partition is consumer 0) own rows
  ``[0, 64)`` and ``[64, 128)`` of the 128 x 128 output tile. Per k-step a consumer waits for
  ``ready`` and for its *turn* (mbarrier ``turn``), issues its MMA (a fresh product, as the
  Triton kernels), hands the turn to the other consumer, waits for its MMA, releases the slot
  and promotes the product (scales it, adds it to its accumulator). The MMAs alternate between
  the consumers, so one consumer's promotion runs while the other's MMA occupies the tensor
  cores -- in a kernel whose warpgroups run in lockstep both promote while the tensor cores
  idle;
* persistent: one program per SM walks the tiles ``pid, pid + grid, ...`` (tile t = program t
  of a one-tile-per-program launch); the k-step counter runs on across tiles, so the producer
  fills the ring for the next tile while the consumers run the epilogue.

With ``KPAIR`` the consumers issue two k-steps per turn (the turn hand-over and its barriers
once per 8 wgmma instead of 4; each product still promoted alone, in order).

Triton 3.6 lowers ``mbarrier.arrive`` to a partition-wide barrier and one arrive by the
partition's first thread: ``empty`` counts 2 (one per consumer), ``turn`` 1, ``ready`` 1 (the
producer's ``expect``).

``_grouped_mm_ws``: the row-grouped GEMM ``C[p, n] = Σ_k A[row(p), k] · B_e[k, n]``, rows in
expert order. ``SCALED``: FP8 (GEMM1 storing pre, GEMM2, dh' on expert-order quantised dout,
dx) with ``Σ_kb (A[p, kb] · B_e[kb, n]) · sa[p, kb] · sb[e, kb, n/128]``, the ping-pong above.
Else 16-bit operands (``grouped_mm_direct``: GEMM2, dx, the split form's dh', GEMM1 with its
activation) with the k-steps accumulated in the wgmma, both consumers at once; A by TMA, or
gathered (``A_GATHER``: rows ``sorted_slot // k``, the tile's indices loaded once) by
``cp.async`` from a 4-warp producer; B stored K-major ``[E·NB, K]`` or N-major ``[E·K, N]``
(``B_KMAJOR``); GEMM1 gated loads the gate and up tiles into one ring slot (two
accumulators) and runs the Triton kernel's activation epilogue.
``_segment_mm_ws``: the weight gradients ``C[e] (+)= Σ_p A[p]ᵀ · B[p]``. ``PADDED``: FP8 on
``wgrad_fp8.py``'s padded group layout (``acc + p · (sa ⊗ sb)`` per k-step, the ping-pong
above); else 16-bit operands in place (``segment_mm_direct``): the expert-order operand by TMA,
the gathered one (rows ``sorted_slot // k``) by ``cp.async`` from a 4-warp producer, the
k-steps accumulated in the wgmma. Added into a buffer by read-add-write (``ACCUM`` 2), the
producer TMA-loads the buffer's tile after issuing the tile's k-steps, so the epilogue reads it
from shared memory instead of waiting on a global load. ``_fp8_cols_gl``: the column
quantisation of its operands.

With ``gluon_bf16_config["CLUSTER"]`` 2 (Triton >= 3.8) the 16-bit row-grouped GEMMs with the
plain or GEMM1 epilogue are launched as clusters of two CTAs that share one operand's tiles,
loaded once for both by TMA multicast (``CN`` / ``CM``): along the columns when A comes by
TMA (GEMM2, dx: A's tile shared), along the rows when A is gathered (GEMM1, dh': B's tiles
shared). The kernel is then written for the cluster's tile, each layout's ``cga_layout``
(``_cga``) saying how the CTAs divide it.

The row-grouped kernel's consumers take each tile's facts (expert, column tile, rows) from the
producer through a two-slot shared-memory ring (``INFO``; the weight gradient's likewise). For
the dh' GEMM (``EPI == EPI_ACT_BWD``, ``grouped_mm_act_bwd``) the epilogue is
``grouped_gemm``'s split activation pass (``_act_bwd_kernel``, same arithmetic, bitwise the
same dpre / hw / routing-weight gradient): the producer TMA-loads the tile's pre-activation
and gathers its routing weights a few k-steps into the tile, the consumers stage dh' in shared
memory and process it 16 rows at a time; dh' is never stored.

Used where ``available()`` (Gluon importable, a compute-capability-9 GPU, ``tune.gluon``) and
the shapes fit (``grouped_fits``, ``grouped_direct_fits``, ...: K a multiple of the k-step,
16-byte aligned rows); otherwise, and under the CPU
interpreter (Gluon has none), the Triton kernels run. Tile rows of A past an expert's segment
(or columns of B past N) read the neighbours' rows and are masked at the store; past the end
of a tensor TMA fills zeros.
"""
import functools
import os

import torch
import triton

from . import tuning
from .activation import act_bwd_store, act_fwd
from .codes import (ACCUM_ATOMIC, ACCUM_RMW, ACCUM_STORE, EPI_ACT_BWD, EPI_ACT_FWD, EPI_STORE,
                    Accum, Epilogue)
from .common import cdiv, next_pow2, sm_count
from .fast_launch import launcher

try:  # Gluon (Triton >= 3.5 with the Hopper dialect)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    _HAVE_GLUON = True
except Exception:  # pragma: no cover - a Triton without Gluon
    _HAVE_GLUON = False

# Gluon's API changes between Triton releases (3.7 renamed ``thread_barrier``, 3.9 the copy
# builtins). Two lists of Triton versions:
# ``GLUON_TRITON_VERSIONS``: the kernels compile there (``tests/test_gluon_compile.py``) and ran
# on a Hopper GPU against the Triton kernels (the GPU-marked tests): they are used by default.
# ``GLUON_TRITON_COMPILES``: they compile there; used only when the environment variable
# ``MOE_PLUGIN_GLUON_UNVERIFIED`` is ``1`` (to run the GPU tests under such a Triton).
# Under any other Triton the Triton kernels run (``available``).
GLUON_TRITON_VERSIONS = ((3, 6),)
GLUON_TRITON_COMPILES = ((3, 6), (3, 7), (3, 8), (3, 9))

if _HAVE_GLUON:
    # The builtins Gluon renamed, bound to this Triton's names (3.6: ``async_copy_*`` and
    # ``thread_barrier``; 3.7: ``barrier``; 3.9: ``async_load`` / ``async_store``, the old
    # names kept only to raise). Same arguments and lowering in all.
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    _cp_async_load = (getattr(async_copy, "async_load", None)
                      or async_copy.async_copy_global_to_shared)
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier


@functools.lru_cache(maxsize=None)
def _triton_version() -> tuple:
    return tuple(int(p) for p in triton.__version__.split(".")[:2])


def api_compiles() -> bool:
    """Whether this Triton has Gluon with an API these kernels compile under
    (``GLUON_TRITON_COMPILES``)."""
    return _HAVE_GLUON and _triton_version() in GLUON_TRITON_COMPILES


def api_supported() -> bool:
    """Whether the Gluon kernels may run under this Triton: a version they were run with on a
    Hopper GPU (``GLUON_TRITON_VERSIONS``), or one they compile under with
    ``MOE_PLUGIN_GLUON_UNVERIFIED=1``."""
    return api_compiles() and (_triton_version() in GLUON_TRITON_VERSIONS
                               or os.environ.get("MOE_PLUGIN_GLUON_UNVERIFIED") == "1")


# the Triton versions whose Gluon compiles ``_grouped_mm_ws`` with ``CN`` 2 (TMA multicast
# into a cluster's CTAs): from 3.8 on (3.7 has multicast but cannot take a consumer's rows of a
# tile held whole in both CTAs: "non-trivial block dimension not supported")
GLUON_CLUSTER_FROM = (3, 8)


def cluster_compiles() -> bool:
    """Whether this Triton's Gluon compiles the kernels launched as clusters (``CN`` 2)."""
    return api_compiles() and _triton_version() >= GLUON_CLUSTER_FROM


@functools.lru_cache(maxsize=None)
def _sm_major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def available(tune: tuning.Tuning, t: torch.Tensor) -> bool:
    """Whether the Gluon kernels can run on ``t``'s device (and ``tune.gluon`` allows them)."""
    return t.is_cuda and tune.gluon and api_supported() and _sm_major(t.device) == 9


# The shared layouts of the launchers' TMA descriptors are built once (the launch path runs per
# GEMM call, and building a layout object costs host time)
@functools.lru_cache(maxsize=None)
def _smem_layout():
    """The 128-byte-swizzled shared layout of the FP8 kernels' 2-D TMA tiles."""
    return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)


@functools.lru_cache(maxsize=None)
def _unswizzled_layout(bits: int, rank: int):
    """An unswizzled shared layout of ``bits``-bit elements and ``rank`` dimensions (TMA boxes
    of rows of any width)."""
    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=bits, rank=rank)


if _HAVE_GLUON:
    @gluon.constexpr_function
    def _cga(CTAS, rank, split=None):
        """The CTA bases (``cga_layout``) of a layout in a kernel launched as clusters of
        ``CTAS`` CTAs (``_grouped_mm_ws``'s ``CN`` / ``CM``; also called by host code): none
        for one CTA; for two, the tensor split between them along dimension ``split`` (each
        CTA its half), or with ``split`` None the same whole tensor in each."""
        if CTAS == 1:
            return []
        assert CTAS == 2, f"clusters of one or two CTAs, not {CTAS}"
        return [[int(d == split) for d in range(rank)]]

    @gluon.constexpr_function
    def _mma_layout(BN, num_warps, bits=8, CTAS=1, SPLIT=1):
        """The wgmma accumulator layout: m16 x BN x k(256 / bits) instructions (k32 for fp8,
        k16 for 16-bit operands), warps along M; in a cluster of two CTAs (``CTAS`` 2) the
        accumulator of the cluster's tile, each CTA its half along dimension ``SPLIT`` (BN:
        the columns of a CTA's instructions)."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                         instr_shape=[16, BN, 256 // bits],
                                         cga_layout=_cga(CTAS, 2, SPLIT))

    @gluon.constexpr_function
    def _store_layout(num_warps, CTAS=1, SPLIT=1):
        """Row-major tiles for the epilogue stores: 8 consecutive columns per thread (in a
        cluster of two CTAs the cluster's tile, each CTA its half along dimension
        ``SPLIT``)."""
        return gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0],
                                cga_layout=_cga(CTAS, 2, SPLIT))

    @gluon.constexpr_function
    def _seg_store_layout(num_warps, c_trans):
        """The weight gradients' epilogue tiles ``[rows, cols]``: ``_store_layout``, or with
        ``c_trans`` (the output stored transposed: consecutive rows adjacent in memory) 8
        consecutive rows per thread, 8 threads of a warp along the rows."""
        if not c_trans:
            return _store_layout(num_warps)
        return gl.BlockedLayout([8, 1], [8, 4], [1, num_warps], [0, 1])

    @gluon.constexpr_function
    def _vector_layout(num_warps, n, replicated=False, CTAS=1):
        """An ``[n]`` vector (n a power of 2, >= 32) over the lanes and warps, or with
        ``replicated`` over the lanes of each warp, the same in every warp: its reductions
        then stay within a warp (no barrier). In a cluster (``CTAS`` 2) the same in each
        CTA."""
        if not replicated:
            return gl.BlockedLayout([1], [32], [num_warps], [0], cga_layout=_cga(CTAS, 1))
        return gl.DistributedLinearLayout(
            [[32 << i] for i in range((n // 32).bit_length() - 1)],
            [[1 << i] for i in range(5)], [[0]] * (num_warps.bit_length() - 1),
            _cga(CTAS, 1), [n])

    @gluon.constexpr_function
    def _scan_layout(num_warps, n, CTAS=1):
        """An ``[n]`` vector for a scan: contiguous runs of ``n / (32·num_warps)`` elements per
        thread (at least one; smaller vectors repeat over the warps). In a cluster the same in
        each CTA."""
        return gl.BlockedLayout([max(1, n // (32 * num_warps))], [32], [num_warps], [0],
                                cga_layout=_cga(CTAS, 1))

    @gluon.constexpr_function
    def _bar_layout(CTAS, shared=False):
        """mbarriers of a kernel launched as clusters of ``CTAS`` CTAs: each CTA its own, or
        with ``shared`` one for the pair, in the first CTA (the arrivals of both counted
        there, its waits those of the first CTA only)."""
        if CTAS == 1:
            return mbarrier.MBarrierLayout()
        return mbarrier.MBarrierLayout(cga_layout=[[0]] if shared else [[1]])

    @gluon.constexpr_function
    def _plain_smem(CTAS=1):
        """An unswizzled shared layout (small buffers: tile facts, vectors), in a cluster the
        same buffer in each CTA."""
        return gl.SwizzledSharedLayout(1, 1, 1, order=[0], cga_layout=_cga(CTAS, 1))

    @gluon.jit
    def _bars(n: gl.constexpr, CTAS: gl.constexpr, SHARED: gl.constexpr = False):
        """``n`` mbarriers (``.index(i)``) laid out by ``_bar_layout``."""
        return gl.allocate_shared_memory(gl.int64, [n, 1 if SHARED else CTAS],
                                         _bar_layout(CTAS, SHARED))

    @gluon.jit
    def _sum_i32(a, b):
        return a + b

    @gluon.jit
    def _grouped_tile(pid, offsets_ptr, counts_ptr, E, N, num_m_tiles,
                      BM: gl.constexpr, BN: gl.constexpr, GROUP_M: gl.constexpr,
                      BLOCK_E: gl.constexpr, num_warps: gl.constexpr,
                      REPLICATED: gl.constexpr = False, CTAS: gl.constexpr = 1):
        """A row-grouped program's (expert, column tile, first row, end of the expert's rows):
        row tiles grouped GROUP_M at a time over the columns, the expert found from the
        inclusive cumulative tile counts (a scan of the experts' counts, here); expert E: an
        idle program (the grid is sized for the worst case)."""
        num_n = gl.cdiv(N, BN)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        size_m = gl.minimum(num_m_tiles - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m
        # the scan on contiguous runs of experts per thread (a plain blocked layout: Triton
        # 3.6's scan of the replicated vector layout was wrong on the GPU), then to the
        # working layout
        sl: gl.constexpr = _scan_layout(num_warps, BLOCK_E, CTAS)
        es = gl.arange(0, BLOCK_E, layout=sl)
        cnt = gl.load(counts_ptr + es, mask=es < E, other=0)
        cum = gl.associative_scan((cnt + (BM - 1)) // BM, 0, _sum_i32)
        ex = gl.arange(0, BLOCK_E, layout=_vector_layout(num_warps, BLOCK_E, REPLICATED, CTAS))
        cum = gl.convert_layout(cum, _vector_layout(num_warps, BLOCK_E, REPLICATED, CTAS))
        cum = gl.where(ex < E, cum, 2147483647)
        e = gl.sum((cum <= pid_m).to(gl.int32), 0)
        first = gl.sum(gl.where(ex == e - 1, cum, 0), 0)
        seg0 = gl.load(offsets_ptr + e)  # offsets has E + 1 entries
        seg_end = seg0 + gl.load(counts_ptr + e, mask=e < E, other=0)
        return e, pid_n, seg0 + (pid_m - first) * BM, seg_end

    @gluon.jit
    def _info_put(info, info_ready, info_empty, tc, a, b, c, d, CTAS: gl.constexpr = 1):
        """The producer hands a tile's four int32 facts to both consumers through a two-slot
        shared-memory ring (``tc``: tiles so far), so that they read them from shared memory
        at the tile's start instead of waiting on global loads and reductions."""
        slot = tc % 2
        mbarrier.wait(info_empty.index(slot), ((tc // 2) & 1) ^ 1)
        idx = gl.arange(0, 32, layout=_vector_layout(gl.num_warps(), 32, False, CTAS))
        v = gl.where(idx == 0, a, gl.where(idx == 1, b, gl.where(idx == 2, c, d)))
        info.index(slot).store(v)
        mbarrier.arrive(info_ready.index(slot))

    @gluon.jit
    def _info_get(info, info_ready, info_empty, tc, CTAS: gl.constexpr = 1):
        """A consumer's side of ``_info_put``: the four facts (in-warp reductions of a
        replicated vector), and the slot released."""
        slot = tc % 2
        mbarrier.wait(info_ready.index(slot), (tc // 2) & 1)
        lay: gl.constexpr = _vector_layout(gl.num_warps(), 32, True, CTAS)
        v = info.index(slot).load(lay)
        idx = gl.arange(0, 32, layout=lay)
        a = gl.sum(gl.where(idx == 0, v, 0), 0)
        b = gl.sum(gl.where(idx == 1, v, 0), 0)
        c = gl.sum(gl.where(idx == 2, v, 0), 0)
        d = gl.sum(gl.where(idx == 3, v, 0), 0)
        mbarrier.arrive(info_empty.index(slot))
        return a, b, c, d

    @gluon.jit
    def _info_alloc(CTAS: gl.constexpr = 1):
        """The tile-info ring of ``_info_put`` / ``_info_get``: slots, ready (1), empty (2);
        in a cluster (``CTAS`` 2) each CTA its own."""
        info = gl.allocate_shared_memory(gl.int32, [2, 32], _plain_smem(CTAS))
        info_ready = _bars(2, CTAS)
        info_empty = _bars(2, CTAS)
        for i in gl.static_range(2):
            mbarrier.init(info_ready.index(i), count=1)
            mbarrier.init(info_empty.index(i), count=2)
        return info, info_ready, info_empty


if _HAVE_GLUON:
    @gluon.jit
    def _grp_producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, m_empty, info, info_ready,
                      info_empty, pre_desc, pre_bufs, w_buf, pre_ready, pre_empty, w_ptr, a_ptr,
                      gather_ptr, counts_ptr, offsets_ptr, E, N, NB, K,
                      num_m_tiles, num_tiles, stride_a, BM: gl.constexpr, BN: gl.constexpr,
                      BK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                      BLOCK_E: gl.constexpr, INFO: gl.constexpr, EPI: gl.constexpr,
                      GATED: gl.constexpr, B_KMAJOR: gl.constexpr, A_GATHER: gl.constexpr,
                      DUAL: gl.constexpr, TOPK: gl.constexpr, CN: gl.constexpr,
                      CM: gl.constexpr):
        """The ring over the tiles' k-steps: B's tiles by TMA (``B_KMAJOR``: B stored
        ``[E·NB, K]``, else ``[E·K, N]``; ``DUAL``: also the up rows ``NB/2`` further, into
        ring slot ``STAGES + s``), A's by TMA or, with ``A_GATHER`` (rows ``gather[p] //
        TOPK``), by ``cp.async`` from these warps (the tile's row indices loaded once; the
        copies' completion counted on ``ready`` as the seg producer's). With ``EPI ==
        EPI_ACT_BWD`` a few k-steps into a tile also its pre-activation tiles (TMA) and
        routing weights (gathered by these warps) for the activation-backward epilogue
        (``pre_ready`` / ``pre_empty``).

        In a cluster of two CTAs the operand both share is loaded once, by the first CTA's
        producer into both CTAs' ring slot (TMA multicast), once both CTAs' consumers released
        the slot (``m_empty``, shared: its arrivals counted and waited for in the first CTA);
        the other operand's half tile each CTA loads itself, once its own consumers released
        the slot (``empty``). ``CN`` 2 (a tile ``BN`` columns wide, each CTA its half): A's
        tile shared. ``CM`` 2 (a tile ``BM`` rows high, each CTA its half; A gathered): B's
        tile(s) shared, A's rows of each CTA in two ring slots ``2·s + h``, one per consumer
        (``[2, BM/4, BK]``: both CTAs' rows of consumer h)."""
        if CN * CM == 1:
            nbytes: gl.constexpr = (a_desc.block_type.nbytes * (1 - A_GATHER)
                                    + b_desc.block_type.nbytes * (1 + DUAL))
        elif CN > 1:  # per CTA: A's whole tile, B's half
            nbytes: gl.constexpr = a_desc.nbytes_per_cta + b_desc.nbytes_per_cta
        else:  # per CTA: B's whole tile(s); A gathered
            nbytes: gl.constexpr = b_desc.nbytes_per_cta * (1 + DUAL)
        wl: gl.constexpr = gl.BlockedLayout([BM // (32 * gl.num_warps())], [32], [gl.num_warps()],
                                            [0])
        ga: gl.constexpr = _gather_layout(BK, gl.num_warps())
        HQ: gl.constexpr = BM // (2 * CM)  # a consumer's rows in each CTA
        if A_GATHER:
            stride_a = stride_a // 8 * 8  # 16-byte rows (``grouped_direct_fits``)
            if CM == 1:
                kcols = gl.arange(0, BK, layout=gl.SliceLayout(0, ga))
            else:  # [CTA, row, column] tiles of one consumer's rows in both CTAs
                ga3: gl.constexpr = _gather_layout3(BK, gl.num_warps())
                k3 = gl.arange(0, BK, layout=gl.SliceLayout(0, gl.SliceLayout(1, ga3)))
                c3 = gl.arange(0, 2, layout=gl.SliceLayout(1, gl.SliceLayout(2, ga3)))
                r3 = gl.arange(0, HQ, layout=gl.SliceLayout(0, gl.SliceLayout(2, ga3)))
                k3 = k3[None, None, :]
                r3 = c3[:, None, None] * (2 * HQ) + r3[None, :, None]  # the CTA's half first
        nk = K // BK
        it = 0
        tc = 0  # tiles so far
        tp = 0  # tiles with an expert so far
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            e, pid_n, row0, seg_end = _grouped_tile(t, offsets_ptr, counts_ptr,
                                                    E, N, num_m_tiles, BM, BN, GROUP_M,
                                                    BLOCK_E, gl.num_warps(), False, CN * CM)
            if INFO:
                _info_put(info, info_ready, info_empty, tc, e, pid_n, row0, seg_end, CN * CM)
                tc += 1
            if e < E:  # expert E: an idle tile (the tile count is the worst case)
                brow0 = e * NB + pid_n * BN
                if A_GATHER and CM > 1:
                    # per consumer h its rows of both CTAs (rows past the expert's segment
                    # zero-filled)
                    g0 = row0 + r3
                    g1 = g0 + HQ
                    a_mask0 = (g0 < seg_end) & (k3 < BK)
                    a_mask1 = (g1 < seg_end) & (k3 < BK)
                    arow0 = gl.load(gather_ptr + g0, mask=g0 < seg_end, other=0) // TOPK
                    arow1 = gl.load(gather_ptr + g1, mask=g1 < seg_end, other=0) // TOPK
                    a_tile0 = a_ptr + arow0.to(gl.int64) * stride_a + k3
                    a_tile1 = a_ptr + arow1.to(gl.int64) * stride_a + k3
                elif A_GATHER:
                    # the tile's token rows; rows past the expert's segment are zero-filled
                    grows = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, ga))
                    gmask = grows < seg_end
                    arow = gl.load(gather_ptr + grows, mask=gmask, other=0) // TOPK
                    a_tile = a_ptr + arow.to(gl.int64)[:, None] * stride_a + kcols[None, :]
                    a_mask = gmask[:, None] & (kcols < BK)[None, :]
                if EPI == EPI_ACT_BWD:
                    # the epilogue's inputs are requested a few k-steps into the tile (the
                    # previous tile's epilogues are over by then: both consumers released
                    # this tile's first slot) and arrive long before its epilogue: the
                    # pre-activation tiles by TMA at k-step pre_at, the routing weights
                    # gathered by this warp (slot ids loaded now, weights at pre_at, stored
                    # at w_at: the loads' latency spent issuing k-steps)
                    pre_at = gl.minimum(STAGES, nk - 1)
                    w_at = gl.minimum(pre_at + 2, nk - 1)
                    rows = row0 + gl.arange(0, BM, layout=wl)
                    rmask = rows < seg_end
                    slot = gl.load(gather_ptr + rows, mask=rmask, other=0)
                    wv = gl.zeros([BM], gl.float32, layout=wl)
                for ks in range(0, nk):
                    s = it % STAGES
                    mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                    if CN * CM > 1:  # (the first CTA's wait; the other's passes)
                        mbarrier.wait(m_empty.index(s), ((it // STAGES) & 1) ^ 1)
                    bar = ready.index(s)
                    if A_GATHER and CM > 1:
                        _cp_async_load(a_bufs.index(2 * s), a_tile0 + ks * BK, mask=a_mask0)
                        _cp_async_load(a_bufs.index(2 * s + 1), a_tile1 + ks * BK, mask=a_mask1)
                        async_copy.mbarrier_arrive(bar)
                    elif A_GATHER:
                        _cp_async_load(a_bufs.index(s), a_tile + ks * BK, mask=a_mask)
                        async_copy.mbarrier_arrive(bar)
                    mbarrier.expect(bar, nbytes)
                    if CN > 1:
                        _tma_load(a_desc, [row0, ks * BK], bar, a_bufs.index(s), multicast=True)
                    elif not A_GATHER:
                        _tma_load(a_desc, [row0, ks * BK], bar, a_bufs.index(s))
                    if CM > 1:  # B's tiles the same in both CTAs
                        if B_KMAJOR:
                            _tma_load(b_desc, [brow0, ks * BK], bar, b_bufs.index(s),
                                      multicast=True)
                            if DUAL:
                                _tma_load(b_desc, [brow0 + N, ks * BK], bar,
                                          b_bufs.index(STAGES + s), multicast=True)
                        else:
                            _tma_load(b_desc, [e * K + ks * BK, pid_n * BN], bar, b_bufs.index(s),
                                      multicast=True)
                    elif B_KMAJOR:
                        _tma_load(b_desc, [brow0, ks * BK], bar, b_bufs.index(s))
                        if DUAL:
                            _tma_load(b_desc, [brow0 + N, ks * BK], bar, b_bufs.index(STAGES + s))
                    else:
                        _tma_load(b_desc, [e * K + ks * BK, pid_n * BN], bar, b_bufs.index(s))
                    it += 1
                    if EPI == EPI_ACT_BWD:
                        if ks == pre_at:
                            # both consumers' epilogues done with the buffers (their generic
                            # loads ordered before the TMA writes); pre_ready counts two
                            # arrivals: this expect and the weights' arrive below
                            mbarrier.wait(pre_empty, (tp & 1) ^ 1)
                            fence_async_shared()
                            mbarrier.expect(pre_ready, pre_desc.block_type.nbytes * (1 + GATED))
                            _tma_load(pre_desc, [row0, pid_n * BN], pre_ready, pre_bufs.index(0))
                            if GATED:
                                _tma_load(pre_desc, [row0, N + pid_n * BN],
                                          pre_ready, pre_bufs.index(1))
                            wv = gl.load(w_ptr + slot, mask=rmask, other=0.0).to(gl.float32)
                        if ks == w_at:
                            w_buf.store(wv)
                            _cta_barrier()  # the warps' stores before the elected arrive
                            mbarrier.arrive(pre_ready)
                tp += 1


    @gluon.jit
    def _mma_pair(a_bufs, b_bufs, ready, my_turn, other_turn, zero, it, tn, HALF: gl.constexpr,
                  HM: gl.constexpr, STAGES: gl.constexpr):
        """A consumer's two-k-step turn (``KPAIR``): wait for the turn, issue the fresh MMAs of
        ring slots ``it`` and ``it + 1`` (each once its data has landed) on the consumer's
        rows, hand the turn over, wait for both products and return them (the caller promotes
        them and releases the slots)."""
        s1 = it % STAGES
        s2 = (it + 1) % STAGES
        mbarrier.wait(my_turn, (tn & 1) ^ (1 - HALF))
        mbarrier.wait(ready.index(s1), (it // STAGES) & 1)
        tok1 = warpgroup_mma(a_bufs.index(s1).slice(HALF * HM, HM),
                             b_bufs.index(s1).permute((1, 0)), zero, use_acc=False,
                             is_async=True)
        mbarrier.wait(ready.index(s2), ((it + 1) // STAGES) & 1)
        tok2 = warpgroup_mma(a_bufs.index(s2).slice(HALF * HM, HM),
                             b_bufs.index(s2).permute((1, 0)), zero, use_acc=False,
                             is_async=True)
        mbarrier.arrive(other_turn)
        return warpgroup_mma_wait(num_outstanding=0, deps=(tok1, tok2))

    @gluon.jit
    def _step_scales(sa_base, sb_base, ks, rmask_m, stride_sbk):
        """k-step ks's promotion factors of a consumer's rows: A row scale x B block scale."""
        return (gl.load(sa_base + ks, mask=rmask_m, other=0.0)
                * gl.load(sb_base + ks * stride_sbk))

    @gluon.jit
    def _act_bwd_epilogue(acc, pre_bufs, dh_buf, w_buf, pre_ready, pre_empty, tp, c_ptr, hw_ptr,
                          dwp_ptr, row0, seg_end, pid_n, N, stride_cm, stride_hw, stride_dwp,
                          HALF: gl.constexpr, HM: gl.constexpr, BN: gl.constexpr,
                          GATED: gl.constexpr, ACT: gl.constexpr):
        """``grouped_gemm._act_bwd_kernel`` on a consumer's rows of the dh' tile ``acc``, with
        its arithmetic (dh' rounded to the output dtype first, as the split form stores it):
        the pre-activation tiles and routing weights are in shared memory already (the
        producer's), dh' is staged there too, then processed 16 rows at a time in the store
        layout (coalesced 16-byte stores)."""
        CH: gl.constexpr = 16
        st: gl.constexpr = _store_layout(4)
        mbarrier.wait(pre_ready, tp & 1)
        dh_buf.slice(HALF * HM, HM).store(acc.to(c_ptr.dtype.element_ty))
        _cta_barrier()  # the warpgroup's dh' rows written before any is read back
        cols = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, st))
        for r in gl.static_range(HM // CH):
            rows = row0 + (HALF * HM + r * CH) + gl.arange(0, CH, layout=gl.SliceLayout(1, st))
            rmask = rows < seg_end
            rows64 = rows.to(gl.int64)
            cmask = rmask[:, None] & (cols < N)[None, :]
            dh = dh_buf.slice(HALF * HM + r * CH, CH).load(st).to(gl.float32)
            g = pre_bufs.index(0).slice(HALF * HM + r * CH, CH).load(st).to(gl.float32)
            if GATED:
                u = pre_bufs.index(1).slice(HALF * HM + r * CH, CH).load(st).to(gl.float32)
            else:
                u = g
            wp = w_buf.slice(HALF * HM + r * CH, CH).load(gl.SliceLayout(1, st))
            act_bwd_store(dh, g, u, wp, rows64, cols, rmask, cmask, pid_n, dwp_ptr, hw_ptr, c_ptr,
                          N, stride_dwp, stride_hw, stride_cm, GATED, ACT)
        mbarrier.arrive(pre_empty)

    @gluon.jit
    def _col_halves(t, HM: gl.constexpr, W: gl.constexpr):
        """``t [HM, 2·W]`` as its two column halves ``[HM, W]`` (in a wgmma accumulator's
        layout the half is a register index: no data moves)."""
        return gl.split(gl.permute(gl.reshape(t, [HM, 2, W]), (0, 2, 1)))

    @gluon.jit
    def _tma_store_part(v, buf, c_desc, c_ptr, r0, seg_end, col0, N, stride_cm,
                        HM: gl.constexpr, W: gl.constexpr):
        """``v [HM, W]`` (a consumer's rows from ``r0``, columns from ``col0``) stored through
        ``buf``: rows wholly inside the expert's by one asynchronous TMA store (``c_desc``'s
        ``[HM, W]`` box; columns past N clipped by the descriptor), else -- an expert's last
        tile -- by masked stores from ``buf``. Each part issues at most one TMA store, and a
        part without one first waits for all earlier ones, so waiting until at most one store
        is pending before ``buf`` is overwritten waits for the store that read ``buf`` two
        parts ago (the consumer alternates between two buffers), not for the last part's."""
        st: gl.constexpr = _store_layout(4)
        full = r0 + HM <= seg_end
        if full:
            tma.store_wait(1)
        else:
            tma.store_wait(0)
        _cta_barrier()  # every thread past the wait before any overwrites the buffer
        buf.store(v.to(c_desc.dtype))
        fence_async_shared()
        _cta_barrier()  # all rows written (and fenced) before they are read
        if full:
            _tma_store(c_desc, [r0, col0], buf)
        elif r0 < seg_end:
            rows = r0 + gl.arange(0, HM, layout=gl.SliceLayout(1, st))
            cols = col0 + gl.arange(0, W, layout=gl.SliceLayout(0, st))
            gl.store(c_ptr + rows.to(gl.int64)[:, None] * stride_cm + cols[None, :],
                     buf.load(st), mask=(rows < seg_end)[:, None] & (cols < N)[None, :])

    @gluon.jit
    def _tma_store_half(v, c_smem, c_desc, c_ptr, row0, seg_end, col0, N, stride_cm,
                        HALF: gl.constexpr, HM: gl.constexpr, W2: gl.constexpr):
        """``v [HM, W2]``, a consumer's rows of half a tile's columns (from ``col0``), stored
        as two of the TMA-parts epilogue's four parts, through this consumer's two buffers of
        ``c_smem`` in turn (``_tma_store_part``)."""
        W: gl.constexpr = W2 // 2
        r0 = row0 + HALF * HM
        p0, p1 = _col_halves(v, HM, W)
        _tma_store_part(p0, c_smem.index(2 * HALF), c_desc, c_ptr, r0, seg_end, col0, N,
                        stride_cm, HM, W)
        _tma_store_part(p1, c_smem.index(2 * HALF + 1), c_desc, c_ptr, r0, seg_end, col0 + W,
                        N, stride_cm, HM, W)

    @gluon.jit
    def _tma_store_tile(acc, c_smem, c_desc, c_ptr, row0, seg_end, pid_n, N, stride_cm,
                        HALF: gl.constexpr, HM: gl.constexpr, BN: gl.constexpr,
                        PARTS: gl.constexpr):
        """A consumer's rows of a plain tile stored through shared memory. ``PARTS`` 1: its
        ``[HM, BN]`` half of ``c_smem`` written from the accumulator, then each CH-row chunk
        (``c_desc``'s box) wholly inside the expert's rows sent by an asynchronous TMA store
        (columns past N clipped by the descriptor) and the chunk across the expert's end by
        masked stores; chunks past it skipped. The buffer is reused once this warpgroup's TMA
        stores of the previous tile have read it: the epilogue does not wait for its global
        writes. ``PARTS`` 4: the accumulator in four column parts, in turn through this
        consumer's two ``[HM, BN/4]`` buffers of ``c_smem`` (``_tma_store_part``: a quarter of
        the whole tile's shared memory, so that the ring keeps its slots)."""
        if PARTS > 1:
            gl.static_assert(PARTS == 4, "TMA_STORE: 0, 1 (the whole tile) or 4 (parts)")
            lo, hi = _col_halves(acc, HM, BN // 2)
            _tma_store_half(lo, c_smem, c_desc, c_ptr, row0, seg_end, pid_n * BN, N,
                            stride_cm, HALF, HM, BN // 2)
            _tma_store_half(hi, c_smem, c_desc, c_ptr, row0, seg_end, pid_n * BN + BN // 2, N,
                            stride_cm, HALF, HM, BN // 2)
        else:
            CH: gl.constexpr = c_desc.block_type.shape[0]
            st: gl.constexpr = _store_layout(4)
            half = c_smem.slice(HALF * HM, HM)
            tma.store_wait(0)
            _cta_barrier()  # every thread past the wait before any overwrites the buffer
            half.store(acc.to(c_desc.dtype))
            fence_async_shared()
            _cta_barrier()  # all rows written (and fenced) before the TMA reads them
            first = row0 + HALF * HM
            for c in gl.static_range(HM // CH):
                r0 = first + c * CH
                if r0 + CH <= seg_end:
                    _tma_store(c_desc, [r0, pid_n * BN], half.slice(c * CH, CH))
                elif r0 < seg_end:
                    rows = r0 + gl.arange(0, CH, layout=gl.SliceLayout(1, st))
                    cols = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, st))
                    v = half.slice(c * CH, CH).load(st)
                    gl.store(c_ptr + rows.to(gl.int64)[:, None] * stride_cm + cols[None, :], v,
                             mask=(rows < seg_end)[:, None] & (cols < N)[None, :])

    @gluon.jit
    def _grp_consumer(a_bufs, b_bufs, ready, empty, m_empty, turn, info, info_ready, info_empty,
                      pre_bufs, dh_buf, w_buf, pre_ready, pre_empty, c_smem, c_desc, c_ptr,
                      pre_ptr, hw_ptr, dwp_ptr, sa_ptr, sb_ptr, counts_ptr,
                      offsets_ptr, E, N, K, num_m_tiles, num_tiles, stride_cm, stride_pm,
                      stride_hw, stride_dwp, stride_sa, stride_sbe, stride_sbk, stride_sbn,
                      HALF: gl.constexpr,
                      BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                      STAGES: gl.constexpr, GROUP_M: gl.constexpr, BLOCK_E: gl.constexpr,
                      KPAIR: gl.constexpr, INFO: gl.constexpr, EPI: gl.constexpr,
                      GATED: gl.constexpr, ACT: gl.constexpr, SCALED: gl.constexpr,
                      B_KMAJOR: gl.constexpr, A_GATHER: gl.constexpr, DUAL: gl.constexpr,
                      STORE_PRE: gl.constexpr, STORE_H: gl.constexpr,
                      TMA_STORE: gl.constexpr, PINGPONG: gl.constexpr, CN: gl.constexpr,
                      CM: gl.constexpr, DEFER: gl.constexpr):
        """Consumer ``HALF``: rows ``[HALF·BM/2, (HALF+1)·BM/2)`` of each tile (module doc);
        with ``PINGPONG`` (16-bit, plain or GEMM1 epilogue, one accumulator) all rows of every
        other tile with an expert, so that one consumer's epilogue runs while the other's MMAs
        do; their main loops take turns (``turn``), as a consumer skipping the other's tile
        would otherwise wait on a slot's ``ready`` up to two phases ahead.
        ``SCALED`` (FP8): each k-step's product promoted with its scales, the two consumers'
        MMAs alternating; else (16-bit) the k-steps accumulate in the wgmma, one k-step left
        in flight (its slot released when the next is issued), ``DUAL``: a second accumulator
        (GEMM1's up columns). The epilogue stores the tile (``EPI_STORE``), runs
        ``_act_bwd_epilogue`` (``EPI_ACT_BWD``) or GEMM1's activation (``EPI_ACT_FWD``: pre
        and / or h = act(pre), as ``grouped_gemm._grouped_mm_kernel``). In a cluster of two
        CTAs the consumer's rows of the cluster's tile, each CTA's MMAs on its half of the
        columns (``CN`` 2) or of the rows (``CM`` 2: the consumer's 64 rows in each CTA, one
        ring slot per consumer); a slot is released to both producers (``empty``,
        ``m_empty``). ``DEFER`` (16-bit, plain epilogue by ``TMA_STORE`` parts): a tile's
        first column half is stored at once, its second kept in registers, rounded, and stored
        once the next tile's first k-step's MMA is issued, so that those stores run while the
        tensor cores work (the last tile's after the loop; the whole tile held spills)."""
        CTAS: gl.constexpr = CN * CM
        HM: gl.constexpr = BM // (2 * CM)  # a consumer's rows in each CTA
        RM: gl.constexpr = BM if PINGPONG else HM  # the rows of a tile this consumer computes
        R0: gl.constexpr = 0 if PINGPONG else HALF * HM  # ... from this row of the tile
        RG: gl.constexpr = RM * CM  # ... in all the cluster's CTAs
        SPLIT: gl.constexpr = 1 if CN > 1 else 0  # the tile's dimension split between CTAs
        mma: gl.constexpr = _mma_layout(BN // CN, 4, 8 if SCALED else 16, CTAS, SPLIT)
        st: gl.constexpr = _store_layout(4, CTAS, SPLIT)
        zero = gl.zeros([HM * CM, BN], gl.float32, layout=mma)
        my_turn = turn.index(HALF)
        other_turn = turn.index(1 - HALF)
        nk = K // BK
        it = 0  # k-steps (ring slots) so far
        tn = 0  # turns so far
        tc = 0  # tiles so far
        tp = 0  # tiles with an expert so far
        # DEFER: the previous tile's rounded second column half and where it goes (``held``:
        # one is held)
        if DEFER:
            _unused, held_out = _col_halves(
                gl.zeros([RG, BN], c_ptr.dtype.element_ty, layout=mma), RG, BN // 2)
        else:  # (the halves of a cluster's split layout would not be built)
            held_out = 0
        held_row0 = 0
        held_end = 0
        held_col = 0  # (its first column)
        held = 0
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            if INFO:
                e, pid_n, row0, seg_end = _info_get(info, info_ready, info_empty, tc, CTAS)
                tc += 1
            else:
                e, pid_n, row0, seg_end = _grouped_tile(t, offsets_ptr, counts_ptr,
                                                        E, N, num_m_tiles, BM, BN, GROUP_M,
                                                        BLOCK_E, gl.num_warps(), False, CTAS)
            if e < E:
                # PINGPONG: the consumers take the tiles with an expert in turn, whole
                skip = (tp % 2 != HALF) if PINGPONG else False
                if skip:
                    it += nk  # the other consumer's tile: its k-steps are not ours
                else:
                    if SCALED:
                        rows_m = row0 + HALF * HM + gl.arange(0, HM, layout=gl.SliceLayout(1, mma))
                        rmask_m = rows_m < seg_end
                        sa_base = sa_ptr + gl.where(rmask_m, rows_m, 0).to(gl.int64) * stride_sa
                        sb_base = (sb_ptr + e.to(gl.int64) * stride_sbe
                                   + ((pid_n * BN) // 128) * stride_sbn)
                        acc = gl.zeros([HM, BN], gl.float32, layout=mma)
                        k0 = 0
                        if KPAIR:
                            # two k-steps per turn: twice the MMA work between the turn hand-overs
                            # (each step's product still promoted on its own, in order)
                            for kp in range(0, nk // 2):
                                s1 = it % STAGES
                                s2 = (it + 1) % STAGES
                                sc1 = _step_scales(sa_base, sb_base, 2 * kp, rmask_m, stride_sbk)
                                sc2 = _step_scales(sa_base, sb_base, 2 * kp + 1, rmask_m,
                                                   stride_sbk)
                                p1, p2 = _mma_pair(a_bufs, b_bufs, ready, my_turn, other_turn,
                                                   zero, it, tn, HALF, HM, STAGES)
                                mbarrier.arrive(empty.index(s1))
                                mbarrier.arrive(empty.index(s2))
                                acc = acc + p1 * sc1[:, None]
                                acc = acc + p2 * sc2[:, None]
                                it += 2
                                tn += 1
                            k0 = (nk // 2) * 2
                        for ks in range(k0, nk):
                            s = it % STAGES
                            # the step's scales (global loads) first: their latency overlaps
                            # the waits
                            sc = _step_scales(sa_base, sb_base, ks, rmask_m, stride_sbk)
                            mbarrier.wait(my_turn, (tn & 1) ^ (1 - HALF))  # as in _seg_consumer
                            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                            tok = warpgroup_mma(a_bufs.index(s).slice(HALF * HM, HM),
                                                b_bufs.index(s).permute((1, 0)), zero,
                                                use_acc=False, is_async=True)
                            mbarrier.arrive(other_turn)
                            p = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
                            mbarrier.arrive(empty.index(s))
                            acc = acc + p * sc[:, None]
                            it += 1
                            tn += 1

                    else:
                        acc = gl.zeros([RG, BN], gl.float32, layout=mma)
                        acc2 = gl.zeros([RG, BN], gl.float32, layout=mma)
                        if PINGPONG:
                            # the consumers' main loops in turn: this tile's k-steps are waited
                            # for only once the other consumer has waited for its previous
                            # tile's, so that a slot's ``ready`` is never two phases behind
                            # this wait (its parity could not tell them apart)
                            mbarrier.wait(my_turn, (tn & 1) ^ (1 - HALF))
                        for ks in range(0, nk):
                            s = it % STAGES
                            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                            if A_GATHER:
                                fence_async_shared()  # the cp.async writes before the MMA's reads
                            if CM > 1:  # the consumer's slot: its rows of both CTAs
                                a = a_bufs.index(2 * s + HALF).reshape([RG, BK])
                            else:
                                a = a_bufs.index(s).slice(R0, RM)
                            if B_KMAJOR:
                                acc = warpgroup_mma(a, b_bufs.index(s).permute((1, 0)), acc,
                                                    is_async=True)
                            else:
                                acc = warpgroup_mma(a, b_bufs.index(s), acc, is_async=True)
                            if DUAL:
                                acc2 = warpgroup_mma(a, b_bufs.index(STAGES + s).permute((1, 0)),
                                                     acc2, is_async=True)
                                acc, acc2 = warpgroup_mma_wait(num_outstanding=2, deps=(acc, acc2))
                            else:
                                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                            if ks > 0:  # the previous k-step's MMAs are done: release its slot
                                mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
                                if CTAS > 1:
                                    mbarrier.arrive(m_empty.index((it + STAGES - 1) % STAGES))
                            if DEFER:
                                if ks == 0:
                                    if held != 0:  # under this k-step's MMA
                                        _tma_store_half(held_out, c_smem, c_desc, c_ptr,
                                                        held_row0, held_end, held_col, N,
                                                        stride_cm, HALF, HM, BN // 2)
                                        held = 0
                            it += 1
                        if PINGPONG:  # the other consumer's main loop may start
                            mbarrier.arrive(other_turn)
                            tn += 1
                        if DUAL:
                            acc, acc2 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, acc2))
                        else:
                            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                        if nk > 0:
                            mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
                            if CTAS > 1:
                                mbarrier.arrive(m_empty.index((it + STAGES - 1) % STAGES))

                    if CM > 1:  # CTA c's rows of this consumer: c·BM/2 + HALF·HM + [0, HM)
                        r_s = gl.arange(0, RG, layout=gl.SliceLayout(1, st))
                        rows_s = row0 + (r_s // HM) * (2 * HM) + HALF * HM + r_s % HM
                    else:
                        rows_s = row0 + R0 + gl.arange(0, RM, layout=gl.SliceLayout(1, st))
                    cols_s = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, st))
                    cmask = (rows_s < seg_end)[:, None] & (cols_s < N)[None, :]
                    rows64 = rows_s.to(gl.int64)
                    if EPI == EPI_ACT_BWD:
                        _act_bwd_epilogue(acc, pre_bufs, dh_buf, w_buf, pre_ready, pre_empty, tp,
                                          c_ptr, hw_ptr, dwp_ptr, row0, seg_end, pid_n, N,
                                          stride_cm, stride_hw, stride_dwp, HALF, HM, BN, GATED,
                                          ACT)
                    elif EPI == EPI_ACT_FWD:
                        # h from the pre-activation rounded to its storage dtype (as the Triton
                        # kernel: the same h whether pre is stored or recomputed in backward)
                        g = gl.convert_layout(acc.to(pre_ptr.dtype.element_ty), st)
                        p_ptrs = pre_ptr + rows64[:, None] * stride_pm + cols_s[None, :]
                        if STORE_PRE:
                            gl.store(p_ptrs, g, mask=cmask)
                        if GATED:
                            u = gl.convert_layout(acc2.to(pre_ptr.dtype.element_ty), st)
                            if STORE_PRE:
                                gl.store(p_ptrs + N, u, mask=cmask)
                        else:
                            u = g
                        if STORE_H:
                            h = act_fwd(g.to(gl.float32), u.to(gl.float32), ACT)
                            gl.store(c_ptr + rows64[:, None] * stride_cm + cols_s[None, :],
                                     h.to(c_ptr.dtype.element_ty), mask=cmask)
                    elif DEFER:  # the first half now, the second under the next tile's MMA
                        lo, hi = _col_halves(acc, HM, BN // 2)
                        _tma_store_half(lo, c_smem, c_desc, c_ptr, row0, seg_end, pid_n * BN, N,
                                        stride_cm, HALF, HM, BN // 2)
                        held_out = hi.to(c_ptr.dtype.element_ty)
                        held_row0 = row0
                        held_end = seg_end
                        held_col = pid_n * BN + BN // 2
                        held = 1
                    elif TMA_STORE:
                        _tma_store_tile(acc, c_smem, c_desc, c_ptr, row0, seg_end, pid_n, N,
                                        stride_cm, HALF, HM, BN, TMA_STORE)
                    else:
                        out = gl.convert_layout(acc.to(c_ptr.dtype.element_ty), st)
                        gl.store(c_ptr + rows64[:, None] * stride_cm + cols_s[None, :], out,
                                 mask=cmask)
                tp += 1
        if DEFER:
            if held != 0:
                _tma_store_half(held_out, c_smem, c_desc, c_ptr, held_row0, held_end, held_col,
                                N, stride_cm, HALF, HM, BN // 2)
        if TMA_STORE:
            tma.store_wait(0)  # the last tile's stores done reading shared memory


    @gluon.jit
    def _grouped_mm_ws(
            a_desc, b_desc, pre_desc, c_desc, c_ptr, pre_ptr, hw_ptr, dwp_ptr, w_ptr, a_ptr,
            gather_ptr, sa_ptr, sb_ptr, counts_ptr, offsets_ptr, E, N, NB, K,
            num_m_tiles, num_tiles, stride_a, stride_cm, stride_pm, stride_hw, stride_dwp,
            stride_sa, stride_sbe, stride_sbk, stride_sbn, BM: gl.constexpr, BN: gl.constexpr,
            BK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
            BLOCK_E: gl.constexpr, KPAIR: gl.constexpr, INFO: gl.constexpr, EPI: gl.constexpr,
            GATED: gl.constexpr, ACT: gl.constexpr, SCALED: gl.constexpr,
            B_KMAJOR: gl.constexpr, A_GATHER: gl.constexpr, TOPK: gl.constexpr,
            STORE_PRE: gl.constexpr, STORE_H: gl.constexpr, LOAD_WARPS: gl.constexpr,
            LOAD_REGS: gl.constexpr, MMA_REGS: gl.constexpr,
            TMA_STORE: gl.constexpr, PINGPONG: gl.constexpr, CN: gl.constexpr,
            CM: gl.constexpr, DEFER: gl.constexpr, num_warps: gl.constexpr):
        """The row-grouped GEMM: a producer + two consumers (module doc). ``SCALED``: FP8 with
        block scales (the consumers' MMAs ping-pong); else 16-bit operands accumulated in the
        wgmma. ``EPI_ACT_BWD``: the activation backward fused into the dh' GEMM's
        epilogue; ``EPI_ACT_FWD`` (16-bit, B K-major): GEMM1 with its activation (gated: the
        gate and up tiles in one ring slot, two accumulators). ``TMA_STORE`` (16-bit, plain
        epilogue): the tile stored through shared memory by ``c_desc``'s TMA
        (``_tma_store_tile``), the consumers on to the next tile while it is written.
        ``PINGPONG`` (16-bit, one accumulator, plain or GEMM1 epilogue): each consumer computes
        whole tiles, every other one (a ring slot is released by one consumer). ``CN`` 2
        (16-bit, A by TMA, plain epilogue by registers, also ``PINGPONG``; Triton >= 3.8):
        launched as clusters of two CTAs along the columns, a tile ``BN`` columns wide split
        between them, A's tile loaded once for both (TMA multicast, ``_grp_producer``). ``CM``
        2 (16-bit, A gathered, plain or GEMM1 epilogue by registers; Triton >= 3.8): clusters
        of two CTAs along the rows, a tile ``BM`` (256) rows high split between them, B's
        tiles loaded once for both. ``DEFER`` (``TMA_STORE`` 4, one CTA, no ``PINGPONG``): each
        tile's second column half is stored under the next tile's first MMAs
        (``_grp_consumer``)."""
        gl.static_assert(not DEFER or (TMA_STORE == 4 and CN * CM == 1 and not PINGPONG),
                         "DEFER: TMA_STORE 4, one CTA a tile, no PINGPONG")
        gl.static_assert(num_warps == 4, "the default partition is consumer 0: one warpgroup")
        gl.static_assert(not TMA_STORE or (EPI != EPI_ACT_FWD and EPI != EPI_ACT_BWD
                                           and not SCALED), "TMA_STORE: 16-bit, plain epilogue")
        gl.static_assert(BM == 128 * CM or (BM == 256 and CM == 1 and not SCALED
                                            and not PINGPONG and EPI == EPI_STORE),
                         "two consumers of 64 rows (in each CTA), or of 128 (16-bit, plain)")
        gl.static_assert(EPI != EPI_ACT_FWD or (B_KMAJOR and not SCALED), "GEMM1: 16-bit")
        DUAL: gl.constexpr = EPI == EPI_ACT_FWD and GATED
        gl.static_assert(not PINGPONG or not (SCALED or DUAL or TMA_STORE or EPI == EPI_ACT_BWD),
                         "PINGPONG: 16-bit, one accumulator, plain or GEMM1 epilogue")
        gl.static_assert(CN == 1 or not (SCALED or A_GATHER or DUAL or TMA_STORE
                                         or EPI != EPI_STORE or CM > 1),
                         "CN 2: 16-bit, A by TMA, one accumulator, the plain epilogue")
        gl.static_assert(CM == 1 or (A_GATHER and not (SCALED or PINGPONG or TMA_STORE
                                                       or EPI == EPI_ACT_BWD)),
                         "CM 2: 16-bit, A gathered, the plain or GEMM1 epilogue")
        CTAS: gl.constexpr = CN * CM
        if CM > 1:  # per ring slot and consumer its rows of both CTAs (``_grp_producer``)
            a_lay: gl.constexpr = gl.NVMMASharedLayout.get_default_for(
                [2, BM // 4, BK], a_desc.dtype, cga_layout=_cga(2, 3, 0))
            a_bufs = gl.allocate_shared_memory(a_desc.dtype, [2 * STAGES, 2, BM // 4, BK], a_lay)
        else:
            a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_shape,
                                               a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES * (1 + DUAL)]
                                           + b_desc.block_shape, b_desc.layout)
        ready = _bars(STAGES, CTAS)
        empty = _bars(STAGES, CTAS)
        turn = _bars(2, CTAS)
        if CTAS > 1:
            m_empty = _bars(STAGES, CTAS, True)  # the shared operand's slots, both CTAs'
        else:
            m_empty = empty  # unused
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=1 if PINGPONG else 2)  # the slot's consumers
            if CTAS > 1:  # the slot's consumers in each CTA (the first CTA's count doubled)
                mbarrier.init(m_empty.index(s), count=1 if PINGPONG else 2)
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)
        info, info_ready, info_empty = _info_alloc(CTAS)
        # EPI_ACT_BWD: the pre-activation tiles (gate, up), dh' and the routing weights of a tile
        # (else token allocations: pre_desc is a stand-in)
        plain: gl.constexpr = _plain_smem(CTAS)
        if EPI == EPI_ACT_BWD:
            pre_bufs = gl.allocate_shared_memory(pre_desc.dtype, [2] + pre_desc.block_shape,
                                                 pre_desc.layout)
            dh_buf = gl.allocate_shared_memory(pre_desc.dtype, [BM, BN],
                                               gl.SwizzledSharedLayout(8, 1, 8, order=[1, 0]))
            w_buf = gl.allocate_shared_memory(gl.float32, [BM], plain)
        else:
            pre_bufs = gl.allocate_shared_memory(gl.float32, [2, 4], plain)
            dh_buf = gl.allocate_shared_memory(gl.float32, [4], plain)
            w_buf = gl.allocate_shared_memory(gl.float32, [4], plain)
        if TMA_STORE == 1:  # the output tile on its way out (else a token allocation)
            c_smem = gl.allocate_shared_memory(c_desc.dtype, [BM, BN], c_desc.layout)
        elif TMA_STORE == 4:  # two buffers per consumer of one column part of its rows
            c_smem = gl.allocate_shared_memory(c_desc.dtype, [4, BM // 2, BN // TMA_STORE],
                                               c_desc.layout)
        else:
            c_smem = gl.allocate_shared_memory(gl.float32, [4], plain)
        pre_ready = gl.allocate_shared_memory(gl.int64, [CTAS], _bar_layout(CTAS))
        pre_empty = gl.allocate_shared_memory(gl.int64, [CTAS], _bar_layout(CTAS))
        mbarrier.init(pre_ready, count=2)  # the producer's expect and its weights' arrive
        mbarrier.init(pre_empty, count=2)  # both consumers

        gl.warp_specialize([
            (_grp_consumer, (a_bufs, b_bufs, ready, empty, m_empty, turn, info, info_ready,
                             info_empty, pre_bufs, dh_buf, w_buf, pre_ready, pre_empty, c_smem,
                             c_desc, c_ptr, pre_ptr, hw_ptr, dwp_ptr, sa_ptr, sb_ptr,
                             counts_ptr, offsets_ptr, E, N, K, num_m_tiles,
                             num_tiles, stride_cm, stride_pm, stride_hw, stride_dwp, stride_sa,
                             stride_sbe, stride_sbk, stride_sbn, 0, BM, BN, BK, STAGES, GROUP_M,
                             BLOCK_E, KPAIR, INFO, EPI, GATED, ACT, SCALED, B_KMAJOR, A_GATHER,
                             DUAL, STORE_PRE, STORE_H, TMA_STORE, PINGPONG, CN, CM, DEFER)),
            (_grp_consumer, (a_bufs, b_bufs, ready, empty, m_empty, turn, info, info_ready,
                             info_empty, pre_bufs, dh_buf, w_buf, pre_ready, pre_empty, c_smem,
                             c_desc, c_ptr, pre_ptr, hw_ptr, dwp_ptr, sa_ptr, sb_ptr,
                             counts_ptr, offsets_ptr, E, N, K, num_m_tiles,
                             num_tiles, stride_cm, stride_pm, stride_hw, stride_dwp, stride_sa,
                             stride_sbe, stride_sbk, stride_sbn, 1, BM, BN, BK, STAGES, GROUP_M,
                             BLOCK_E, KPAIR, INFO, EPI, GATED, ACT, SCALED, B_KMAJOR, A_GATHER,
                             DUAL, STORE_PRE, STORE_H, TMA_STORE, PINGPONG, CN, CM, DEFER)),
            (_grp_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, m_empty, info,
                             info_ready, info_empty, pre_desc, pre_bufs, w_buf, pre_ready,
                             pre_empty, w_ptr, a_ptr, gather_ptr, counts_ptr,
                             offsets_ptr, E, N, NB, K, num_m_tiles, num_tiles, stride_a, BM, BN,
                             BK, STAGES, GROUP_M, BLOCK_E, INFO, EPI, GATED, B_KMAJOR, A_GATHER,
                             DUAL, TOPK, CN, CM)),
        ], [4, LOAD_WARPS], [MMA_REGS, LOAD_REGS])


def grouped_fits(a, b, stride_b, n: int, k: int) -> bool:
    """Whether ``grouped_mm`` serves these operands: K a multiple of 128, ``a [S, k]`` with
    contiguous 16-byte aligned rows, B (strides (expert, k, n)) stored as ``[E·n, k]``."""
    return (k % 128 == 0 and a.stride(1) == 1 and a.stride(0) % 16 == 0
            and a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0
            and stride_b[1] == 1 and stride_b[2] == k and stride_b[0] == n * k)


def grouped_mm(tune: tuning.Tuning, a, sa, b, sb, stride_sb, c, meta, *, n: int, k: int):
    """``c [S, n] = Σ_kb (A[p, kb] · B_e[kb, n]) · scales`` (``grouped_fits`` operands; A rows
    in expert order: no gather). ``stride_sb``: B scales' (expert, k-block, n-block) strides."""
    _grouped_launch(tune, dict(tune.gluon_config), a, sa, b, sb, stride_sb, c, meta, n, k,
                    epi=Epilogue.STORE)
    return c


def act_bwd_fits(pre, dpre, hw) -> bool:
    """Whether ``grouped_mm_act_bwd`` serves these tensors: 16-bit, contiguous rows,
    16-byte aligned (``pre`` is TMA-loaded)."""
    return (pre.dtype in (torch.bfloat16, torch.float16) and dpre.dtype == pre.dtype
            and all(t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
                    and t.data_ptr() % 16 == 0 for t in (pre, dpre, hw)))


def grouped_mm_act_bwd(tune: tuning.Tuning, a, sa, b, sb, stride_sb, pre, weights, meta, dpre,
                       hw, *, n: int, k: int, gated: bool, act: int, gather: bool = False):
    """dh' = the row-grouped GEMM with ``grouped_gemm._act_bwd_kernel`` fused into its epilogue
    (``_act_bwd_epilogue``): writes ``dpre`` and ``hw`` without storing dh' and returns the
    routing-weight gradient per slot (fp32 ``[S]``, the sum of the epilogue's partials, one
    per column tile). Bitwise the split form's ``dpre`` and ``hw`` (dh' is rounded to
    ``pre``'s dtype as the split form stores it). FP8 (``sa`` given; B K-major, as
    ``grouped_mm``) with ``tune.gluon_config`` / ``gluon_epi_config``, or bf16 (``sa`` None;
    ``grouped_direct_fits`` operands, B = W_down N-major, ``gather``: dout's token rows) with
    ``_bf16_config(tune, gather, tune.gluon_bf16_epi_config)``."""
    if sa is None:
        cfg = _bf16_config(tune, gather, tune.gluon_bf16_epi_config)
    else:
        cfg = {**tune.gluon_config, **tune.gluon_epi_config}
    dwp = torch.empty(cdiv(n, cfg["BN"]), pre.shape[0], dtype=torch.float32,
                      device=pre.device)
    pre_desc = TensorDescriptor.from_tensor(pre, [cfg["BM"], cfg["BN"]],
                                            _unswizzled_layout(pre.element_size() * 8, 2))
    _grouped_launch(tune, cfg, a, sa, b, sb, stride_sb, dpre, meta, n, k, epi=Epilogue.ACT_BWD,
                    pre_desc=pre_desc, hw=hw, dwp=dwp, weights=weights, gated=gated, act=act,
                    b_kmajor=sa is not None, gather=gather)
    return dwp.sum(0)


def _bf16_config(tune: tuning.Tuning, gather: bool, extra: dict) -> dict:
    """The 16-bit row-grouped GEMM's launch configuration: ``tune.gluon_bf16_config``, with a
    gathered A ``gluon_bf16_gather_config`` over it, then ``extra`` (the GEMM's own)."""
    return {**tune.gluon_bf16_config, **(tune.gluon_bf16_gather_config if gather else {}),
            **extra}


# the epilogues ``grouped_mm_direct`` runs (the fused dh' one is ``grouped_mm_act_bwd``'s)
DIRECT_EPILOGUES = (Epilogue.STORE, Epilogue.ACT_FWD)


def grouped_direct_fits(a, b, stride_b, n: int, k: int, *, epi: Epilogue = Epilogue.STORE,
                        gated: bool = False, bk: int = 64) -> bool:
    """Whether ``grouped_mm_direct`` serves these operands: bf16 (the dtype its GPU tests run;
    fp16 stays on the Triton kernel), ``a [rows, k]`` with contiguous 16-byte aligned rows, K
    a multiple of ``bk``; B (strides (expert, k, n)) stored K-major as ``[E·NB, k]`` (NB = n,
    twice n for the gated GEMM1: the TMA descriptor spans exactly the weights) or N-major as
    ``[E·k, n]`` (n a multiple of 8); GEMM1 (``Epilogue.ACT_FWD``) K-major only, the fused
    dh' (``Epilogue.ACT_BWD``, ``grouped_mm_act_bwd``) N-major only."""
    if not (a.dtype == torch.bfloat16 and b.dtype == a.dtype and a.dim() == 2
            and a.stride(1) == 1 and (a.stride(0) * 2) % 16 == 0 and a.data_ptr() % 16 == 0
            and b.data_ptr() % 16 == 0 and k > 0 and k % bk == 0 and n > 0
            and epi in (Epilogue.STORE, Epilogue.ACT_FWD, Epilogue.ACT_BWD)):
        return False
    if stride_b[1] == 1 and stride_b[2] == k:  # K-major
        cols = n * (2 if gated and epi == Epilogue.ACT_FWD else 1)
        return epi != Epilogue.ACT_BWD and stride_b[0] == cols * k
    return (epi != Epilogue.ACT_FWD and stride_b[2] == 1 and stride_b[1] == n
            and stride_b[0] == n * k and n % 8 == 0)


def grouped_mm_direct(tune: tuning.Tuning, a, b, stride_b, c, meta, *, n: int, k: int,
                      gather: bool, epi: Epilogue = Epilogue.STORE, pre=None, gated=False,
                      act=0, store_pre=False, store_h=True, kind=None):
    """``grouped_gemm._grouped_mm_kernel``'s contract on 16-bit operands (``grouped_direct_fits``;
    no bias): ``C[p, n] = Σ_k A[row(p), k] · B_e[k, n]``, fp32 accumulation over 64-wide
    k-steps in order (the Triton kernel's sums). ``gather``: A's rows are ``sorted_slot[p] //
    top_k`` (copied by ``cp.async`` from the producer warps), else ``p`` (TMA).
    ``Epilogue.ACT_FWD``: GEMM1 (``c`` = h when ``store_h``; ``pre`` = the pre-activation,
    stored when ``store_pre``, else its rounding dtype is ``c``'s). ``kind`` (a key of
    ``Tuning.gemm_configs``: "up", "down", "dh", "dx"): ``tune.gluon_bf16_kind_configs[kind]``
    applies over the GEMM's configuration."""
    if epi not in DIRECT_EPILOGUES:
        raise ValueError(f"grouped_mm_direct: epi={epi!r}; the dh' GEMM with the activation "
                         "backward in its epilogue is grouped_mm_act_bwd")
    cfg = _bf16_config(tune, gather,
                       {**(tune.gluon_bf16_up_config if epi == Epilogue.ACT_FWD else {}),
                        **tune.gluon_bf16_kind_configs.get(kind, {})})
    b_kmajor = stride_b[1] == 1 and stride_b[2] == k
    _grouped_launch(tune, cfg, a, None, b, None, (0, 0, 0), c, meta, n, k, epi=epi,
                    b_kmajor=b_kmajor, nb=stride_b[0] // k if b_kmajor else n, gather=gather,
                    pre=pre, gated=gated, act=act, store_pre=store_pre, store_h=store_h)
    return c


def _grouped_launch(tune: tuning.Tuning, cfg: dict, a, sa, b, sb, stride_sb, c, meta, n, k, *,
                    epi: Epilogue, pre_desc=None, hw=None, dwp=None, weights=None,
                    gated=False, act=0, b_kmajor=True, nb=None, gather=False, pre=None,
                    store_pre=False, store_h=True):
    """One launch of ``_grouped_mm_ws``: FP8 with scales (``sa`` given; ``tune.gluon_config``
    tiles, BK 128) or 16-bit (BK ``cfg["BK"]``)."""
    scaled = sa is not None
    bk = 128 if scaled else cfg["BK"]
    S = meta.sorted_slot.numel()
    E = meta.num_experts
    if S == 0:
        return
    nb = n if nb is None else nb
    out = c if c is not None else pre
    # the output's TMA stores (16-bit, plain epilogue, ``cfg["TMA_STORE"]``): 1 (True) the
    # whole tile staged, CH-row boxes; 4: in four column parts through two buffers per
    # consumer, one [BM/2, BN/4] box each
    parts = int(cfg.get("TMA_STORE", 0))
    tma_store = (parts > 0 and not scaled and epi == Epilogue.STORE
                 and out.stride(1) == 1 and (out.stride(0) * out.element_size()) % 16 == 0
                 and out.data_ptr() % 16 == 0)
    # the consumers on whole tiles in turn (``cfg["PINGPONG"]``): 16-bit, one accumulator, the
    # plain or GEMM1 epilogue by registers
    pingpong = (bool(cfg.get("PINGPONG", False)) and not scaled and not tma_store
                and epi != Epilogue.ACT_BWD and not (epi == Epilogue.ACT_FWD and gated))
    # clusters of two CTAs (``cfg["CLUSTER"]`` 2; 16-bit, the plain epilogue or GEMM1's by
    # registers; a Triton whose Gluon has multicast): along the columns sharing A's tiles
    # (A by TMA: GEMM2, dx; also with PINGPONG), or along the rows sharing B's (A gathered:
    # GEMM1, dh')
    cluster = (cfg.get("CLUSTER", 1) == 2 and not (scaled or tma_store or (pingpong and gather))
               and (epi == Epilogue.STORE or (epi == Epilogue.ACT_FWD and gather))
               and cluster_compiles())
    # the second column half of each tile's TMA stores under the next tile's first MMAs
    # (``cfg["DEFER"]``; the parts epilogue, which ``pingpong`` and ``cluster`` exclude; A by
    # TMA: with a gathered A the consumers' registers (``gluon_bf16_gather_config``) cannot
    # hold the half beside the next tile's accumulator without spilling; K of at least one
    # k-step: the held half is stored at the next tile's first)
    defer = (bool(cfg.get("DEFER", False)) and tma_store and parts == 4 and not gather
             and k >= bk)
    cn = 2 if cluster and not gather else 1
    cm = 2 if cluster and gather else 1
    bm, bn = cfg["BM"] * cm, cfg["BN"] * cn  # the tile (a cluster's: each CTA cfg's)
    if scaled:
        a_lay = b_lay = _smem_layout()
    else:
        # the CTAs' halves of a tile (split), or the same tile in both (None)
        a_lay = _nvmma_layout(bm, bk, a.dtype, cn * cm, 0 if cm > 1 else None)
        b_split = None if cn == 1 else (0 if b_kmajor else 1)
        b_lay = (_nvmma_layout(bn, bk, a.dtype, cn * cm, b_split) if b_kmajor
                 else _nvmma_layout(bk, bn, a.dtype, cn * cm, b_split))
    # a gathered A: the descriptor only gives the shared layout of its tiles
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk], a_lay)
    if b_kmajor:
        b_desc = TensorDescriptor.from_tensor(b.as_strided((E * nb, k), (k, 1)), [bn, bk], b_lay)
    else:
        b_desc = TensorDescriptor.from_tensor(b.as_strided((E * k, n), (n, 1)), [bk, bn], b_lay)
    num_m_tiles, (num_tiles,) = grouped_schedule(meta, bm, bn, n)
    # stand-ins where the epilogue does not use them: the kernel uses ``pre_ptr`` only in
    # GEMM1's epilogue (its dtype, and the pre-activation stored there; GEMM1 passes ``pre``);
    # the fused dh' reads its pre-activation by TMA through ``pre_desc``, so an epilogue that
    # loads ``pre_ptr`` must be given ``pre``
    pre = out if pre is None else pre
    hw = out if hw is None else hw
    dummy = meta.counts
    c_desc = None
    if tma_store:
        box = [16, bn] if parts == 1 else [bm // 2, bn // parts]
        c_desc = TensorDescriptor.from_tensor(out, box, _nvmma_layout(*box, out.dtype))
    # without the fused dh' epilogue pre_desc is unused, without TMA_STORE c_desc: b_desc
    # stands in for them
    grid = (_programs(tune, num_tiles, out.device, cn * cm),)
    kernel = launcher(_grouped_mm_ws, tune.fast_launch)[grid](
        a_desc, b_desc, b_desc if pre_desc is None else pre_desc,
        b_desc if c_desc is None else c_desc, out, pre, hw,
        dummy if dwp is None else dwp, dummy if weights is None else weights, a,
        meta.sorted_slot, dummy if sa is None else sa, dummy if sb is None else sb,
        meta.counts, meta.offsets, E, n, nb, k, num_m_tiles, num_tiles, a.stride(0),
        out.stride(0), pre.stride(0), hw.stride(0), 0 if dwp is None else dwp.stride(0),
        0 if sa is None else sa.stride(0), stride_sb[0], stride_sb[1], stride_sb[2],
        BM=bm, BN=bn, BK=bk, STAGES=cfg["STAGES"], GROUP_M=cfg["GROUP_M"],
        BLOCK_E=max(32, next_pow2(E)), KPAIR=cfg.get("KPAIR", False),
        INFO=cfg["INFO"], EPI=int(epi), GATED=gated, ACT=int(act), SCALED=scaled,
        B_KMAJOR=b_kmajor, A_GATHER=gather, TOPK=meta.top_k, STORE_PRE=store_pre,
        STORE_H=store_h, LOAD_WARPS=cfg.get("LOAD_WARPS", 1), LOAD_REGS=cfg["LOAD_REGS"],
        MMA_REGS=cfg["MMA_REGS"], TMA_STORE=parts if tma_store else 0, PINGPONG=pingpong,
        CN=cn, CM=cm, DEFER=defer,
        num_warps=4, num_ctas=cn * cm, maxnreg=cfg["MAXNREG"])
    if cn * cm > 1 and kernel is not None:
        _note_cluster_capacity(out.device, kernel, cn * cm)


@functools.lru_cache(maxsize=None)
def _nvmma_layout(rows: int, cols: int, dtype: torch.dtype, cn: int = 1, split=None):
    """The default swizzled shared layout of ``[rows, cols]`` TMA tiles of ``dtype`` (cached: the
    launch path runs per GEMM call); for a kernel launched as clusters of ``cn`` (2) CTAs,
    the tile split between them along dimension ``split`` (or, None, whole in each)."""
    if cn == 1:
        return gl.NVMMASharedLayout.get_default_for([rows, cols], _GL_DTYPE[dtype])
    return gl.NVMMASharedLayout.get_default_for([rows, cols], _GL_DTYPE[dtype],
                                                cga_layout=_cga(cn, 2, split))


# (device, clusters' CTAs): how many clusters of a kernel fit on the device at once, as the
# driver reported after the kernel's first launch (``_note_cluster_capacity``)
_CLUSTER_CAPACITY = {}


def _note_cluster_capacity(device, kernel, cn: int):
    """Records, once per device and cluster size, how many clusters of ``kernel`` (one CTA per
    SM: its shared memory) the device runs at once, so that later grids are no larger."""
    key = (device, cn)
    if key in _CLUSTER_CAPACITY:
        return
    try:
        from triton.runtime.driver import driver
        n = driver.active.utils.cuOccupancyMaxActiveClusters(
            kernel.function, kernel.metadata.shared, cn)
    except Exception:  # a driver without the query (or a stand-in): one per SM pair
        n = 0
    _CLUSTER_CAPACITY[key] = n if n > 0 else None


def _programs(tune: tuning.Tuning, num_tiles: int, device, cn: int = 1) -> int:
    """Grid of a persistent kernel: one program per SM (or ``tune.gluon_programs``), at most
    one per tile; launched as clusters of ``cn`` CTAs, one cluster per ``cn`` of them and no
    more than the device runs at once (``_note_cluster_capacity``: a cluster that waited for
    another to finish would double the kernel's tail)."""
    n = (tune.gluon_programs or sm_count(device)) // cn
    if cn > 1 and _CLUSTER_CAPACITY.get((device, cn)):
        n = min(n, _CLUSTER_CAPACITY[(device, cn)])
    return max(1, min(num_tiles, n))


def grouped_schedule(meta, bm: int, bn: int, n: int):
    """A row-grouped launch's worst-case row-tile count and grid (``_grouped_tile`` finds a
    tile's expert from the counts on the device)."""
    S = meta.sorted_slot.numel()
    num_m_tiles = cdiv(S, bm) + min(meta.num_experts, S)
    return num_m_tiles, (num_m_tiles * cdiv(n, bn),)


if _HAVE_GLUON:
    @gluon.jit
    def _seg_tile(t, counts_ptr, offsets_ptr, MO, NO, E, PADDED: gl.constexpr, GS: gl.constexpr,
                  BM: gl.constexpr, BN: gl.constexpr, BLOCK_E: gl.constexpr,
                  GROUP_M: gl.constexpr):
        """Weight-gradient tile t's (expert, MO tile, NO tile, first, k-steps): tiles run
        expert-major; within an expert, bands of ``GROUP_M`` MO tiles, each band over the NO
        tiles with its MO tiles fastest (the programs working at once share A's and B's
        column slabs in L2; ``GROUP_M`` 1: MO tiles, then NO tiles). ``PADDED`` (the FP8
        group layout): first group and groups of GS tokens; else the expert's first row and
        its token count."""
        tiles_m = gl.cdiv(MO, BM)
        tiles_n = gl.cdiv(NO, BN)
        e = t // (tiles_m * tiles_n)
        r = t % (tiles_m * tiles_n)
        per_band = GROUP_M * tiles_n
        first_m = (r // per_band) * GROUP_M
        size_m = gl.minimum(tiles_m - first_m, GROUP_M)
        tm = first_m + (r % per_band) % size_m
        tn = (r % per_band) // size_m
        if PADDED:
            ex = gl.arange(0, BLOCK_E, layout=_vector_layout(gl.num_warps(), BLOCK_E))
            cnt_v = gl.load(counts_ptr + ex, mask=ex < E, other=0)
            groups = (cnt_v + GS - 1) // GS
            first = gl.sum(gl.where(ex < e, groups, 0), 0)
            ng = gl.sum(gl.where(ex == e, groups, 0), 0)
        else:
            first = gl.load(offsets_ptr + e)
            ng = gl.load(counts_ptr + e)
        return e, tm, tn, first, ng

    @gluon.constexpr_function
    def _gather_layout(cols, num_warps):
        """``[rows, cols]`` 16-bit tiles copied row by row: 8 consecutive columns (16 bytes)
        per thread, the lanes along the columns first."""
        lanes = min(32, cols // 8)
        return gl.BlockedLayout([1, 8], [32 // lanes, lanes], [num_warps, 1], [1, 0])

    @gluon.constexpr_function
    def _gather_layout3(cols, num_warps):
        """``_gather_layout`` of ``[2, rows, cols]`` tiles split between a cluster's two CTAs
        along the first dimension (each CTA copies its own rows)."""
        lanes = min(32, cols // 8)
        return gl.BlockedLayout([1, 1, 8], [1, 32 // lanes, lanes], [1, num_warps, 1],
                                [2, 1, 0], cga_layout=_cga(2, 3, 0))

    @gluon.jit
    def _seg_producer(a_desc, b_desc, sa_desc, sb_desc, c_desc, a_bufs, b_bufs, sa_bufs,
                      sb_bufs, c_buf, ready, empty, c_ready, c_empty, info, info_ready,
                      info_empty, a_ptr, b_ptr, gather_ptr, counts_ptr, offsets_ptr, MO, NO, E,
                      num_tiles, stride_a, stride_b, PADDED: gl.constexpr, TOPK: gl.constexpr,
                      A_GATHER: gl.constexpr, B_GATHER: gl.constexpr, ACCUM: gl.constexpr,
                      GS: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
                      BLOCK_E: gl.constexpr, INFO: gl.constexpr, GROUP_M: gl.constexpr):
        """The ring over this program's tiles and their k-steps (``it`` counts the k-steps over
        all tiles: ring slot ``it % STAGES``, pass ``it // STAGES``); with ``ACCUM == 2``,
        after a tile's k-steps, the tile of the buffer added into (``c_buf``, ``c_ready`` /
        ``c_empty``: one tile, released by both consumers' epilogues).

        ``PADDED`` (FP8): per k-step TMA copies of both operands' group blocks and their scale
        vectors. Else (16-bit operands in place, GS tokens a k-step): A's two ``[GS, BM/2]``
        halves (one per consumer) and B's ``[GS, BN]`` tile, rows ``offsets[e] + ks·GS + i``;
        a contiguous operand by TMA, the gathered one (``A_GATHER`` / ``B_GATHER``: rows
        ``gather[p] // TOPK``) by ``cp.async`` from these warps, their completion tracked by
        ``ready`` too. Rows past the expert's tokens are zero-filled: in an expert's last,
        partial k-step both operands are copied by ``cp.async``."""
        HM: gl.constexpr = BM // 2
        if PADDED:
            nbytes: gl.constexpr = (BM + BN) * GS + (BM + BN) * 4
        else:
            nbytes: gl.constexpr = ((1 - A_GATHER) * BM + (1 - B_GATHER) * BN) * GS * 2
        ga: gl.constexpr = _gather_layout(HM, gl.num_warps())
        gb: gl.constexpr = _gather_layout(BN, gl.num_warps())
        if not PADDED:
            # whole 16-byte vectors per copy: the row strides and column counts are multiples
            # of 8 (``segment_direct_fits``); written so that the compiler knows it
            stride_a = stride_a // 8 * 8
            stride_b = stride_b // 8 * 8
            MO = MO // 8 * 8
            NO = NO // 8 * 8
        it = 0
        tc = 0  # tiles so far
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            e, tm, tn, first, cnt = _seg_tile(t, counts_ptr, offsets_ptr, MO, NO, E, PADDED, GS,
                                              BM, BN, BLOCK_E, GROUP_M)
            if PADDED:
                ng = cnt
            else:
                ng = gl.cdiv(cnt, GS)
            if INFO:
                _info_put(info, info_ready, info_empty, tc, e, tm, tn, ng)
            if not PADDED:
                # the gathered rows' indices run one k-step ahead (their latency spent on the
                # current k-step's copies)
                ia = first + gl.arange(0, GS, layout=gl.SliceLayout(1, ga))
                ib = first + gl.arange(0, GS, layout=gl.SliceLayout(1, gb))
                na = gl.load(gather_ptr + ia, mask=A_GATHER & (ia < first + cnt), other=0)
                nb = gl.load(gather_ptr + ib, mask=B_GATHER & (ib < first + cnt), other=0)
            for ks in range(0, ng):
                s = it % STAGES
                if not PADDED:
                    if A_GATHER:
                        pa = ia + ks * GS
                        ra = na // TOPK
                        na = gl.load(gather_ptr + pa + GS, mask=pa + GS < first + cnt, other=0)
                    if B_GATHER:
                        pb = ib + ks * GS
                        rb = nb // TOPK
                        nb = gl.load(gather_ptr + pb + GS, mask=pb + GS < first + cnt, other=0)
                # the slot's previous use released by both consumers (the first pass over the
                # ring waits on the phase before the barrier's first: complete at init)
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                bar = ready.index(s)
                if PADDED:
                    # the consumers read the slot's scale vectors with generic loads: order
                    # those before the TMA (async proxy) overwrite
                    fence_async_shared()
                    g = first + ks
                    mbarrier.expect(bar, nbytes)
                    _tma_load(a_desc, [g * MO + tm * BM, 0], bar, a_bufs.index(s))
                    _tma_load(b_desc, [g * NO + tn * BN, 0], bar, b_bufs.index(s))
                    _tma_load(sa_desc, [g * MO + tm * BM], bar, sa_bufs.index(s))
                    _tma_load(sb_desc, [g * NO + tn * BN], bar, sb_bufs.index(s))
                else:
                    k0 = first + ks * GS
                    if A_GATHER:
                        for h in gl.static_range(2):
                            cols = tm * BM + h * HM + gl.arange(0, HM,
                                                                layout=gl.SliceLayout(0, ga))
                            _cp_async_load(
                                a_bufs.index(2 * s + h),
                                a_ptr + ra.to(gl.int64)[:, None] * stride_a + cols[None, :],
                                mask=(pa < first + cnt)[:, None] & (cols < MO)[None, :])
                    if B_GATHER:
                        cols = tn * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, gb))
                        _cp_async_load(
                            b_bufs.index(s),
                            b_ptr + rb.to(gl.int64)[:, None] * stride_b + cols[None, :],
                            mask=(pb < first + cnt)[:, None] & (cols < NO)[None, :])
                    if (ks == ng - 1) & (cnt % GS != 0):
                        # the last, partial k-step: the contiguous operand's rows past the
                        # expert's tokens (another expert's, unused slots: anything, NaN too)
                        # are zero-filled as well, so copied like the gathered one
                        if not A_GATHER:
                            pa = k0 + gl.arange(0, GS, layout=gl.SliceLayout(1, ga))
                            for h in gl.static_range(2):
                                ca = tm * BM + h * HM + gl.arange(
                                    0, HM, layout=gl.SliceLayout(0, ga))
                                _cp_async_load(
                                    a_bufs.index(2 * s + h),
                                    a_ptr + pa.to(gl.int64)[:, None] * stride_a + ca[None, :],
                                    mask=(pa < first + cnt)[:, None] & (ca < MO)[None, :])
                        if not B_GATHER:
                            pb = k0 + gl.arange(0, GS, layout=gl.SliceLayout(1, gb))
                            cb = tn * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, gb))
                            _cp_async_load(
                                b_bufs.index(s),
                                b_ptr + pb.to(gl.int64)[:, None] * stride_b + cb[None, :],
                                mask=(pb < first + cnt)[:, None] & (cb < NO)[None, :])
                        # ready waits for these threads' copies (an arrival each, counted on
                        # top of the producer's one arrival)
                        async_copy.mbarrier_arrive(bar)
                        mbarrier.arrive(bar)
                    else:
                        async_copy.mbarrier_arrive(bar)
                        mbarrier.expect(bar, nbytes)
                        if not A_GATHER:
                            for h in gl.static_range(2):
                                _tma_load(
                                    a_desc, [k0, tm * BM + h * HM], bar, a_bufs.index(2 * s + h))
                        if not B_GATHER:
                            _tma_load(b_desc, [k0, tn * BN], bar, b_bufs.index(s))
                it += 1
            if ACCUM == ACCUM_RMW:
                # the previous tile's epilogues done with c_buf (their generic loads ordered
                # before this TMA write); rows past MO read the next expert's (masked there)
                mbarrier.wait(c_empty, (tc & 1) ^ 1)
                fence_async_shared()
                mbarrier.expect(c_ready, c_desc.block_type.nbytes)
                _tma_load(c_desc, [e * MO + tm * BM, tn * BN], c_ready, c_buf)
            tc += 1


    @gluon.jit
    def _seg_store_part(q, buf, c_desc, c_ptr, e, r_m, c_n, MO, NO, stride_cm, stride_cn,
                        HM: gl.constexpr, W: gl.constexpr, C_TRANS: gl.constexpr):
        """A weight-gradient tile's part ``q [HM, W]`` (rows ``r_m..`` of C[e], columns
        ``c_n..``) stored through ``buf`` by ``_tma_store_part`` on C as ``[E·MO, NO]``, or
        with ``C_TRANS`` transposed on C as ``[E·NO, MO]``: an expert's last rows (columns)
        by masked stores."""
        if C_TRANS:
            _tma_store_part(gl.permute(q, (1, 0)), buf, c_desc, c_ptr, e * NO + c_n,
                            e * NO + NO, r_m, MO, stride_cn, W, HM)
        else:
            _tma_store_part(q, buf, c_desc, c_ptr, e * MO + r_m, e * MO + MO, c_n, NO,
                            stride_cm, HM, W)

    @gluon.jit
    def _seg_consumer(a_bufs, b_bufs, sa_bufs, sb_bufs, c_buf, ready, empty, turn, c_ready,
                      c_empty, info, info_ready, info_empty, c_ptr, counts_ptr, offsets_ptr, MO,
                      NO, E, num_tiles, stride_ce, stride_cm, stride_cn, HALF: gl.constexpr,
                      PADDED: gl.constexpr, GATHERED: gl.constexpr, ACCUM: gl.constexpr,
                      GS: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
                      BLOCK_E: gl.constexpr, KPAIR: gl.constexpr, INFO: gl.constexpr,
                      C_TRANS: gl.constexpr, GROUP_M: gl.constexpr, TMA_STORE: gl.constexpr,
                      c_desc):
        """Consumer ``HALF`` (0 or 1, one warpgroup): rows ``[HALF·BM/2, (HALF+1)·BM/2)`` of
        each tile; per tile the epilogue (store, atomic add or load-add-store: ``ACCUM``;
        ``C_TRANS``: C's rows adjacent in memory, ``stride_cm == 1``). ``TMA_STORE`` (16-bit,
        ``ACCUM`` store; C contiguous): the tile in four column parts through this consumer's
        two buffers of ``c_buf`` by asynchronous TMA stores (``_tma_store_part`` on C as
        ``[E·MO, NO]``, or with ``C_TRANS`` each part transposed on C as ``[E·NO, MO]``), the
        parts across an expert's end by masked stores.
        ``PADDED`` (FP8): each k-step's product promoted with its scales, the two consumers'
        MMAs alternating (module doc). Else (16-bit): the k-steps accumulate in the MMAs, one
        left in flight (its slot released when the next is issued); ``GATHERED``: a proxy
        fence after ``ready`` (the ``cp.async`` writes before the MMA's reads)."""
        HM: gl.constexpr = BM // 2
        mma: gl.constexpr = _mma_layout(BN, 4, 8 if PADDED else 16)
        st: gl.constexpr = _seg_store_layout(4, C_TRANS)
        zero = gl.zeros([HM, BN], gl.float32, layout=mma)
        my_turn = turn.index(HALF)
        other_turn = turn.index(1 - HALF)
        it = 0  # k-steps (ring slots) so far
        tn = 0  # turns so far
        tc = 0  # tiles so far
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            if INFO:
                e, tm, tile_n, ng = _info_get(info, info_ready, info_empty, tc)
            else:
                e, tm, tile_n, _first, ng = _seg_tile(t, counts_ptr, offsets_ptr, MO, NO, E,
                                                      PADDED, GS, BM, BN, BLOCK_E, GROUP_M)
                if not PADDED:
                    ng = gl.cdiv(ng, GS)
            acc = gl.zeros([HM, BN], gl.float32, layout=mma)
            if PADDED:
                k0 = 0
                if KPAIR:
                    # two k-steps per turn (as the row-grouped consumers); the scale vectors
                    # are read after the MMAs, before the slots are released
                    for kp in range(0, ng // 2):
                        s1 = it % STAGES
                        s2 = (it + 1) % STAGES
                        p1, p2 = _mma_pair(a_bufs, b_bufs, ready, my_turn, other_turn, zero,
                                           it, tn, HALF, HM, STAGES)
                        sa = sa_bufs.index(s1).slice(HALF * HM, HM).load(gl.SliceLayout(1, mma))
                        sb = sb_bufs.index(s1).load(gl.SliceLayout(0, mma))
                        acc = acc + p1 * (sa[:, None] * sb[None, :])
                        sa = sa_bufs.index(s2).slice(HALF * HM, HM).load(gl.SliceLayout(1, mma))
                        sb = sb_bufs.index(s2).load(gl.SliceLayout(0, mma))
                        acc = acc + p2 * (sa[:, None] * sb[None, :])
                        mbarrier.arrive(empty.index(s1))
                        mbarrier.arrive(empty.index(s2))
                        it += 2
                        tn += 1
                    k0 = (ng // 2) * 2
                for ks in range(k0, ng):
                    s = it % STAGES
                    # ping-pong: consumer 0's turn for turn `tn` comes when consumer 1 issued
                    # turn tn - 1 (turn 0: the barrier's initial complete phase), consumer 1's
                    # when consumer 0 issued turn tn
                    mbarrier.wait(my_turn, (tn & 1) ^ (1 - HALF))
                    mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                    # the scale vectors before the MMA (this order leaves Triton's partition
                    # barriers at 3 per k-step: before the first wait and before each arrive)
                    sa = sa_bufs.index(s).slice(HALF * HM, HM).load(gl.SliceLayout(1, mma))
                    sb = sb_bufs.index(s).load(gl.SliceLayout(0, mma))
                    tok = warpgroup_mma(a_bufs.index(s).slice(HALF * HM, HM),
                                        b_bufs.index(s).permute((1, 0)), zero, use_acc=False,
                                        is_async=True)
                    mbarrier.arrive(other_turn)
                    p = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
                    mbarrier.arrive(empty.index(s))  # this consumer is done with the slot
                    acc = acc + p * (sa[:, None] * sb[None, :])
                    it += 1
                    tn += 1
            else:
                for ks in range(0, ng):
                    s = it % STAGES
                    mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                    if GATHERED:
                        fence_async_shared()
                    # A: this consumer's [GS, BM/2] half read M-major, B: [GS, BN] N-major
                    acc = warpgroup_mma(a_bufs.index(2 * s + HALF).permute((1, 0)),
                                        b_bufs.index(s), acc, is_async=True)
                    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                    if ks > 0:  # the previous k-step's MMA is done: release its slot
                        mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
                    it += 1
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                if ng > 0:
                    mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))

            if TMA_STORE:
                W: gl.constexpr = BN // 4
                lo, hi = _col_halves(acc.to(c_ptr.dtype.element_ty), HM, BN // 2)
                q0, q1 = _col_halves(lo, HM, W)
                q2, q3 = _col_halves(hi, HM, W)
                r_m = tm * BM + HALF * HM  # this consumer's first row of C[e] (or column)
                c_n = tile_n * BN
                _seg_store_part(q0, c_buf.index(2 * HALF), c_desc, c_ptr, e, r_m, c_n, MO, NO,
                                stride_cm, stride_cn, HM, W, C_TRANS)
                _seg_store_part(q1, c_buf.index(2 * HALF + 1), c_desc, c_ptr, e, r_m, c_n + W,
                                MO, NO, stride_cm, stride_cn, HM, W, C_TRANS)
                _seg_store_part(q2, c_buf.index(2 * HALF), c_desc, c_ptr, e, r_m, c_n + 2 * W,
                                MO, NO, stride_cm, stride_cn, HM, W, C_TRANS)
                _seg_store_part(q3, c_buf.index(2 * HALF + 1), c_desc, c_ptr, e, r_m,
                                c_n + 3 * W, MO, NO, stride_cm, stride_cn, HM, W, C_TRANS)
            else:
                if ACCUM == ACCUM_STORE:
                    # rounded before the layout change (half the shared-memory traffic of fp32)
                    out = gl.convert_layout(acc.to(c_ptr.dtype.element_ty), st)
                else:
                    out = gl.convert_layout(acc, st)
                om = tm * BM + HALF * HM + gl.arange(0, HM, layout=gl.SliceLayout(1, st))
                on = tile_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, st))
                c_ptrs = (c_ptr + e.to(gl.int64) * stride_ce
                          + om[:, None].to(gl.int64) * stride_cm + on[None, :] * stride_cn)
                cmask = (om < MO)[:, None] & (on < NO)[None, :]
                if ACCUM == ACCUM_ATOMIC:  # one atomic add per element; no tokens: unchanged
                    if ng > 0:
                        gl.atomic_add(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=cmask,
                                      sem="relaxed")
                elif ACCUM == ACCUM_RMW:  # the tile added into: in c_buf (the producer's TMA)
                    mbarrier.wait(c_ready, tc & 1)
                    prev = c_buf.slice(HALF * HM, HM).load(st)
                    mbarrier.arrive(c_empty)
                    if ng > 0:
                        out = out + prev.to(gl.float32)
                        gl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=cmask)
                else:
                    gl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=cmask)
            tc += 1
        if TMA_STORE:
            tma.store_wait(0)  # the last tile's stores done reading shared memory


    @gluon.jit
    def _segment_mm_ws(
            a_desc, b_desc, sa_desc, sb_desc, c_desc, c_ptr, a_ptr, b_ptr, gather_ptr,
            counts_ptr, offsets_ptr, MO, NO, E, num_tiles, stride_a, stride_b, stride_ce,
            stride_cm, stride_cn, PADDED: gl.constexpr, TOPK: gl.constexpr,
            A_GATHER: gl.constexpr, B_GATHER: gl.constexpr, ACCUM: gl.constexpr,
            GS: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
            BLOCK_E: gl.constexpr, KPAIR: gl.constexpr, INFO: gl.constexpr,
            LOAD_WARPS: gl.constexpr, LOAD_REGS: gl.constexpr, MMA_REGS: gl.constexpr,
            C_TRANS: gl.constexpr, GROUP_M: gl.constexpr, TMA_STORE: gl.constexpr,
            num_warps: gl.constexpr):
        """The weight gradient ``C[e] (+)= Σ_p A[p]ᵀ · B[p]`` over expert e's tokens: a
        producer (``LOAD_WARPS`` warps) + two consumers (module doc); program i does tiles i,
        i + grid, ... in ``_seg_tile``'s order (``GROUP_M``). ``PADDED``: FP8 operands in
        ``wgrad_fp8``'s padded group layout with their scales; else 16-bit operands in place
        (``_seg_producer``). ``C_TRANS``: C is stored transposed (``stride_cm == 1``; the
        epilogue's threads along the rows), by store or atomic add. ``TMA_STORE``: a stored C
        by TMA in column parts (``_seg_consumer``; ``c_desc`` C's, its box a part's)."""
        gl.static_assert(num_warps == 4, "the default partition is consumer 0: one warpgroup")
        gl.static_assert(BM == 128 or (BM == 256 and not PADDED and not A_GATHER),
                         "two consumers of 64 rows (16-bit, A by TMA: 64 or 128)")
        gl.static_assert(not C_TRANS or ACCUM != ACCUM_RMW,
                         "the read-add-write tile is loaded row-major")
        if PADDED:
            a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, GS], a_desc.layout)
            b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, GS], b_desc.layout)
            sa_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, BM], sa_desc.layout)
            sb_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, BN], sb_desc.layout)
        else:  # A in two halves per slot (one per consumer); no scales (token allocations)
            a_bufs = gl.allocate_shared_memory(a_desc.dtype, [2 * STAGES, GS, BM // 2],
                                               a_desc.layout)
            b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, GS, BN], b_desc.layout)
            sa_bufs = gl.allocate_shared_memory(gl.float32, [1, 4], sa_desc.layout)
            sb_bufs = gl.allocate_shared_memory(gl.float32, [1, 4], sb_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)  # the producer's expect
            mbarrier.init(empty.index(s), count=2)  # both consumers
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)
        # ACCUM == 2: one [BM, BN] tile of the buffer added into (else a token allocation)
        if TMA_STORE:  # two [BM/2, BN/4] part buffers per consumer (C's, c_desc's box)
            gl.static_assert(ACCUM == ACCUM_STORE and not PADDED, "TMA_STORE: 16-bit, stored")
            c_buf = gl.allocate_shared_memory(c_desc.dtype, [4] + c_desc.block_shape,
                                              c_desc.layout)
        else:
            c_buf = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_shape, c_desc.layout)
        c_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        c_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(c_ready, count=1)
        mbarrier.init(c_empty, count=2)
        info, info_ready, info_empty = _info_alloc()
        GATHERED: gl.constexpr = A_GATHER or B_GATHER

        gl.warp_specialize([
            (_seg_consumer, (a_bufs, b_bufs, sa_bufs, sb_bufs, c_buf, ready, empty, turn,
                             c_ready, c_empty, info, info_ready, info_empty, c_ptr, counts_ptr,
                             offsets_ptr, MO, NO, E, num_tiles, stride_ce, stride_cm, stride_cn,
                             0, PADDED, GATHERED, ACCUM, GS, BM, BN, STAGES, BLOCK_E, KPAIR,
                             INFO, C_TRANS, GROUP_M, TMA_STORE, c_desc)),
            (_seg_consumer, (a_bufs, b_bufs, sa_bufs, sb_bufs, c_buf, ready, empty, turn,
                             c_ready, c_empty, info, info_ready, info_empty, c_ptr, counts_ptr,
                             offsets_ptr, MO, NO, E, num_tiles, stride_ce, stride_cm, stride_cn,
                             1, PADDED, GATHERED, ACCUM, GS, BM, BN, STAGES, BLOCK_E, KPAIR,
                             INFO, C_TRANS, GROUP_M, TMA_STORE, c_desc)),
            (_seg_producer, (a_desc, b_desc, sa_desc, sb_desc, c_desc, a_bufs, b_bufs, sa_bufs,
                             sb_bufs, c_buf, ready, empty, c_ready, c_empty, info, info_ready,
                             info_empty, a_ptr, b_ptr, gather_ptr, counts_ptr, offsets_ptr, MO,
                             NO, E, num_tiles, stride_a, stride_b, PADDED, TOPK, A_GATHER,
                             B_GATHER, ACCUM, GS, BM, BN, STAGES, BLOCK_E, INFO, GROUP_M)),
        ], [4, LOAD_WARPS], [MMA_REGS, LOAD_REGS])


if _HAVE_GLUON:
    _GL_DTYPE = {torch.float32: gl.float32, torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def segment_fits(qa, sa, qb, sb, c, accum: Accum) -> bool:
    """Whether ``segment_mm`` serves the padded-layout operands (``[G, C, 128]``, contiguous):
    16-byte aligned, scale rows too (MO, NO multiples of 4), at least one group and column;
    for ``accum == 2`` the output's rows too (its tiles are TMA-loaded)."""
    return (all(t.is_contiguous() and t.data_ptr() % 16 == 0 and t.shape[0] > 0
                and t.shape[1] > 0 for t in (qa, qb))
            and all(s.is_contiguous() and s.shape[1] % 4 == 0 and s.data_ptr() % 16 == 0
                    for s in (sa, sb))
            and _rmw_fits(c, accum))


def _rmw_fits(c, accum: Accum) -> bool:
    """For ``accum == RMW`` the output's tiles are TMA-loaded: a Gluon dtype, 16-byte aligned
    rows."""
    return accum != Accum.RMW or (c.dtype in _GL_DTYPE and c.data_ptr() % 16 == 0
                                  and (c.shape[2] * c.element_size()) % 16 == 0)


def _c_desc(c, accum: Accum, bm: int, bn: int, stand_in):
    """The descriptor of the tiles added into (``accum == RMW``: ``[E·MO, NO]`` view, loaded by
    the producer), else a one-element stand-in over ``stand_in`` (token shared memory)."""
    if accum == Accum.RMW:
        return TensorDescriptor.from_tensor(c.view(-1, c.shape[2]), [bm, bn],
                                            _nvmma_layout(bm, bn, c.dtype))
    return _stand_in(stand_in)


def _stand_in(t):
    """A 4-element 1-D descriptor over ``t``'s first bytes (an unused descriptor argument)."""
    return TensorDescriptor.from_tensor(t.view(-1).view(torch.float32)[:4], [4],
                                        _unswizzled_layout(32, 1))


def segment_mm(tune: tuning.Tuning, qa, sa, qb, sb, c, meta, accum: Accum):
    """``c[e] (+)= Σ_g (qa[:, g] · qb[:, g]ᵀ) · (sa[g] ⊗ sb[g])`` over expert e's groups g of
    the padded layout (``wgrad_fp8.quantize_cols_grouped``'s outputs; ``accum``: the Triton
    kernel's ``ACCUM`` modes)."""
    cfg = dict(tune.gluon_seg_config)
    bm, bn = cfg["BM"], cfg["BN"]
    mo, no = qa.shape[1], qb.shape[1]
    E = meta.num_experts
    num_tiles = E * cdiv(mo, bm) * cdiv(no, bn)
    if num_tiles == 0:
        return c
    s1 = _unswizzled_layout(32, 1)
    # group-major operands as [G·MO, 128] / [G·NO, 128]: a tile's rows past MO read the next
    # group's (masked at the store), past the end TMA fills zeros
    a_desc = TensorDescriptor.from_tensor(qa.view(-1, 128), [bm, 128], _smem_layout())
    b_desc = TensorDescriptor.from_tensor(qb.view(-1, 128), [bn, 128], _smem_layout())
    sa_desc = TensorDescriptor.from_tensor(sa.view(-1), [bm], s1)
    sb_desc = TensorDescriptor.from_tensor(sb.view(-1), [bn], s1)
    c_desc = _c_desc(c, accum, bm, bn, sa)
    grid = (_programs(tune, num_tiles, c.device),)
    launcher(_segment_mm_ws, tune.fast_launch)[grid](
        a_desc, b_desc, sa_desc, sb_desc, c_desc, c, c, c, meta.counts, meta.counts,
        meta.offsets, mo, no, E, num_tiles, 0, 0, c.stride(0), c.stride(1), c.stride(2),
        PADDED=True, TOPK=1, A_GATHER=False, B_GATHER=False, ACCUM=int(accum), GS=128, BM=bm,
        BN=bn, STAGES=cfg["STAGES"], BLOCK_E=max(32, next_pow2(E)),
        KPAIR=cfg["KPAIR"], INFO=cfg["INFO"], LOAD_WARPS=1, LOAD_REGS=cfg["LOAD_REGS"],
        MMA_REGS=cfg["MMA_REGS"], C_TRANS=False, GROUP_M=cfg.get("GROUP_M", 1),
        TMA_STORE=False, num_warps=4, maxnreg=cfg["MAXNREG"])
    return c


def segment_direct_fits(a, b, c, accum: Accum) -> bool:
    """Whether ``segment_mm_direct`` serves ``a [S|N, MO]``, ``b [S|N, NO]``: bf16 both (the
    dtype its GPU tests run; fp16 stays on the Triton kernel), contiguous 16-byte aligned rows,
    MO and NO multiples of 8, and ``_rmw_fits``."""
    return (a.dtype == torch.bfloat16 and b.dtype == a.dtype
            and all(t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * 2) % 16 == 0
                    and t.data_ptr() % 16 == 0 and t.shape[1] % 8 == 0 for t in (a, b))
            and c.is_contiguous() and _rmw_fits(c, accum))


# shared memory of ``_segment_mm_ws`` besides its ring and read-add-write tile (barriers, the
# tile-information ring, layout-conversion scratch: ~16.4 KB under Triton 3.6), rounded up
_SEG_SMEM_OTHER = 17 * 1024
_SMEM_LIMIT = 232448  # bytes of shared memory a Hopper block may use


def bf16_seg_config(tune: tuning.Tuning, c, accum: Accum, mo: int, no: int,
                    b_gather: bool = False) -> dict:
    """``segment_mm_direct``'s launch configuration for output ``c [E, MO, NO]``:
    ``tune.gluon_bf16_seg_config``, ``tune.gluon_bf16_seg_bgather_config`` over it where B's
    rows are gathered, ``tune.gluon_bf16_seg_narrow_config`` over both where a read-add-write
    tile is 32-bit or MO or NO is not a multiple of 16; ``STAGES`` lowered to the ring slots
    that fit in shared memory beside a read-add-write tile or the TMA store's part buffers;
    ``TMA_STORE`` (1: the epilogue by TMA stores) kept only where ``_seg_tma_store_fits``."""
    cfg = dict(tune.gluon_bf16_seg_config)
    if b_gather:
        cfg.update(tune.gluon_bf16_seg_bgather_config)
    if (accum == Accum.RMW and c.element_size() > 2) or mo % 16 or no % 16:
        cfg.update(tune.gluon_bf16_seg_narrow_config)
    slot = (cfg["BM"] + cfg["BN"]) * cfg["BK"] * 2
    cfg["TMA_STORE"] = int(bool(cfg.get("TMA_STORE", 0)) and _seg_tma_store_fits(c, accum))
    tile = cfg["BM"] * cfg["BN"] * c.element_size()
    tile = tile if accum == Accum.RMW else tile // 2 if cfg["TMA_STORE"] else 0
    cfg["STAGES"] = min(cfg["STAGES"], (_SMEM_LIMIT - _SEG_SMEM_OTHER - tile) // slot)
    return cfg


def _seg_tma_store_fits(c, accum: Accum) -> bool:
    """Whether the 16-bit weight gradient's epilogue may store ``c`` by TMA: stored (not
    added into), 16-bit, 16-byte aligned (its rows are: ``segment_direct_fits`` asks for
    widths that are multiples of 8)."""
    return accum == Accum.STORE and c.element_size() == 2 and c.data_ptr() % 16 == 0


def segment_mm_direct(tune: tuning.Tuning, a, b, c, meta, accum: Accum, *, a_gather: bool,
                      b_gather: bool):
    """``c[e] (+)= Σ_{p in segment e} A[p]ᵀ · B[p]`` (``grouped_gemm._segment_mm_kernel``'s
    contract: ``a_gather`` / ``b_gather``: that operand's rows are ``sorted_slot[p] //
    top_k``, else ``p``) on 16-bit operands in place, fp32 accumulation, 64-token k-steps from
    each expert's first row (the Triton kernel's order)."""
    if a_gather == b_gather:
        raise ValueError("segment_mm_direct: exactly one operand is gathered")
    # C[e] strides (expert, row, column) as the kernel indexes its tiles
    c_strides = (c.stride(0), c.stride(1), c.stride(2))
    trans = b_gather and tune.gluon_bf16_wgrad_swap and accum != Accum.RMW
    if trans:
        # C[e] = (Bᵀ·A)ᵀ: the gathered operand on the tile's rows (dW_down's form and tiles),
        # C written transposed
        a, b, a_gather, b_gather = b, a, True, False
        c_strides = (c.stride(0), c.stride(2), c.stride(1))
    mo, no = a.shape[1], b.shape[1]
    cfg = bf16_seg_config(tune, c, accum, mo, no, b_gather)
    bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
    E = meta.num_experts
    num_tiles = E * cdiv(mo, bm) * cdiv(no, bn)
    if meta.sorted_slot.numel() == 0:  # no tokens: zero gradients (added: nothing)
        return c.zero_() if accum == Accum.STORE else c
    if num_tiles == 0:
        return c
    a_desc = TensorDescriptor.from_tensor(a, [bk, bm // 2], _nvmma_layout(bk, bm // 2, a.dtype))
    b_desc = TensorDescriptor.from_tensor(b, [bk, bn], _nvmma_layout(bk, bn, b.dtype))
    if cfg["TMA_STORE"]:  # C as [E·rows, cols], a consumer's column part a box
        box = [bn // 4, bm // 2] if trans else [bm // 2, bn // 4]
        c_desc = TensorDescriptor.from_tensor(c.view(-1, c.shape[2]), box,
                                              _nvmma_layout(*box, c.dtype))
    else:
        c_desc = _c_desc(c, accum, bm, bn, meta.counts)
    grid = (_programs(tune, num_tiles, c.device),)
    launcher(_segment_mm_ws, tune.fast_launch)[grid](
        a_desc, b_desc, _stand_in(meta.counts), _stand_in(meta.counts),
        c_desc, c, a, b, meta.sorted_slot, meta.counts,
        meta.offsets, mo, no, E, num_tiles, a.stride(0), b.stride(0), *c_strides,
        PADDED=False, TOPK=meta.top_k, A_GATHER=a_gather, B_GATHER=b_gather,
        ACCUM=int(accum), GS=bk, BM=bm, BN=bn, STAGES=cfg["STAGES"],
        BLOCK_E=max(32, next_pow2(E)), KPAIR=False, INFO=True,
        LOAD_WARPS=cfg["LOAD_WARPS"], LOAD_REGS=cfg["LOAD_REGS"], MMA_REGS=cfg["MMA_REGS"],
        C_TRANS=trans, GROUP_M=cfg.get("GROUP_M", 1), TMA_STORE=bool(cfg["TMA_STORE"]),
        num_warps=4, maxnreg=cfg["MAXNREG"])
    return c


if _HAVE_GLUON:
    @gluon.constexpr_function
    def _cols_layout(BC, GS, num_warps, WC, tokens_fast):
        """``[GS tokens, BC columns]`` tiles of the column quantisation: each thread holds 8
        consecutive columns of RT consecutive tokens; lanes along the columns first; WC of the
        warps side by side along the columns, the others along the tokens. The two forms differ
        only in the order of a thread's registers -- columns first (16-byte loads along a token
        row) or tokens first (RT-byte stores along a transposed column) -- so converting
        between them moves no data."""
        col_lanes = BC // (8 * WC)
        row_lanes = 32 // col_lanes
        row_warps = num_warps // WC
        rt = GS // (row_lanes * row_warps)
        cols = [[0, 1 << i] for i in range(3)]
        rows = [[1 << i, 0] for i in range(rt.bit_length() - 1)]
        lanes = ([[0, 8 << i] for i in range(col_lanes.bit_length() - 1)]
                 + [[rt << i, 0] for i in range(row_lanes.bit_length() - 1)])
        warps = ([[0, 8 * col_lanes << i] for i in range(WC.bit_length() - 1)]
                 + [[rt * row_lanes << i, 0] for i in range(row_warps.bit_length() - 1)])
        return gl.DistributedLinearLayout(rows + cols if tokens_fast else cols + rows, lanes,
                                          warps, [], [GS, BC])

    @gluon.jit
    def _fp8_cols_gl(src_ptr, gather_ptr, counts_ptr, offsets_ptr, q_ptr, s_ptr,
                     C, E, num_groups, stride_src, stride_q, stride_s, TOPK: gl.constexpr,
                     GATHER: gl.constexpr, BC: gl.constexpr, WC: gl.constexpr, GS: gl.constexpr,
                     BLOCK_E: gl.constexpr, num_warps: gl.constexpr):
        """``wgrad_fp8._fp8_cols_kernel``'s contract, arithmetic and program order (bitwise the
        same), laid out so that no shared memory is needed for the transposed store
        (``_cols_layout``) nor, with ``WC == num_warps``, for the column maxima."""
        ld: gl.constexpr = _cols_layout(BC, GS, num_warps, WC, False)
        st: gl.constexpr = _cols_layout(BC, GS, num_warps, WC, True)
        ncb = gl.cdiv(C, BC)
        g = gl.program_id(0) // ncb
        cb = gl.program_id(0) % ncb
        e, _n, p0, seg_end = _grouped_tile(g, offsets_ptr, counts_ptr, E, 1,
                                           num_groups, GS, 1, 1, BLOCK_E, num_warps, True)
        if e < E:
            p = p0 + gl.arange(0, GS, layout=gl.SliceLayout(1, ld))
            tmask = p < seg_end
            if GATHER:
                rows = (gl.load(gather_ptr + p, mask=tmask, other=0) // TOPK).to(gl.int64)
            else:
                rows = p.to(gl.int64)
            cols = cb * BC + gl.arange(0, BC, layout=gl.SliceLayout(0, ld))
            cmask = cols < C
            v = gl.load(src_ptr + rows[:, None] * stride_src + cols[None, :],
                        mask=tmask[:, None] & cmask[None, :], other=0.0).to(gl.float32)
            scale = gl.div_rn(gl.maximum(gl.max(gl.abs(v), 0), 1e-12), 448.0)
            q = gl.minimum(gl.maximum(gl.div_rn(v, scale[None, :]), -448.0), 448.0)
            q = gl.convert_layout(q.to(q_ptr.dtype.element_ty), st, assert_trivial=True)
            # the padding tokens of the expert's last group are stored as zeros
            t = gl.arange(0, GS, layout=gl.SliceLayout(1, st))
            cols_t = cb * BC + gl.arange(0, BC, layout=gl.SliceLayout(0, st))
            gl.store(q_ptr + g.to(gl.int64) * stride_q + cols_t[None, :] * GS + t[:, None], q,
                     mask=(cols_t < C)[None, :])
            gl.store(s_ptr + g.to(gl.int64) * stride_s + cols, scale, mask=cmask)


def cols_fits(src) -> bool:
    """Whether ``quantize_cols`` serves ``src``: 16-byte aligned rows."""
    return src.stride(1) == 1 and src.stride(0) % 8 == 0 and src.data_ptr() % 16 == 0


def quantize_cols(tune: tuning.Tuning, src, meta, q, s, gather: bool):
    """``wgrad_fp8.quantize_cols_grouped``'s pass (``q``, ``s`` its outputs) by
    ``_fp8_cols_gl``."""
    cfg = dict(tune.gluon_cols_config)
    bc, warps = cfg["BC"], cfg["num_warps"]
    num_groups, _ = grouped_schedule(meta, 128, 1, 1)
    c = src.shape[1]
    launcher(_fp8_cols_gl, tune.fast_launch)[(num_groups * cdiv(c, bc),)](
        src, meta.sorted_slot, meta.counts, meta.offsets, q, s, c, meta.num_experts,
        num_groups, src.stride(0), q.stride(0), s.stride(0), TOPK=meta.top_k, GATHER=gather,
        BC=bc, WC=cfg["WC"], GS=128, BLOCK_E=max(32, next_pow2(meta.num_experts)),
        num_warps=warps)
    return q, s
