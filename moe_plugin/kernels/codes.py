"""The integer codes that select a kernel's variant: activation (and swiglu_oai's parameters),
routing score function, GEMM epilogue, operand quantisation and weight-gradient accumulation.

Python code passes the enums (``Act.SWIGLU``, ``Epilogue.ACT_FWD``, ...) as the kernels'
``tl.constexpr`` arguments; inside ``@triton.jit`` / ``@gluon.jit`` code compare with the
``tl.constexpr`` names below (``if EPI == EPI_ACT_FWD:``), which are the same numbers. Each
name is defined once, from its enum.
"""
from enum import IntEnum

import triton.language as tl


class Act(IntEnum):
    """Activation of GEMM1's epilogue (``config.ACTIVATIONS`` maps the public names to these;
    gated ones compute ``act(gate) * up``)."""
    SWIGLU = 0
    GEGLU = 1        # tanh-approximated gelu
    SWIGLU_OAI = 2   # gpt-oss's clamped swiglu with alpha and +1 on the up part
    GELU = 3         # tanh-approximated gelu
    RELU2 = 4
    SILU = 5
    GELU_ERF = 6     # exact (erf) gelu
    GEGLU_ERF = 7


# swiglu_oai's parameters: alpha, beta (added to the clamped up projection), limit
SWIGLU_OAI_ALPHA = 1.702
SWIGLU_OAI_BETA = 1.0
SWIGLU_OAI_LIMIT = 7.0


class Score(IntEnum):
    """Score function of the routing kernels (``config.SCORE_FUNCS`` names them)."""
    SOFTMAX = 0
    SIGMOID = 1


class Epilogue(IntEnum):
    """Epilogue of the row-grouped GEMM kernels."""
    STORE = 0     # C = acc (+ bias)
    ACT_FWD = 1   # GEMM1: (+ bias), store pre and / or h = act(pre)
    ACT_BWD = 2   # dh' GEMM: the activation backward (dpre, hw, routing-weight gradient)


class Quant(IntEnum):
    """Operand format of a GEMM (``kernels/quantize.py`` holds the formats)."""
    NONE = 0
    FP8 = 1    # e4m3; A scales per (row, 128 columns of K), B per 128 x 128 block
    INT8 = 2   # int8; A scales per row, B per output column; int32 accumulation


class Accum(IntEnum):
    """How a weight-gradient kernel writes its output tile."""
    STORE = 0    # C = acc
    ATOMIC = 1   # C += acc by one atomic add per element (fp32 C; still deterministic)
    RMW = 2      # C += acc by read-modify-write (any dtype of C)


# the same codes as compile-time constants for kernel code
ACT_SWIGLU = tl.constexpr(int(Act.SWIGLU))
ACT_GEGLU = tl.constexpr(int(Act.GEGLU))
ACT_SWIGLU_OAI = tl.constexpr(int(Act.SWIGLU_OAI))
ACT_GELU = tl.constexpr(int(Act.GELU))
ACT_RELU2 = tl.constexpr(int(Act.RELU2))
ACT_SILU = tl.constexpr(int(Act.SILU))
ACT_GELU_ERF = tl.constexpr(int(Act.GELU_ERF))
ACT_GEGLU_ERF = tl.constexpr(int(Act.GEGLU_ERF))

SCORE_SOFTMAX = tl.constexpr(int(Score.SOFTMAX))
SCORE_SIGMOID = tl.constexpr(int(Score.SIGMOID))

EPI_STORE = tl.constexpr(int(Epilogue.STORE))
EPI_ACT_FWD = tl.constexpr(int(Epilogue.ACT_FWD))
EPI_ACT_BWD = tl.constexpr(int(Epilogue.ACT_BWD))

QUANT_NONE = tl.constexpr(int(Quant.NONE))
QUANT_FP8 = tl.constexpr(int(Quant.FP8))
QUANT_INT8 = tl.constexpr(int(Quant.INT8))

ACCUM_STORE = tl.constexpr(int(Accum.STORE))
ACCUM_ATOMIC = tl.constexpr(int(Accum.ATOMIC))
ACCUM_RMW = tl.constexpr(int(Accum.RMW))
