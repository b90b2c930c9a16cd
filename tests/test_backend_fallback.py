"""``backend="auto"``: when it falls back to the plain-PyTorch path it says so, once per process
and reason, naming why and how to get the Triton kernels; when the Triton kernels run it says
nothing.

In this pytest process the interpreter is on (conftest.py sets TRITON_INTERPRET=1 without a
GPU); the CPU-without-interpreter case is tested in-process by clearing the variable for the
call (``interpret_mode()`` reads it at every call) and, as a user meets it, in a fresh process
started without the variable.
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import moe_plugin
from moe_plugin import functional
from conftest import DEVICE, HAS_CUDA, moe_inputs, worker_env

HERE = os.path.dirname(os.path.abspath(__file__))


def _fallback_warnings(record):
    return [w for w in record if issubclass(w.category, UserWarning)
            and "backend='auto' runs the plain-PyTorch path" in str(w.message)]


def _call_fused_moe(inp, **kwargs):
    return moe_plugin.fused_moe(inp["x"], inp["gate"], inp["w_up"], inp["w_down"], 2, **kwargs)


@pytest.fixture
def fresh_once_guard(monkeypatch):
    """A process that has not warned yet."""
    monkeypatch.setattr(functional, "_FALLBACK_WARNED", set())


@pytest.fixture
def spy_use_triton(monkeypatch):
    """Records what ``select_triton`` decided for each call (the layer imports it by name)."""
    decisions = []
    orig = functional.select_triton

    def spy(backend, x):
        use = orig(backend, x)
        decisions.append((backend, use))
        return use

    monkeypatch.setattr(functional, "select_triton", spy)
    monkeypatch.setattr(moe_plugin.layer, "select_triton", spy)
    return decisions


def test_auto_cpu_without_interpreter_warns_once(monkeypatch, fresh_once_guard,
                                                  spy_use_triton):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    inp = moe_inputs(1, 12, 16, 8, 4, device="cpu")
    layer = moe_plugin.MoELayer(16, 8, 4, 2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out, _ = _call_fused_moe(inp)
        _call_fused_moe(inp)
        moe_plugin.fused_experts(inp["x"], torch.tensor([[0, 1]] * 12),
                                 torch.ones(12, 2), inp["w_up"], inp["w_down"])
        layer(torch.randn(3, 16))
    assert [use for _, use in spy_use_triton] == [False] * 4
    found = _fallback_warnings(record)
    assert len(found) == 1, [str(w.message) for w in record]
    msg = str(found[0].message)
    # why, and how to get the Triton path
    assert "on the CPU and TRITON_INTERPRET is not set" in msg
    assert "set TRITON_INTERPRET=1 in the environment before importing moe_plugin" in msg
    assert "backend='torch'" in msg
    # and it did run the reference: the same result as backend="torch"
    ref, _ = _call_fused_moe(inp, backend="torch")
    assert torch.equal(out, ref)


def test_explicit_torch_backend_is_silent(monkeypatch, fresh_once_guard):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    inp = moe_inputs(2, 12, 16, 8, 4, device="cpu")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _call_fused_moe(inp, backend="torch")
        moe_plugin.MoELayer(16, 8, 4, 2, backend="torch")(torch.randn(3, 16))
    assert _fallback_warnings(record) == []


def test_auto_unsupported_dtype_warns_once_with_its_reason(fresh_once_guard):
    inp = moe_inputs(3, 12, 16, 8, 4, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _call_fused_moe(inp)
        _call_fused_moe(inp)
    found = _fallback_warnings(record)
    assert len(found) == 1
    assert "hidden_states are torch.float64" in str(found[0].message)
    assert "torch.float32, torch.bfloat16, torch.float16" in str(found[0].message)


def test_auto_is_silent_when_triton_runs(fresh_once_guard, spy_use_triton):
    """The interpreter is on here (or the tensors are on the GPU): the kernels run, no message."""
    inp = moe_inputs(4, 12, 16, 8, 4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out, _ = _call_fused_moe(inp)
        moe_plugin.MoELayer(16, 8, 4, 2, device=DEVICE)(torch.randn(3, 16, device=DEVICE))
    assert spy_use_triton == [("auto", True), ("auto", True)]
    assert _fallback_warnings(record) == []
    assert functional._FALLBACK_WARNED == set()
    out_triton, _ = _call_fused_moe(inp, backend="triton")
    assert torch.equal(out, out_triton)


@pytest.mark.skipif(HAS_CUDA, reason="the fallback happens on CPU-only machines")
def test_fresh_process_without_interpreter_warns_once():
    """As a user meets it: a script on a CPU machine that never set TRITON_INTERPRET."""
    script = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "import moe_plugin\n"
        "x = torch.randn(16, 32); gate = torch.randn(4, 32)\n"
        "w_up = torch.randn(4, 16, 32); w_down = torch.randn(4, 32, 8)\n"
        "with warnings.catch_warnings(record=True) as rec:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3):\n"
        "        moe_plugin.fused_moe(x, gate, w_up, w_down, 2)\n"
        "    moe_plugin.MoELayer(32, 8, 4, 2)(x)\n"
        "print(sum('plain-PyTorch path' in str(w.message) for w in rec))\n")
    env = worker_env()
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=HERE,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "1", proc.stdout + proc.stderr[-2000:]
