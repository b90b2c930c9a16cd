"""Shared set-up and helpers for the moe_plugin tests.

Without CUDA the Triton kernels run on CPU tensors in Triton's interpreter: the environment
variable has to be set before triton (or moe_plugin, which imports it) is imported. With
CUDA, the same tests run the compiled kernels on the GPU.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import contextlib  # noqa: E402
import math  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402

import moe_plugin  # noqa: E402,F401  (imported after the variable is set)
from moe_plugin import reference  # noqa: E402
from moe_plugin.kernels import tuning  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda") if HAS_CUDA else torch.device("cpu")
GATED = {"swiglu": True, "geglu": True, "swiglu_oai": True, "geglu_erf": True,
         "gelu": False, "relu2": False, "silu": False, "gelu_erf": False}
ACTIVATIONS = tuple(GATED)
FP32_TOL = 1e-5
BF16_TOL = 1e-2

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


# ----------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture
def seed(request) -> int:
    """A reproducible seed that differs between test cases (derived from the test's name,
    parametrisation included)."""
    return zlib.crc32(request.node.name.encode())


@pytest.fixture
def tune():
    """``tune(**fields)`` applies ``moe_plugin.kernels.tuning.override(**fields)`` until the
    end of the test (calls nest: a later one applies over the earlier ones)."""
    with contextlib.ExitStack() as stack:
        yield lambda **fields: stack.enter_context(tuning.override(**fields))


@pytest.fixture
def poison_empty(monkeypatch):
    """Makes every floating-point ``torch.empty``/``empty_like``/``new_empty`` come back filled
    with NaN, so an output element that a kernel forgets to write shows up as NaN."""
    orig_empty, orig_empty_like, orig_new_empty = torch.empty, torch.empty_like, \
        torch.Tensor.new_empty

    def _poison(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(orig_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(orig_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty",
                        lambda self, *a, **k: _poison(orig_new_empty(self, *a, **k)))
    yield


@pytest.fixture
def routed_layer_calls(monkeypatch):
    """A list that gains an entry at every forward of ``RoutedLayerFunction`` (the router and
    the experts as one Function) during the test: whether a path took it."""
    from moe_plugin.autograd import routed_layer
    calls = []
    real = routed_layer.RoutedLayerFunction.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(routed_layer.RoutedLayerFunction, "forward", staticmethod(counted))
    return calls


# ----------------------------------------------------------------------------------------------
# comparisons

def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (the absolute norm of out when ref is all zero)."""
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    assert torch.isfinite(o).all(), "output holds NaN or Inf"
    den = r.norm().item()
    num = (o - r).norm().item()
    return num if den == 0 else num / den


def assert_close(out, ref, tol: float, what: str) -> None:
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative L2 error {err:.3e} > {tol:.0e}"


def worker_env(**extra) -> dict:
    """Environment for a test's subprocess: one OpenMP thread per process and the repo on
    PYTHONPATH (so workers import this checkout's ``moe_plugin``, ``moe_plugin.patches``
    included, even where the package is not installed, or an older editable install points
    elsewhere)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a torchrun rendezvous (``--master_port=0`` hangs)."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_losses_exercised(kwargs: dict, info: dict, rinfo: dict) -> None:
    """A loss asked for is non-zero in the reference; one not asked for is exactly zero."""
    for name in ("aux_loss", "z_loss"):
        if kwargs.get(name + "_coeff", 0) > 0:
            assert rinfo[name] > 0, name
        else:
            assert info[name] == 0, name


def assert_bitwise(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    ia = a.detach().contiguous().view(-1).view(torch.uint8)
    ib = b.detach().contiguous().view(-1).view(torch.uint8)
    assert torch.equal(ia, ib), f"{what}: not bitwise identical"


# ----------------------------------------------------------------------------------------------
# inputs

def random_ids(gen: torch.Generator, n: int, e: int, k: int) -> torch.Tensor:
    """``[n, k]`` int64 ids, distinct within each row (k <= e)."""
    return torch.rand(n, e, generator=gen).argsort(dim=-1)[:, :k].contiguous()


def expert_inputs(seed: int, n: int, d: int, f: int, e: int, k: int, *, activation="swiglu",
                  dtype=torch.float32, weights_dtype=None, x_scale: float = 1.0, ids=None,
                  device=DEVICE, bias=()) -> dict:
    """Random inputs of ``fused_experts``; weights scaled by 1/sqrt(fan_in). ``bias``: the
    expert biases to include (``"b_up"`` ``[E, 2F|F]``, ``"b_down"`` ``[E, D]``, N(0, 0.5²),
    drawn after the other inputs)."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * f if GATED[activation] else f
    x = torch.randn(n, d, generator=gen) * x_scale
    w_up = torch.randn(e, rows, d, generator=gen) / math.sqrt(d)
    w_down = torch.randn(e, d, f, generator=gen) / math.sqrt(f)
    if ids is None:
        ids = random_ids(gen, n, e, k)
    weights = torch.rand(n, k, generator=gen) + 0.1
    gout = torch.randn(n, d, generator=gen)
    inp = dict(x=x.to(device, dtype), ids=ids.to(device),
               weights=weights.to(device, weights_dtype or dtype),
               w_up=w_up.to(device, dtype), w_down=w_down.to(device, dtype),
               gout=gout.to(device, dtype))
    shapes = {"b_up": (e, rows), "b_down": (e, d)}
    for name in BIAS_NAMES:
        if name in bias:
            inp[name] = (torch.randn(shapes[name], generator=gen) * 0.5).to(device, dtype)
    return inp


EXPERT_GRAD_NAMES = ("x", "weights", "w_up", "w_down")
BIAS_NAMES = ("b_up", "b_down")


def grad_names(inp: dict) -> tuple:
    """The differentiable inputs of ``inp``: ``EXPERT_GRAD_NAMES`` (or ``MOE_GRAD_NAMES``) and
    the expert biases it holds."""
    base = MOE_GRAD_NAMES if "gate" in inp else EXPERT_GRAD_NAMES
    return base + tuple(n for n in BIAS_NAMES if n in inp)


def assert_clamp_exercised(inp: dict, limit: float, at_least: int = 10) -> None:
    """The routed pre-activations of a gated activation go above ``limit`` in the gate half and
    beyond +-limit in the up half (swiglu_oai's clamp branches are taken)."""
    ids = inp["ids"].long()
    used = ids >= 0
    pre = torch.einsum("nd,nkfd->nkf", inp["x"].double(),
                       inp["w_up"].double()[ids.clamp(min=0)])[used]
    g, u = pre.chunk(2, dim=-1)
    assert (g > limit).sum() >= at_least
    assert (u > limit).sum() >= at_least and (u < -limit).sum() >= at_least


def run_fused_experts(inp: dict, activation: str, **kwargs):
    """Runs ``fused_experts`` (Triton forced) forward and backward.

    Returns ``(out, {name: grad})`` for x, weights, w_up, w_down and the biases in ``inp``."""
    names = grad_names(inp)
    leaves = {n: inp[n].detach().clone().requires_grad_() for n in names}
    kwargs.setdefault("backend", "triton")
    out = moe_plugin.fused_experts(leaves["x"], inp["ids"], leaves["weights"], leaves["w_up"],
                                   leaves["w_down"], activation, b_up=leaves.get("b_up"),
                                   b_down=leaves.get("b_down"), **kwargs)
    grads = torch.autograd.grad(out, [leaves[n] for n in names], inp["gout"])
    return out.detach(), dict(zip(names, grads))


def run_reference_experts(inp: dict, activation: str):
    """``reference.experts`` on float64 copies; same return as ``run_fused_experts``."""
    names = grad_names(inp)
    leaves = {n: inp[n].detach().to(torch.float64).requires_grad_() for n in names}
    out = reference.experts(leaves["x"], inp["ids"].long(), leaves["weights"], leaves["w_up"],
                            leaves["w_down"], activation, leaves.get("b_up"), leaves.get("b_down"))
    ins = [leaves[n] for n in names]
    if out.requires_grad:
        grads = torch.autograd.grad(out, ins, inp["gout"].to(torch.float64), allow_unused=True)
    else:
        grads = [None] * len(ins)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(ins, grads)]
    return out.detach(), dict(zip(names, grads))


def check_experts(inp: dict, activation: str, tol: float = FP32_TOL, **kwargs):
    """Fused vs float64 reference: output and every gradient (the biases' too, when ``inp``
    holds them). Returns both results."""
    out, grads = run_fused_experts(inp, activation, **kwargs)
    ref, ref_grads = run_reference_experts(inp, activation)
    assert out.dtype == inp["x"].dtype and out.shape == inp["x"].shape
    assert grads["weights"].dtype == inp["weights"].dtype
    assert_close(out, ref, tol, "out")
    for name in grad_names(inp):
        assert grads[name].shape == inp[name].shape, name
        assert_close(grads[name], ref_grads[name], tol, f"grad {name}")
    return (out, grads), (ref, ref_grads)


def moe_inputs(seed: int, n: int, d: int, f: int, e: int, *, activation="swiglu",
               dtype=torch.float32, gate_scale: float = 1.0, device=DEVICE, bias=()) -> dict:
    """Random inputs of ``fused_moe``; ``gate_scale`` spreads the router logits; ``bias`` as in
    ``expert_inputs``."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * f if GATED[activation] else f
    x = torch.randn(n, d, generator=gen)
    gate = torch.randn(e, d, generator=gen) * (gate_scale / math.sqrt(d))
    w_up = torch.randn(e, rows, d, generator=gen) / math.sqrt(d)
    w_down = torch.randn(e, d, f, generator=gen) / math.sqrt(f)
    gout = torch.randn(n, d, generator=gen)
    inp = dict(x=x.to(device, dtype), gate=gate.to(device, dtype), w_up=w_up.to(device, dtype),
               w_down=w_down.to(device, dtype), gout=gout.to(device, dtype))
    shapes = {"b_up": (e, rows), "b_down": (e, d)}
    for name in BIAS_NAMES:
        if name in bias:
            inp[name] = (torch.randn(shapes[name], generator=gen) * 0.5).to(device, dtype)
    return inp


MOE_GRAD_NAMES = ("x", "gate", "w_up", "w_down")
AUX_WEIGHT, Z_WEIGHT = 3.0, 2.0


def _moe_loss(out, info, gout):
    return ((out.to(torch.float64) * gout.to(torch.float64)).sum()
            + AUX_WEIGHT * info["aux_loss"].to(torch.float64)
            + Z_WEIGHT * info["z_loss"].to(torch.float64))


def run_fused_moe(inp: dict, top_k: int, weights_grad: bool = False, **kwargs):
    """``fused_moe`` (Triton forced) forward and backward of
    ``(out·gout).sum() + 3·aux_loss + 2·z_loss``. Returns ``(out, info, grads)``; with
    ``weights_grad`` ``grads`` also holds the gradient of ``info["topk_weights"]``."""
    names = list(grad_names(inp))
    leaves = {n: inp[n].detach().clone().requires_grad_() for n in names}
    kwargs.setdefault("backend", "triton")
    out, info = moe_plugin.fused_moe(leaves["x"], leaves["gate"], leaves["w_up"],
                                     leaves["w_down"], top_k, b_up=leaves.get("b_up"),
                                     b_down=leaves.get("b_down"), **kwargs)
    ins = [leaves[n] for n in names]
    if weights_grad:
        names.append("topk_weights")
        ins.append(info["topk_weights"])
    grads = torch.autograd.grad(_moe_loss(out, info, inp["gout"]), ins)
    return out.detach(), info, dict(zip(names, grads))


def run_reference_moe(inp: dict, top_k: int, **kwargs):
    """``reference.moe`` on float64 copies; same return as ``run_fused_moe``."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("backend", "recompute", "deterministic")}
    if kwargs.get("expert_bias") is not None:
        kwargs["expert_bias"] = kwargs["expert_bias"].to(torch.float64)
    names = grad_names(inp)
    leaves = {n: inp[n].detach().to(torch.float64).requires_grad_() for n in names}
    out, info = reference.moe(leaves["x"], leaves["gate"], leaves["w_up"], leaves["w_down"],
                              top_k, b_up=leaves.get("b_up"), b_down=leaves.get("b_down"),
                              **kwargs)
    loss = _moe_loss(out, info, inp["gout"])
    ins = [leaves[n] for n in names]
    grads = torch.autograd.grad(loss, ins, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(ins, grads)]
    return out.detach(), info, dict(zip(names, grads))


def check_moe(inp: dict, top_k: int, tol: float = FP32_TOL, **kwargs):
    """Fused vs float64 reference: routing decisions exactly; output, weights, losses and every
    gradient to ``tol``. Returns both results."""
    out, info, grads = run_fused_moe(inp, top_k, **kwargs)
    ref, rinfo, rgrads = run_reference_moe(inp, top_k, **kwargs)
    n, e = inp["x"].shape[0], inp["gate"].shape[0]
    assert info["topk_ids"].shape == (n, top_k)
    assert not info["topk_ids"].is_floating_point()
    assert torch.equal(info["topk_ids"].long().cpu(), rinfo["topk_ids"].cpu()), "topk_ids"
    assert info["tokens_per_expert"].shape == (e,)
    assert not info["tokens_per_expert"].is_floating_point()
    assert torch.equal(info["tokens_per_expert"].long().cpu(),
                       rinfo["tokens_per_expert"].long().cpu()), "tokens_per_expert"
    assert info["topk_weights"].dtype == torch.float32
    # the router runs in fp32 whatever the activation dtype: fp32 tolerance for its weights
    assert_close(info["topk_weights"], rinfo["topk_weights"], min(tol, FP32_TOL), "topk_weights")
    assert out.dtype == inp["x"].dtype
    assert_close(out, ref, tol, "out")
    for name in ("aux_loss", "z_loss"):
        assert info[name].dim() == 0, name
        assert_close(info[name], rinfo[name], min(tol, 1e-4), name)
    for name in grad_names(inp):
        assert_close(grads[name], rgrads[name], tol, f"grad {name}")
    return (out, info, grads), (ref, rinfo, rgrads)
