"""Launch tuning of the kernels: tile shapes, block sizes and the choice between kernel
variants, in one object.

The launchers read the active ``Tuning`` once per stage (``current()``) and pass it down to
the kernels they launch. The defaults are the tuned choices (``benchmarks/NOTES.md`` records
how each was measured). Tests and benchmarks change them in one way only, for the duration
of a block::

    from moe_plugin.kernels import tuning
    with tuning.override(gluon=False, split_up_bwd=False):
        ...   # the Triton kernels, dh' with the activation backward fused into its epilogue

Under ``TRITON_INTERPRET=1`` the launchers use small interpreter tiles instead of the GPU
tiles below (``gemm_configs`` still wins).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Tuning:
    """Every tuning choice of the kernels. Frozen: change it with ``override``."""

    # per-GEMM tile configurations that replace the defaults, keyed by GEMM:
    # "up" (GEMM1 + activation), "down" (GEMM2), "dh" (dh' = dout · W_down of the split
    # activation backward; default: GEMM2's), "up_bwd" (dh' with the activation backward in
    # its epilogue), "dx" (dpre · W_up), "wgrad_down", "wgrad_up" (Triton segment GEMMs),
    # "wgrad_down_fp8", "wgrad_up_fp8" (Triton FP8 weight gradients); values are dicts of
    # BM, BN, BK (GROUP_M for row-grouped GEMMs), num_warps, num_stages
    gemm_configs: dict = field(default_factory=dict)
    # the activation backward after dh' = dout · W_down: True a separate pass over the stored
    # dh' (``_act_bwd_kernel``), False in the GEMM's epilogue (``Epilogue.ACT_BWD``)
    split_up_bwd: bool = True
    act_bwd_block: tuple = (32, 128, 4)     # rows, columns, warps of _act_bwd_kernel
    # its tiles in one grid axis, the column tiles fastest (the programs at work cover whole
    # rows of dh', pre, hw and dpre); False: a 2-D grid, the row tiles fastest
    act_bwd_cols_fast: bool = True
    bias_grad_block: tuple = (64, 128, 4)   # rows per step, columns, warps of the bias grads
    # how the weight-gradient kernels add into an accumulation buffer (``codes.Accum``):
    # None = atomic adds into fp32 buffers, read-modify-write otherwise (and the Gluon kernel's
    # own choice, see ``wgrad_fp8``)
    wgrad_accum_mode: Optional[int] = None
    fp8_rows_block: tuple = (32, 4)         # rows, warps of the fp8 row quantisation
    fp8_cols_block: tuple = (64, 4)         # columns, warps of the fp8 column quantisation
    # the Triton FP8 weight-gradient GEMM
    fp8_seg_config: dict = field(default_factory=lambda: dict(
        BM=128, BN=128, BK=128, num_warps=8, num_stages=3))
    # the Gluon (Hopper) FP8 kernels: used where available when True
    gluon: bool = True
    # row-grouped Gluon GEMM: 128 x 128 tiles; the 12 warps launch at MAXNREG registers, then
    # the producer drops to LOAD_REGS and the two consumers rise to MMA_REGS; KPAIR: two
    # k-steps per consumer turn; INFO: tile facts passed through shared memory
    gluon_config: dict = field(default_factory=lambda: dict(
        BM=128, BN=128, STAGES=5, GROUP_M=8, KPAIR=True, INFO=True, LOAD_REGS=40, MMA_REGS=232,
        MAXNREG=168))
    # the dh' GEMM with the activation backward in its epilogue: fewer ring slots (its
    # pre-activation tiles take shared memory); applied over ``gluon_config``
    gluon_epi_config: dict = field(default_factory=lambda: dict(STAGES=4))
    # the Gluon FP8 weight-gradient GEMM; GROUP_M: each expert's output tiles in bands of
    # GROUP_M row tiles, a band's row tiles fastest (``gluon_gemm._seg_tile``; 1: row by row),
    # so that the programs at work share their operands' column slabs in L2 (an expert's
    # operands may be larger than L2: mixtral's dpre 117 MB)
    gluon_seg_config: dict = field(default_factory=lambda: dict(
        BM=128, BN=128, STAGES=4, KPAIR=True, INFO=True, LOAD_REGS=40, MMA_REGS=232,
        MAXNREG=168, GROUP_M=8))
    # the Gluon 16-bit weight-gradient GEMM (``segment_mm_direct``): used where available
    # when ``gluon`` and ``gluon_bf16_wgrad``; BK tokens a k-step, LOAD_WARPS producer warps
    # (they also run the gathered operand's copies); GROUP_M as the FP8 kernel's (in either,
    # a configuration without it: row by row); TMA_STORE 1: a stored (not added into) 16-bit
    # output by TMA stores of column parts, 0: by registers (against which TMA measured -1 to
    # -6% a weight gradient on an H100 but for qwen3's dW_down, +5%; benchmarks/NOTES.md,
    # session 42)
    gluon_bf16_wgrad: bool = True
    gluon_bf16_seg_config: dict = field(default_factory=lambda: dict(
        BM=128, BN=256, BK=64, STAGES=3, LOAD_WARPS=4, LOAD_REGS=72, MMA_REGS=216,
        MAXNREG=168, GROUP_M=8, TMA_STORE=1))
    # dW_up (B's rows gathered) as (x_eᵀ · dpre_e)ᵀ: the gathered x on the tile's 128 rows, the
    # tiles and form of dW_down, C stored transposed (``gluon_gemm.segment_mm_direct``; not for
    # a read-add-write into the output)
    gluon_bf16_wgrad_swap: bool = True
    # over it (``gluon_gemm.bf16_seg_config``) where B's rows are gathered (dW_up: x): 256 x 128
    # tiles, so that each k-step gathers 128 columns of x, not 256
    gluon_bf16_seg_bgather_config: dict = field(default_factory=lambda: dict(
        BM=256, BN=128, STAGES=4, LOAD_REGS=56, MMA_REGS=232))
    # over both where the output tile read back and added into (``Accum.RMW``) is 32-bit -- a
    # 32 K-element fp32 tile and the ring do not fit in shared memory together -- or the
    # output's widths are not multiples of 16 (the unvectorised masked epilogue of a 256-wide
    # tile spills registers); the ring then has as many slots as fit beside the RMW tile
    gluon_bf16_seg_narrow_config: dict = field(default_factory=lambda: dict(
        BM=128, BN=128, STAGES=4, LOAD_REGS=72, MMA_REGS=216))
    # the other 16-bit expert GEMMs (GEMM1 + activation, GEMM2, the split form's dh', dx) on
    # the Gluon row-grouped kernel (``gluon_gemm.grouped_mm_direct``): used where available
    # when ``gluon`` and ``gluon_bf16_grouped``. 128 x 256 tiles, BK 64; a
    # gathered A (GEMM1, dh') copied by LOAD_WARPS producer warps (``gluon_bf16_gather_config``
    # over this); GEMM1's two accumulators (``gluon_bf16_up_config`` over both)
    gluon_bf16_grouped: bool = True
    gluon_bf16_config: dict = field(default_factory=lambda: dict(
        BM=128, BN=256, BK=64, STAGES=4, GROUP_M=8, INFO=True, LOAD_WARPS=1, LOAD_REGS=40,
        MMA_REGS=232, MAXNREG=168, TMA_STORE=4))
    gluon_bf16_gather_config: dict = field(default_factory=lambda: dict(
        LOAD_WARPS=4, LOAD_REGS=88, MMA_REGS=208))
    gluon_bf16_up_config: dict = field(default_factory=lambda: dict(BN=128, STAGES=4))
    # per GEMM ("up", "down", "dh", "dx": the split form's dh'), a dict applied over that
    # GEMM's configuration above (e.g. ``{"down": GLUON_BF16_PINGPONG}``: GEMM2 alone with
    # its consumers on whole tiles in turn); none by default
    gluon_bf16_kind_configs: dict = field(default_factory=dict)
    # the 16-bit dh' GEMM with the activation backward in its Gluon epilogue (as FP8's,
    # ``gluon_fuse_act_bwd``), in place of the split form, when ``gluon_bf16_fuse_act_bwd``;
    # its tiles (``gluon_bf16_epi_config`` over the gathered GEMM's): the pre-activation tiles
    # and dh' take shared memory (slower than the split form on an H100: benchmarks/NOTES.md,
    # sessions 29 and 39)
    gluon_bf16_fuse_act_bwd: bool = False
    gluon_bf16_epi_config: dict = field(default_factory=lambda: dict(BN=128, STAGES=3))
    # the Gluon column quantisation: BC columns per tile, WC of the warps along the columns
    gluon_cols_config: dict = field(default_factory=lambda: dict(BC=32, num_warps=4, WC=4))
    # the FP8 dh' GEMM on Hopper runs the activation backward in its epilogue (False: the
    # split form)
    gluon_fuse_act_bwd: bool = True
    # programs of the persistent Gluon kernels (and SMs counted by the router's persistent
    # ``pieces_dx``): None = one per SM
    gluon_programs: Optional[int] = None
    # a Gluon kernel launched again with arguments of the same specialisation skips Triton's
    # per-call binding (``fast_launch.FastLaunch``, Triton 3.6 to 3.9); False: every launch by
    # ``JITFunction.run``
    fast_launch: bool = True
    # the package's custom ops called in eager mode without PyTorch's dispatcher
    # (``kernels/eager.py``); False: every call dispatched (traced calls always are)
    eager_ops: bool = True
    # the router logits' backward for bf16 on CUDA on the tensor cores (``split_bf16``), False:
    # fp32 GEMMs on fp32 copies
    router_split_bwd: bool = True
    # (BM, BN, BK, num_warps, num_stages, programs per SM) of ``routing.pieces_dx``, the split
    # form's dx GEMM (persistent; E up to BK in one k-step: W's tile resident, the row loop
    # pipelined; sm_90: 221 KB of shared memory). The fastest of router_dx_check.py's sweep
    # on an H100 (benchmarks/NOTES.md, session 40): 0.258 ms at fine_30b's shape against
    # 0.367 for the earlier non-persistent kernel
    pieces_dx_block: tuple = (64, 128, 128, 4, 3, 1)
    # ``pieces_dx_block`` for ``routing.pieces_gather_reduce`` (``pieces_dx``'s kernel with the
    # experts' dx reduction over each token's k slots in place of C), its first entry the
    # gathered rows a tile: BM = that / k (a power of two, at least 16). The fastest of
    # router_dx_check.py's sweeps on an H100 (benchmarks/NOTES.md, session 46): fine_30b's
    # shape (k 8) 0.88 ms against 1.06 for gather_reduce then pieces_dx, coarse_120b's (k 4)
    # 0.50 against 0.68, mixtral's (k 2) 0.081 against 0.165
    pieces_reduce_block: tuple = (128, 64, 128, 2, 2, 4)
    # the router and the experts as one autograd Function where they share their input
    # (``autograd.routed_layer``): the router's dx product joins the experts' dx reduction;
    # False: separate Functions, the router's dx added by ``pieces_dx``
    router_fused_dx: bool = True
    # the split form's weight gradient: ``routing.pieces_dw`` (one kernel, x read once for the
    # three pieces) when True, else ``torch.mm`` of the stacked pieces with an fp32 output,
    # summed (off: no consistent gain in the layer on an H100 or the H200; benchmarks/NOTES.md,
    # sessions 40 and 43)
    router_dw_kernel: bool = False
    # (BE, BD, BK, num_warps, num_stages, chunk) of ``routing.pieces_dw``: chunk = tokens per
    # fp32 partial sum (the partials added in order)
    router_dw_block: tuple = (128, 128, 64, 8, 2, 4096)

    def gemm_config(self, kind: str) -> Optional[dict]:
        """A copy of the override for GEMM ``kind``, or None."""
        cfg = self.gemm_configs.get(kind)
        return dict(cfg) if cfg is not None else None


# ``gluon_bf16_config["TMA_STORE"]``: the plain epilogue of the 16-bit row-grouped GEMMs
# (GEMM2, dx, the split form's dh') by asynchronous TMA stores, 4 (the default): four column
# parts of each consumer's rows through two 8 KB buffers per consumer
# (``gluon_gemm._tma_store_part``), the ring keeping its 4 slots; True: the whole tile staged,
# room for 3 slots; 0: by registers (against which the default measured fine_30b fwd+bwd
# −2.0%, mixtral −0.3% on an H100; benchmarks/NOTES.md, session 36)
# the plain epilogue by registers, for comparisons
GLUON_BF16_REG_STORE = dict(TMA_STORE=0)
# the ping-pong variant of the 16-bit row-grouped GEMMs, over ``gluon_bf16_config`` (not a
# default: on the H200 GEMM2 −4% on fine_30b, dx and dh' slower; benchmarks/NOTES.md, session
# 33): the consumers on whole 128 x 128 tiles in turn, 5 ring slots, the epilogue by registers
GLUON_BF16_PINGPONG = dict(PINGPONG=True, BN=128, STAGES=5, TMA_STORE=0)
# the 16-bit row-grouped GEMMs launched as clusters of two CTAs, the operand both CTAs need
# loaded once for both by TMA multicast (``gluon_gemm._grouped_mm_ws``'s ``CN`` / ``CM``;
# Triton >= 3.8): GEMM2 and dx (A by TMA) along the columns, each CTA ``BN`` of a tile's 2·BN
# columns, A's tiles shared; GEMM1 and dh' (A gathered) along the rows, each CTA ``BM`` of
# 2·BM rows, B's tiles shared, the epilogue by registers. Not a default: within ±2% of one
# CTA a tile on the H200 (benchmarks/NOTES.md, session 33)
GLUON_BF16_CLUSTER = dict(CLUSTER=2, TMA_STORE=0)
# 256 x 128 tiles for the 16-bit row-grouped GEMMs with the plain epilogue (GEMM2, dx, the
# split form's dh'): each consumer warpgroup 128 rows (two m64 row blocks sharing B's tile),
# the shape of SonicMoE's dx winner; the same shared memory per ring slot as 128 x 256 (not a
# default: 3-20% slower than 128 x 256 on every GEMM timed on an H100; benchmarks/NOTES.md,
# session 42)
GLUON_BF16_TALL = dict(BM=256, BN=128)
# the second column half of each tile's TMA-parts stores deferred until the next tile's
# first MMA is issued (``gluon_gemm._grp_consumer``'s ``DEFER``), so that half of the epilogue
# of GEMM2 and dx (A by TMA; not the split form's dh', whose gathered A leaves the consumers
# too few registers) runs under the tensor cores' work instead of between tiles. The held
# half takes 32 registers a thread beside the accumulator's 128, within the default split
# (holding the whole tile, 64, spilled at the most the consumers can have, 240, and was
# slower); prepared, not yet a default (benchmarks/NOTES.md, sessions 47-48)
GLUON_BF16_DEFER = dict(DEFER=True)

_DEFAULT = Tuning()
_current = _DEFAULT


def current() -> Tuning:
    """The active tuning (the defaults unless inside ``override``)."""
    return _current


@contextlib.contextmanager
def override(**changes):
    """Within the block the kernels run with ``changes`` (fields of ``Tuning``) applied over
    the active tuning. ``gemm_configs`` given here is merged into the active one."""
    global _current
    names = {f.name for f in dataclasses.fields(Tuning)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise TypeError(f"tuning.override: unknown field(s) {unknown}; fields: {sorted(names)}")
    if "gemm_configs" in changes:
        changes["gemm_configs"] = {**_current.gemm_configs, **changes["gemm_configs"]}
    saved = _current
    _current = dataclasses.replace(_current, **changes)
    try:
        yield _current
    finally:
        _current = saved
