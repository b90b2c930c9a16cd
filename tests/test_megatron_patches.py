"""moe_plugin/patches/: the megatron-core 0.16.1 te_general_gemm fix and the CPU shims.

The Megatron runs happen in subprocesses (tests/megatron_worker.py) with CUDA hidden, so they are
genuine CPU + gloo runs on any machine and the process-wide CPU shims never leak into this
pytest process:
  - world size 1: without the te_general_gemm fix the MoE forward raises the NameError; with
    ``patches.apply()`` forward + backward give a finite loss and finite gradients everywhere;
  - expert_model_parallel_size=2 over 2 gloo processes (torchrun): 3 AdamW steps through
    Megatron's DDP + ``finalize_model_grads``; the loss stays finite and falls, and the two EP
    ranks' shared (non-expert) parameters stay identical while their experts differ;
  - Megatron's distributed optimizer (tests/megatron_distopt_worker.py, world size 1): each of
    its three shims fails without and works with (0.19's grad-sync stream shim is needed there
    and a no-op on 0.16.1).
The selection logic of ``patches.apply`` and the "TE present" case are checked in-process.
The te_general_gemm fix is needed on megatron-core < 0.17 without TransformerEngine and a no-op
from 0.17 on (upstream binds the name): the tests assert what holds for the version installed.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import free_port, worker_env

pytest.importorskip("megatron.core")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "megatron_worker.py")
if REPO not in sys.path:  # this checkout's moe_plugin (and moe_plugin.patches) when run
    sys.path.insert(0, REPO)  # from another directory

from moe_plugin import patches  # noqa: E402
from packaging.version import Version  # noqa: E402
from moe_plugin.patches import megatron_te_general_gemm  # noqa: E402

MCORE = Version(__import__("megatron.core", fromlist=["__version__"]).__version__)
# from core_v0.17.0 moe_utils binds te_general_gemm (to None) without TransformerEngine
TE_GEMM_BOUND_UPSTREAM = MCORE >= Version("0.17")
CPU_SHIMS = [
    "patch_cuda_current_device", "patch_rng_tracker", "patch_alltoall_dispatcher_streams",
    "patch_cuda_synchronize", "patch_default_causal_mask", "patch_optimizer_cuda_tensors",
    "patch_optimizer_tensor_type_checks", "patch_distributed_optimizer_gather",
    "patch_grad_sync_current_stream"]


def _env(**extra):
    return worker_env(CUDA_VISIBLE_DEVICES="", **extra)  # a CPU run even on GPU machines


def _check_proc(proc):
    assert proc.returncode == 0, (proc.stdout[-3000:] + "\n" + proc.stderr[-5000:])


def _load(path):
    res = json.loads(path.read_text())
    assert "error" not in res, res["error"]
    return res


# ----------------------------------------------------------------------------------------------
# world size 1


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("megatron_single")
    env = _env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, WORKER, "single", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    _check_proc(proc)
    return _load(out / "single_rank0.json")


def test_te_general_gemm_fix_is_necessary(single):
    """CPU shims alone, megatron-core < 0.17 without TransformerEngine: the MoE forward dies in
    RouterGatingLinearFunction.forward (moe_utils.py:1192) with the NameError, and the fix
    binds the name. Where the name is bound already (TransformerEngine, or megatron-core
    >= 0.17, which binds it to None itself) the unfixed forward runs and the fix changes
    nothing."""
    assert single["cuda_available"] is False
    assert single["moe_layers"] == 2
    if single["have_te"] or TE_GEMM_BOUND_UPSTREAM:
        assert single["te_bound_before"] is True
        assert single["unpatched"]["raised"] is None, single["unpatched"]
        assert single["apply"]["te_general_gemm"] is False  # no-op
        if not single["have_te"]:  # upstream's own fallback: None, the torch.mm branch
            assert single["te_general_gemm_after"] == "None"
    else:
        assert single["te_bound_before"] is False
        unpatched = single["unpatched"]
        assert unpatched["raised"] == "NameError", unpatched
        assert "te_general_gemm" in unpatched["message"], unpatched
        assert unpatched["frame"].startswith("moe_utils.py:"), unpatched
        assert unpatched["frame"].endswith(":forward"), unpatched
        assert single["apply"]["te_general_gemm"] is True
        assert single["te_general_gemm_after"] == "None"
    assert single["te_fix_needed_after"] is False


def test_te_general_gemm_fix_is_sufficient_forward_backward(single):
    """With patches.apply(): finite loss, every parameter has a finite gradient, and the MoE
    path (router and experts) received gradient."""
    # idempotent: the shims were applied before patches.apply(), and a second apply changes nothing
    assert single["apply"]["cpu"] == []
    assert single["apply_again"] == {"te_general_gemm": False, "cpu": []}
    assert torch.isfinite(torch.tensor(single["loss"])) and single["loss"] > 0
    assert single["n_params"] > 0
    assert single["missing_grads"] == []
    assert single["nonfinite_grads"] == []
    assert single["router_grad_norm"] > 0
    assert single["expert_grad_norm"] > 0


def test_patched_router_gemm_equals_torch_fallback(single):
    """The fixed router GEMM is upstream's fallback: x @ W^T, and its gradients."""
    assert single["gating_matches_torch"] is True


def test_cpu_expert_bias_router(single):
    """Expert-bias buffers land on the CPU and the aux-loss-free router counts its tokens."""
    eb = single["expert_bias"]
    assert eb["device"] == "cpu"
    assert eb["probs_finite"] is True
    assert eb["routed"] == eb["tokens_counted"] == 16 * 2 * 2  # SEQ * BATCH tokens x top-2


def test_cpu_rng_tracker(single):
    """The RNG-tracker shim: fork() has its own reproducible stream, advances it, and leaves the
    default generator alone; re-seeding reproduces it."""
    assert single["cpu_shims"] == CPU_SHIMS
    assert single["rng_default_untouched"] is True
    assert single["rng_fork_advances"] is True
    assert single["rng_reseed_reproduces"] is True


# ----------------------------------------------------------------------------------------------
# expert_model_parallel_size=2 over 2 gloo processes


def test_ep2_gloo_trains_and_keeps_shared_params_identical(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           WORKER, "ep", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    _check_proc(proc)
    res = [_load(tmp_path / f"ep_rank{r}.json") for r in range(2)]

    for r, rr in enumerate(res):
        assert rr["apply"]["cpu"], rr["apply"]  # auto mode: CUDA hidden -> CPU shims applied
        assert (rr["ep_size"], rr["ep_rank"], rr["dp_size"]) == (2, r, 2)
        assert rr["moe_layers"] == 2
        assert len(rr["losses"]) == 4  # 3 training steps + the loss after the last one
        assert all(torch.isfinite(torch.tensor(rr["losses"])))
        assert rr["grads_finite"] is True
        # same batch each step: AdamW at lr 1e-2 lowers it
        assert rr["losses"][-1] < rr["losses"][0], rr["losses"]
    # each DP rank had its own tokens: the local shared gradients differ, the synced ones agree
    assert res[0]["shared_grad_norm_local"] != res[1]["shared_grad_norm_local"]
    assert res[0]["shared_grad_norm_synced"] == pytest.approx(
        res[1]["shared_grad_norm_synced"], rel=1e-6)

    expert_names = set(res[0]["expert_params"])
    assert expert_names == set(res[1]["expert_params"])
    assert len(expert_names) == 8  # 2 layers x 2 local experts x (fc1, fc2)
    p0, p1 = (torch.load(tmp_path / f"ep_rank{r}.pt") for r in range(2))
    assert p0.keys() == p1.keys()
    shared = [n for n in p0 if n not in expert_names]
    assert len(shared) > 10 and any("router" in n for n in shared)
    not_equal = [n for n in shared if not torch.equal(p0[n], p1[n])]
    assert not_equal == [], f"shared parameters differ between EP ranks: {not_equal}"
    # the EP ranks hold different experts (seeded per rank), so the check above is not vacuous
    assert all(not torch.equal(p0[n], p1[n]) for n in expert_names)


# ----------------------------------------------------------------------------------------------
# Megatron's distributed optimizer on CPU (world size 1)


def test_distributed_optimizer_shims(tmp_path):
    """Each distributed-optimizer shim: what fails without it, and that it suffices --
    the optimizer builds and steps with clipping, the loss falls, and the fully_reshardable
    gather returns the optimizer's own state. Idempotent; nothing stays changed outside the
    wrapped calls (``Tensor.type`` / ``Tensor.cuda`` are torch's again)."""
    out = tmp_path / "distopt.json"
    env = _env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "megatron_distopt_worker.py"),
                           "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    _check_proc(proc)
    res = _load(out)
    assert res["cuda_available"] is False
    assert res["others"] == [n for n in CPU_SHIMS if n not in (
        "patch_optimizer_tensor_type_checks", "patch_distributed_optimizer_gather",
        "patch_grad_sync_current_stream")]
    # 0.19 takes the current CUDA stream in start_grad_sync, 0.16.1 does not (0.17 and 0.18
    # were not checked)
    if MCORE >= Version("0.19"):
        assert res["finalize_without"] is not None and (
            "CUDA" in res["finalize_without"] or "NVIDIA" in res["finalize_without"])
    elif MCORE < Version("0.17"):
        assert res["finalize_without"] is None
    assert res["finalize_with"] is None
    assert res["build_without"].startswith("TypeError: Wrapped parameters must be one of")
    assert res["clip_without"].startswith("AssertionError")
    assert "CUDA" in res["gather_without"] or "NVIDIA" in res["gather_without"]
    for name in ("stream", "types", "gather"):
        assert res[f"{name}_shim_applied"] is True and res[f"{name}_shim_again"] is False
    assert res["clipped_grad"] == pytest.approx([2.0 / (4.0 + 1e-6)] * 3, rel=1e-6)
    assert res["type_outside_shim"] == "torch.FloatTensor"
    assert res["cuda_outside_shim"] is not None  # .cuda() raises again outside the gather
    assert res["steps_ok"] == [True, True]
    assert all(g > 0 for g in res["grad_norms"])
    assert res["losses"][1] < res["losses"][0]
    assert res["gathered_params"] > 10 and res["gathered_equal"] is True
    assert res["exp_avg_nonzero"] is True
    assert res["shims_in_list"] is True


# ----------------------------------------------------------------------------------------------
# in-process: selection logic and the TE-present case (nothing process-wide is left changed)


def test_te_general_gemm_fix_leaves_an_existing_binding_alone(monkeypatch):
    """With TE installed (or megatron-core >= 0.17) moe_utils.te_general_gemm exists: the fix
    must not touch it."""
    from megatron.core.transformer.moe import moe_utils

    sentinel = object()
    monkeypatch.setattr(moe_utils, "te_general_gemm", sentinel, raising=False)
    assert megatron_te_general_gemm.is_needed() is False
    assert megatron_te_general_gemm.apply() is False
    assert moe_utils.te_general_gemm is sentinel
    assert patches.apply(cpu=False) == {"te_general_gemm": False, "cpu": []}
    assert moe_utils.te_general_gemm is sentinel


def test_te_general_gemm_fix_binds_the_missing_name(monkeypatch):
    from megatron.core.transformer.moe import moe_utils

    monkeypatch.delattr(moe_utils, "te_general_gemm", raising=False)
    assert megatron_te_general_gemm.is_needed() is True
    assert megatron_te_general_gemm.apply() is True
    assert moe_utils.te_general_gemm is None
    assert megatron_te_general_gemm.apply() is False  # idempotent


@pytest.mark.parametrize("cpu, cuda_available, expect_shims", [
    (None, False, True), (None, True, False), (True, True, True), (False, False, False)])
def test_apply_selects_cpu_shims(monkeypatch, cpu, cuda_available, expect_shims):
    from moe_plugin.patches import megatron_cpu

    calls = []
    monkeypatch.setattr(megatron_cpu, "apply", lambda: calls.append(1) or ["spy"])
    monkeypatch.setattr(megatron_te_general_gemm, "apply", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_available)
    result = patches.apply(cpu=cpu)
    assert bool(calls) is expect_shims
    assert result["cpu"] == (["spy"] if expect_shims else [])
