"""examples/pretrain_gpt_moe.py on CPU (2 processes, gloo, Triton interpreter): the loss falls;
a run saved at iteration 2 and resumed continues with the same losses as an uninterrupted run;
a stock Megatron-Core run's checkpoint resumes in a plugin run at expert-parallel size 2, whose
checkpoint resumes in a stock run at EP 1, each with the uninterrupted stock run's losses (the
checkpoints: moe_plugin.megatron.checkpoint, Megatron's distributed optimizer and scheduler)."""
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


def _train(tmp_path, name, *extra, nproc=2, gpu=False, plugin=True):
    log = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", SCRIPT,
           *(["--moe-use-plugin"] if plugin else []), "--log-interval", "1", "--log-json",
           str(log), "--plot", str(tmp_path / f"{name}.png"), *extra]
    env = worker_env(OMP_NUM_THREADS="1") if gpu else worker_env(OMP_NUM_THREADS="1",
                                                                   CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {r["iter"]: r for r in json.loads(log.read_text())["log"]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) variant")
def test_loss_falls_and_resume_is_exact(tmp_path):
    steps = ["--lr-warmup-iters", "1"]
    full = _train(tmp_path, "full", "--train-iters", "4", *steps)
    assert sorted(full) == [1, 2, 3, 4]
    assert full[4]["loss"] < full[2]["loss"]  # (iteration 1 has lr 0: warm-up from 0)
    assert full[1]["lr"] == 0 and full[2]["lr"] == 3e-3 > full[3]["lr"] > full[4]["lr"]
    for r in full.values():
        assert r["load_balancing_loss"] > 0 and r["z_loss"] > 0 and r["tokens_per_s"] > 0
    assert (tmp_path / "full.png").stat().st_size > 0
    ckpt = tmp_path / "ckpt"
    first = _train(tmp_path, "first", "--train-iters", "2", *steps, "--save", str(ckpt))
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (ckpt / "iter_0000002" / "metadata.json").is_file()  # a dist_checkpointing dir
    for it in (1, 2):
        assert first[it]["loss"] == full[it]["loss"]
    resumed = _train(tmp_path, "resumed", "--train-iters", "4", *steps, "--load", str(ckpt))
    assert sorted(resumed) == [3, 4]
    for it in (3, 4):
        assert resumed[it]["loss"] == pytest.approx(full[it]["loss"], rel=1e-6, abs=0)
        assert resumed[it]["grad_norm"] == pytest.approx(full[it]["grad_norm"], rel=1e-6)
        assert resumed[it]["lr"] == full[it]["lr"]


def _resume_from(ckpt, iteration: int) -> None:
    """Points the checkpoint directory's tracker at an earlier saved iteration (as a Megatron
    user resumes from one of several checkpoints)."""
    assert (ckpt / f"iter_{iteration:07d}").is_dir()
    (ckpt / "latest_checkpointed_iteration.txt").write_text(str(iteration))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) variant")
def test_checkpoints_move_between_stock_and_plugin_runs_across_ep(tmp_path):
    """Stock Megatron-Core (EP 1) trains 4 iterations, saving at 2 and 4; a plugin run at EP 2
    resumes from iteration 2 (saving at 3), and a stock run at EP 1 resumes from the plugin's
    iteration 3: their losses and gradient norms are the uninterrupted stock run's (fp32:
    the two implementations' arithmetic differs in rounding only)."""
    common = ["--train-iters", "4", "--lr-warmup-iters", "1"]
    stock_ckpt, plugin_ckpt = tmp_path / "stock_ckpt", tmp_path / "plugin_ckpt"
    stock = _train(tmp_path, "stock", *common, "--save", str(stock_ckpt), "--save-interval",
                   "2", plugin=False)
    assert sorted(stock) == [1, 2, 3, 4]
    _resume_from(stock_ckpt, 2)
    plugin = _train(tmp_path, "plugin_ep2", *common, "--expert-model-parallel-size", "2",
                    "--load", str(stock_ckpt), "--save", str(plugin_ckpt), "--save-interval",
                    "3")
    assert sorted(plugin) == [3, 4]
    _resume_from(plugin_ckpt, 3)
    back = _train(tmp_path, "stock_again", *common, "--load", str(plugin_ckpt), plugin=False)
    assert sorted(back) == [4]
    for run in (plugin, back):
        for it, row in run.items():
            assert row["loss"] == pytest.approx(stock[it]["loss"], rel=1e-5, abs=0), it
            assert row["grad_norm"] == pytest.approx(stock[it]["grad_norm"], rel=1e-5), it
            assert row["lr"] == stock[it]["lr"]
    # not vacuous: the steps resumed do change the loss
    assert len({stock[it]["loss"] for it in (2, 3, 4)}) == 3


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
