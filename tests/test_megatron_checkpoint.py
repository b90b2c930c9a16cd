"""Full resume across implementations and expert-parallel sizes (moe_plugin.megatron.checkpoint).

The torchrun worker (tests/megatron_ckpt_worker.py, 2 processes, gloo, CPU) saves a stock
Megatron-Core GPT-MoE run at EP=1 with Megatron's distributed optimizer and scheduler, resumes
it in a plugin model at EP=2, saves that after one step, and resumes it in a stock model at
EP=1 again. Loaded state must equal the saved state exactly (weights, fp32 main params,
exp_avg, exp_avg_sq, Adam steps, group hyper-parameters, scheduler); the step after each
resume must match the uninterrupted run's step (loss, weights, optimizer state and the
weights' update within fp32 rounding: the two implementations' gradients differ in rounding).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("megatron.core")

from conftest import FP32_TOL, free_port, worker_env  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "megatron_ckpt_worker.py")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("CPU gloo variant")
    tmp = tmp_path_factory.mktemp("megatron_ckpt")
    out = tmp / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", WORKER,
           "--out", str(out), "--dir", str(tmp)]
    proc = subprocess.run(cmd, env=worker_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for rank, res in enumerate(results):
        assert "error" not in res, f"rank {rank}: {res['trace']}"
    assert results[0] == results[1]  # everything compared is gathered over the ranks
    return results[0]


KINDS = ("weight", "param", "exp_avg", "exp_avg_sq")


@pytest.mark.parametrize("what", ["stock_to_plugin", "plugin_to_stock"])
def test_loaded_state_is_the_saved_state(resumed, what):
    """stock EP=1 -> plugin EP=2 and plugin EP=2 -> stock EP=1: every weight, fp32 main
    param, exp_avg and exp_avg_sq equal the saved ones exactly, so do Adam's step counts, the
    parameter groups' hyper-parameters and the scheduler's state; the data position comes back."""
    for key in [f"{what}_{k}_equal" for k in KINDS] + [
            f"{what}_groups_equal", f"{what}_adam_steps_equal", f"{what}_scheduler_equal"]:
        assert resumed[key] is True, (key, resumed.get(key))
    assert resumed["common_a"] is True and resumed["common_b"] is True
    # not vacuous: the plugin model started from other weights, in two optimizers (EP=2)
    assert resumed["fresh_plugin_differs"] is True
    assert resumed["plugin_chained"] == 2


@pytest.mark.parametrize("what", ["plugin_step3", "stock_step4"])
def test_step_after_resume_matches_uninterrupted_run(resumed, what):
    """The step after each resume (the plugin's step 3 at EP=2, the stock model's step 4 at
    EP=1) against the uninterrupted stock run's: the loss, the weights and optimizer state
    after it, and the weights' update itself, within fp32 rounding."""
    assert resumed[f"{what}_loss_err"] <= FP32_TOL
    for kind in KINDS:
        assert resumed[f"{what}_{kind}_err"] <= FP32_TOL, kind
    assert resumed[f"{what}_update_err"] <= FP32_TOL, resumed[f"{what}_update_worst"]
    for key in ("groups_equal", "adam_steps_equal", "scheduler_equal"):
        assert resumed[f"{what}_{key}"] is True, (key, resumed[f"{what}_{key}"])
    assert resumed["ref_step4_moved_experts"] is True  # the steps do move the experts


# ---------------------------------------------------------------------------------------------
# bad input: clear errors naming the argument (in-process, no process group needed)


def test_bad_input_names_the_argument(tmp_path):
    from moe_plugin.megatron import checkpoint as ck
    with pytest.raises(FileNotFoundError, match="checkpoint_dir: no latest_checkpointed"):
        ck.latest_iteration(str(tmp_path))
    (tmp_path / ck.TRACKER_FILE).write_text("release")
    with pytest.raises(ValueError, match="checkpoint_dir: .* holds 'release'"):
        ck.latest_iteration(str(tmp_path))
    (tmp_path / ck.TRACKER_FILE).write_text("7\n")
    assert ck.latest_iteration(str(tmp_path)) == 7
    with pytest.raises(FileNotFoundError, match="checkpoint_dir: .*iter_0000007"):
        ck.load_checkpoint(str(tmp_path), model=None)
    with pytest.raises(ValueError, match="iteration: expected None or an int"):
        ck.load_checkpoint(str(tmp_path), model=None, iteration="7")
    with pytest.raises(ValueError, match="iteration: expected an int >= 0"):
        ck.save_checkpoint(str(tmp_path), -1, model=None)
    with pytest.raises(ValueError, match=r"common: \['checkpoint_version'\]"):
        ck.save_checkpoint(str(tmp_path), 1, None, checkpoint_version=2)
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(TypeError, match="optimizer: expected Megatron's distributed optimizer"):
        ck.sub_optimizers(sgd)
