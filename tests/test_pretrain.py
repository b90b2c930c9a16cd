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


def _train(tmp_path, name, *extra, nproc=2, gpu=False):
    log = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", SCRIPT,
           "--moe-use-plugin", "--log-interval", "1", "--log-json", str(log), "--plot",
           str(tmp_path / f"{name}.png"), *extra]
    env = worker_env(OMP_NUM_THREADS="1") if gpu else worker_env(OMP_NUM_THREADS="1",
                                                                   CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
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
    """The tiny GPT trained with the experts' GEMMs in FP8 (--moe-plugin-quant fp8_block, and
    fp8_block_wgrad: weight gradients in FP8 too) ends within 2% of the unquantised run's
    loss after 12 steps (same data and init; on CPU the unquantised run is fp32, the FP8 ones
    quantise the same fp32 tensors), and it learns."""
    steps = ["--train-iters", "12", "--log-interval", "4"]
    base = _train(tmp_path, "base", *steps)
    runs = {q: _train(tmp_path, q, *steps, "--moe-plugin-quant", q)
            for q in ("fp8_block", "fp8_block_wgrad")}
    for q, fp8 in runs.items():
        assert sorted(fp8) == [4, 8, 12], q
        assert fp8[12]["loss"] < fp8[4]["loss"], q
        assert abs(fp8[12]["loss"] - base[12]["loss"]) <= 0.02 * base[12]["loss"], q
        assert fp8[4]["loss"] != base[4]["loss"], q  # the FP8 path did run
    # the weight gradients differ: the second run's wgrad did run in FP8
    assert runs["fp8_block"][12]["loss"] != runs["fp8_block_wgrad"][12]["loss"]


def test_cuda_graph_flag_needs_cuda():
    """A clear command-line error, naming the flag, where capture cannot work (no CUDA here)."""
    proc = subprocess.run([sys.executable, SCRIPT, "--cuda-graph", "--moe-use-plugin"],
                          env=worker_env(CUDA_VISIBLE_DEVICES=""), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "--cuda-graph: it needs CUDA" in proc.stderr, proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_run_matches_eager_gpu(tmp_path):
    """--cuda-graph (each micro-batch's forward + backward replayed from one CUDA graph, two
    micro-batches per step: gradients accumulate across replays) trains with the losses of
    the eager run, step for step."""
    small = ["--train-iters", "6", "--num-layers", "3", "--first-dense-layers", "1",
             "--hidden-size", "256", "--num-attention-heads", "4", "--num-experts", "8",
             "--moe-ffn-hidden-size", "256", "--moe-shared-expert-intermediate-size", "256",
             "--seq-length", "256", "--micro-batch-size", "4", "--global-batch-size", "8",
             "--vocab-size", "1024"]
    eager = _train(tmp_path, "eager", *small, nproc=1, gpu=True)
    graph = _train(tmp_path, "graph", *small, "--cuda-graph", nproc=1, gpu=True)
    assert sorted(graph) == sorted(eager) == list(range(1, 7))
    for it in eager:
        assert graph[it]["loss"] == pytest.approx(eager[it]["loss"], rel=1e-5, abs=0), it
        assert graph[it]["grad_norm"] == pytest.approx(eager[it]["grad_norm"], rel=1e-5), it
    assert graph[6]["loss"] < graph[1]["loss"]
