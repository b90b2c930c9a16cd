"""The Gluon (Hopper) kernels compile for sm_90 on a machine without a GPU
(``gluon_compile_worker.py``, in a subprocess outside the Triton interpreter: Triton's passes
and ``ptxas`` run, a stand-in driver stops at the launch). CI has no GPU; this catches what
only compiling finds -- copies that cannot be vectorised at some widths, register or shared-
memory overflows -- before a GPU run does. Runs where this Triton has a Gluon API the kernels
compile under (``gluon_gemm.GLUON_TRITON_COMPILES``; CI runs it on the default Python with
Triton 3.9 and on Python 3.12 with Triton 3.6, 3.7 and 3.8 installed beside the default one,
setting ``MOE_PLUGIN_REQUIRE_GLUON`` there so that a skip fails); what the kernels compute is checked on a GPU by the GPU-marked tests."""
import json
import os
import subprocess
import sys

import pytest

from moe_plugin.kernels import gluon_gemm as GF

_REASON = (f"this Triton's Gluon is not an API the kernels compile under "
           f"(Triton {GF.GLUON_TRITON_COMPILES})")
if os.environ.get("MOE_PLUGIN_REQUIRE_GLUON") == "1" and not GF.api_compiles():
    raise RuntimeError(f"MOE_PLUGIN_REQUIRE_GLUON=1: {_REASON}, got {GF._triton_version()}")
pytestmark = pytest.mark.skipif(not GF.api_compiles(), reason=_REASON)

SMEM_LIMIT = 232448  # bytes of shared memory a Hopper block may use
CASES = ([f"bf16_{role}_{shape}_{acc}" for role in ("wgrad_up", "wgrad_down")
          for shape in ("aligned", "odd") for acc in ("store", "atomic", "rmw", "rmw32")]
         + [f"bf16_wgrad_up_swap_{shape}_{acc}" for shape in ("aligned", "odd")
            for acc in ("store", "atomic")]
         + [f"bf16_{role}_{shape}_store_regs" for role in ("wgrad_up", "wgrad_up_swap",
                                                           "wgrad_down")
            for shape in ("aligned", "odd")]
         + [f"fp8_wgrad_{acc}" for acc in ("store", "atomic", "rmw")]
         + ["fp8_grouped", "fp8_dh_fused"]
         + ["bf16_down_aligned", "bf16_dx_aligned", "bf16_dh_aligned", "bf16_dh_odd"]
         + [f"bf16_dh_fused_{g}_{shape}" for g in ("gated", "plain")
            for shape in ("aligned", "odd")]
         + [f"bf16_up_{g}_{shape}_{store}" for g in ("gated", "plain")
            for shape in ("aligned", "odd") for store in ("pre_h", "h", "pre")]
         + ["bf16_dh_tmastore_aligned", "bf16_dh_tmastore_odd", "bf16_dx_tmastore_aligned"]
         + ["bf16_down_regs_aligned", "bf16_dx_regs_aligned", "bf16_dh_regs_aligned",
            "bf16_dh_regs_odd"]
         + ["bf16_down_tall_aligned", "bf16_dx_tall_aligned", "bf16_dh_tall_aligned",
            "bf16_dh_tall_odd"]
         + ["bf16_down_defer_aligned", "bf16_dx_defer_aligned", "bf16_dh_defer_odd"]
         + [f"bf16_{g}_pingpong_{shape}" for g in ("down", "dx", "dh", "up_plain", "up_gated")
            for shape in ("aligned", "odd") if shape == "aligned" or g in ("dh", "up_plain")]
         + [f"bf16_{g}_cluster_aligned" for g in ("down", "dx", "dh", "down_pingpong")]
         + [f"bf16_up_{g}_cluster_{shape}" for g in ("gated", "plain")
            for shape in ("aligned", "odd")]
         + ["bf16_down_kindpp_aligned", "bf16_dx_kindpp_aligned"]
         + ["router_pieces_dx", "router_pieces_dx_small_e", "router_pieces_dx_e256",
            "router_pieces_dw", "router_pieces_gather_reduce",
            "router_pieces_gather_reduce_small_e", "router_pieces_gather_reduce_k2",
            "router_route_fwd",
            "router_route_fwd_groups", "router_route_bwd"])


def _run_worker(*args):
    """Runs ``gluon_compile_worker.py`` outside the interpreter, the repository importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    worker = os.path.join(root, "tests", "gluon_compile_worker.py")
    return subprocess.run([sys.executable, worker, *args], env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def compiled():
    run = _run_worker()
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0 and lines, f"worker failed:\n{run.stdout}\n{run.stderr[-3000:]}"
    return {line["case"]: line for line in lines if "case" in line}


@pytest.mark.parametrize("case", CASES)
def test_gluon_kernel_compiles_for_sm90(case, compiled):
    """bf16 weight gradients (``segment_mm_direct``: gathered B or A, every epilogue -- the
    read-add-write into bf16 and into fp32 --, widths that are multiples of 8 but not of 16 or
    the tile; dW_up also transposed, C stored transposed), the FP8 weight gradient, the FP8
    row-grouped GEMM (plain and with the fused dh' epilogue) and the 16-bit row-grouped GEMMs
    (``grouped_mm_direct``: GEMM2, dx, dh' with gathered rows, plain or with the activation
    backward in its epilogue, GEMM1 gated or not storing pre and / or h; the plain epilogue
    by TMA stores; the consumers on whole tiles in turn; launched as clusters of two CTAs,
    GEMM2 and dx with A multicast, dh' and GEMM1 with B multicast), the router's split-form
    backward GEMMs (Triton kernels at their tuned GPU tiles), its routing forward (int64
    ranks) and backward: compiled, within a Hopper block's shared memory."""
    assert case in compiled, f"{case}: not run by the worker"
    res = compiled[case]
    assert "error" not in res, f"{case}: {res['error']}"
    assert 0 < res["shared"] <= SMEM_LIMIT, res


# the launch choices behind the variants' cases (a fits-check or config that quietly fell back
# would compile, and be timed as, the kernel it was meant to be compared with)
LAUNCH = {
    "bf16_wgrad_up_aligned_atomic": dict(BM=256, BN=128, STAGES=4, B_GATHER=True,
                                         C_TRANS=False),
    "bf16_wgrad_up_aligned_rmw": dict(BM=256, BN=128, STAGES=3),      # the RMW tile's room
    "bf16_wgrad_up_aligned_rmw32": dict(BM=128, BN=128, STAGES=4),    # narrow: fp32 RMW
    "bf16_wgrad_up_odd_store": dict(BM=128, BN=128, STAGES=4),        # narrow: widths
    "bf16_wgrad_down_aligned_store": dict(BM=128, BN=256, STAGES=3, A_GATHER=True),
    "bf16_wgrad_up_swap_aligned_atomic": dict(BM=128, BN=256, A_GATHER=True, B_GATHER=False,
                                              C_TRANS=True),
    "bf16_up_gated_aligned_h": dict(TMA_STORE=False),
    "bf16_dh_tmastore_aligned": dict(TMA_STORE=True, STAGES=3, A_GATHER=True),
    "bf16_dx_tmastore_aligned": dict(TMA_STORE=True, STAGES=3),
    "bf16_down_regs_aligned": dict(TMA_STORE=0, STAGES=4, BN=256),
    "bf16_dx_aligned": dict(TMA_STORE=4, STAGES=4, BN=256),
    "bf16_dh_odd": dict(TMA_STORE=4, STAGES=4, A_GATHER=True),
    "bf16_dh_regs_odd": dict(TMA_STORE=0, STAGES=4, A_GATHER=True),
    "bf16_down_pingpong_aligned": dict(BN=128, STAGES=5, PINGPONG=True),
    "bf16_dh_pingpong_odd": dict(BN=128, A_GATHER=True, PINGPONG=True),
    "bf16_up_plain_pingpong_odd": dict(A_GATHER=True, PINGPONG=True),
    "bf16_up_gated_pingpong_aligned": dict(PINGPONG=False),  # two accumulators: not served
    # clusters of two CTAs where this Triton has TMA multicast: along the columns (A by TMA:
    # a tile of 2 x 256 columns), along the rows (A gathered: 2 x 128 rows)
    "bf16_down_cluster_aligned": (dict(CN=2, CM=1, BM=128, BN=512, STAGES=4)
                                  if GF.cluster_compiles() else dict(CN=1, CM=1, BN=256)),
    "bf16_dx_cluster_aligned": (dict(CN=2, CM=1, BN=512, STAGES=4) if GF.cluster_compiles()
                                else dict(CN=1, CM=1, BN=256)),
    "bf16_down_pingpong_cluster_aligned": (dict(CN=2, BN=256, PINGPONG=True)
                                           if GF.cluster_compiles() else dict(CN=1, BN=128)),
    "bf16_dh_cluster_aligned": (dict(CN=1, CM=2, BM=256, BN=256, A_GATHER=True)
                                if GF.cluster_compiles() else dict(CN=1, CM=1, BM=128)),
    "bf16_up_gated_cluster_odd": (dict(CN=1, CM=2, BM=256, BN=128, STAGES=4)
                                  if GF.cluster_compiles() else dict(CN=1, CM=1, BM=128)),
    "bf16_down_aligned": dict(BN=256, STAGES=4, TMA_STORE=4, PINGPONG=False, CN=1,
                              DEFER=False),
    "bf16_dx_tall_aligned": dict(BM=256, BN=128, STAGES=4, TMA_STORE=4),
    # the stored weight gradients by TMA in column parts (the default), or by registers
    "bf16_wgrad_up_swap_aligned_store": dict(BM=128, BN=256, STAGES=3, C_TRANS=True,
                                             TMA_STORE=True),
    "bf16_wgrad_down_odd_store": dict(BM=128, BN=128, STAGES=4, TMA_STORE=True),
    "bf16_wgrad_up_aligned_store": dict(BM=256, BN=128, STAGES=3, TMA_STORE=True),  # fitted
    "bf16_wgrad_up_aligned_store_regs": dict(TMA_STORE=False),
    "bf16_wgrad_down_aligned_atomic": dict(TMA_STORE=False),
    "bf16_dh_tall_odd": dict(BM=256, BN=128, STAGES=4, TMA_STORE=4, A_GATHER=True),
    "bf16_down_defer_aligned": dict(BN=256, STAGES=4, TMA_STORE=4, DEFER=True),
    "bf16_dx_defer_aligned": dict(BN=256, STAGES=4, TMA_STORE=4, DEFER=True),
    "bf16_dh_defer_odd": dict(BN=256, STAGES=4, TMA_STORE=4, A_GATHER=True, DEFER=False),
    # the fused dh': the whole tile's inputs staged by the producer beside a 3-slot ring
    "bf16_dh_fused_gated_aligned": dict(BN=128, STAGES=3, A_GATHER=True),
    # one GEMM's own configuration: GEMM2 with the consumers on whole tiles in turn, dx (the
    # same tuning) on the defaults
    "bf16_down_kindpp_aligned": dict(PINGPONG=True, BN=128, STAGES=5, TMA_STORE=0),
    "bf16_dx_kindpp_aligned": dict(PINGPONG=False, BN=256, STAGES=4, TMA_STORE=4),
}


@pytest.mark.parametrize("case", sorted(LAUNCH))
def test_gluon_case_compiles_the_intended_launch(case, compiled):
    """The constexpr arguments each variant's case was compiled with: the weight gradients'
    tiles (``gluon_gemm.bf16_seg_config``: 256 x 128 with x gathered, 128 x 256 with dout
    gathered, 128 x 128 for an fp32 read-add-write or widths not multiples of 16, the ring's
    slots fitted beside a read-add-write tile), dW_up transposed and the TMA-store epilogue
    where their switches are on, and not elsewhere; a configuration for one GEMM
    (``gluon_bf16_kind_configs``) on that GEMM only; clusters of two CTAs for GEMM2 and dx
    where asked and this Triton's Gluon has TMA multicast, along the columns for an A by TMA
    and along the rows for a gathered A."""
    assert case in compiled and "launch" in compiled[case], compiled.get(case)
    got = compiled[case]["launch"]
    for key, want in LAUNCH[case].items():
        assert got.get(key) == want, f"{case}: {key} = {got.get(key)}, expected {want}"


# launches compared through JITFunction.run and through fast_launch: the row-grouped kernel
# (GEMM2, GEMM1 gated with a gathered A, dx as clusters of two CTAs where this Triton has
# them), the weight gradient (dW_up transposed), FP8
FAST_LAUNCH_CASES = ["bf16_down_aligned", "bf16_up_gated_odd_pre_h", "bf16_dx_cluster_aligned",
                     "bf16_wgrad_up_swap_aligned_atomic", "fp8_wgrad_rmw"]


@pytest.fixture(scope="module")
def launch_checked():
    run = _run_worker("--launch-check", *FAST_LAUNCH_CASES)
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0 and lines, f"worker failed:\n{run.stdout}\n{run.stderr[-3000:]}"
    return lines


@pytest.mark.parametrize("case", FAST_LAUNCH_CASES)
def test_fast_launch_calls_the_launcher_as_jit_run(case, launch_checked):
    """``fast_launch.FastLaunch`` (``tuning.fast_launch``): a case launched a third time
    takes the fast path (no ``JITFunction.run``) and calls the kernel's launcher with the grid,
    stream, kernel and arguments (tensors, tensor descriptors, ints, constexprs) that the
    launch through ``JITFunction.run`` did; no launch hooks (the stand-in driver's launcher
    records the calls)."""
    got = {r["launch_check"]: r for r in launch_checked if "launch_check" in r}
    assert case in got, f"{case}: not run by the worker"
    assert got[case]["fast_path"], f"{case}: the third launch went through JITFunction.run"
    assert got[case]["same_launch"], f"{case}: the launcher got other arguments"


def test_fast_launch_key_splits_specialisations(launch_checked):
    """``FastLaunch.key``: the same arguments give the same key; a pointer off 16-byte
    alignment, an int no longer a multiple of 16, an int 1, a constexpr True passed as 1 and
    an equal shared layout in a new object each give another (Triton specialises on the first
    four; the last only costs a second lookup)."""
    checks = [r["key_check"] for r in launch_checked if "key_check" in r]
    assert checks, "the worker ran no key check"
    failed = [name for name, ok in checks[0].items() if not ok]
    assert not failed, f"FastLaunch.key: {failed}"
