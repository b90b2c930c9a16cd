"""examples/pretrain_gpt_moe.py on CPU (2 processes, gloo, Triton interpreter): the loss falls,
and a run saved at iteration 2 and resumed continues with the same losses as an uninterrupted
run (model through dist_checkpointing, optimizer and data position per rank)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import free_port, worker_env
import torch

pytest.importorskip("megatron.core")

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                      "pretrain_gpt_moe.py")


def _train(tmp_path, name, *extra):
    log = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", SCRIPT,
           "--moe-use-plugin", "--log-interval", "1", "--log-json", str(log), "--plot",
           str(tmp_path / f"{name}.png"), *extra]
    proc = subprocess.run(cmd, env=worker_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=900,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {r["iter"]: r for r in json.loads(log.read_text())["log"]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) variant")
def test_loss_falls_and_resume_is_exact(tmp_path):
    full = _train(tmp_path, "full", "--train-iters", "4")
    assert sorted(full) == [1, 2, 3, 4]
    assert full[4]["loss"] < full[1]["loss"]
    for r in full.values():
        assert r["load_balancing_loss"] > 0 and r["z_loss"] > 0 and r["tokens_per_s"] > 0
    assert (tmp_path / "full.png").stat().st_size > 0
    ckpt = tmp_path / "ckpt"
    first = _train(tmp_path, "first", "--train-iters", "2", "--save", str(ckpt))
    assert (ckpt / "latest").read_text().strip() == "iter_0000002"
    for it in (1, 2):
        assert first[it]["loss"] == full[it]["loss"]
    resumed = _train(tmp_path, "resumed", "--train-iters", "4", "--load", str(ckpt))
    assert sorted(resumed) == [3, 4]
    for it in (3, 4):
        assert resumed[it]["loss"] == pytest.approx(full[it]["loss"], rel=1e-6, abs=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) variant")
def test_fp8_experts_loss_within_2_percent(tmp_path):
    """The tiny GPT trained with the experts' GEMMs in FP8 (--moe-plugin-quant fp8_block)
    ends within 2% of the unquantised run's loss after 12 steps (same data and init; on CPU
    the unquantised run is fp32, the FP8 one quantises the same fp32 tensors), and it learns."""
    steps = ["--train-iters", "12", "--log-interval", "4"]
    base = _train(tmp_path, "base", *steps)
    fp8 = _train(tmp_path, "fp8", *steps, "--moe-plugin-quant", "fp8_block")
    assert sorted(fp8) == [4, 8, 12]
    assert fp8[12]["loss"] < fp8[4]["loss"]
    assert abs(fp8[12]["loss"] - base[12]["loss"]) <= 0.02 * base[12]["loss"]
    assert fp8[4]["loss"] != base[4]["loss"]  # the FP8 path did run
