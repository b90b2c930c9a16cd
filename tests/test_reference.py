"""Self-tests of the oracle ``moe_plugin.reference`` (plain torch, fast).

Routing, capacity dropping and the losses are compared with Megatron-Core's own functions
where megatron-core is installed; the experts are checked with ``torch.autograd.gradcheck``.
"""
import math

import pytest
import torch

from conftest import ACTIVATIONS, GATED
from moe_plugin import reference

try:
    from megatron.core.transformer.moe import moe_utils as mcore
except Exception:  # noqa: BLE001 - any import problem means: no Megatron-Core to compare with
    mcore = None

needs_mcore = pytest.mark.skipif(mcore is None, reason="megatron-core is not installed")


def _logits(seed, n=64, e=16, scale=2.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, e, generator=gen) * scale).to(dtype)


def _dense(ids, values, e):
    """[N, k] ids (-1 = none) and values -> [N, E]."""
    n = ids.shape[0]
    out = torch.zeros(n, e + 1, dtype=values.dtype)
    out.scatter_(1, torch.where(ids >= 0, ids, e), values)
    return out[:, :e]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ----------------------------------------------------------------------------------------------
# losses vs Megatron-Core

@needs_mcore
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_aux_loss_matches_megatron(score_func, top_k, seed):
    n, e, coeff = 64, 16, 0.01
    logits = _logits(seed, n, e).requires_grad_()
    ours = reference.load_balance_loss(logits, top_k, score_func, coeff)
    (g_ours,) = torch.autograd.grad(ours, logits)

    logits_m = logits.detach().clone().requires_grad_()
    routing_map, scores = mcore.compute_routing_scores_for_aux_loss(logits_m, top_k, score_func)
    theirs = mcore.switch_load_balancing_loss_func(scores, routing_map.sum(0), n, top_k, e, coeff)
    (g_theirs,) = torch.autograd.grad(theirs, logits_m)

    assert ours.dim() == 0 and ours > 0
    assert abs(ours.item() - theirs.item()) <= 1e-6 * abs(theirs.item())
    assert g_ours.norm() > 0
    assert _rel(g_ours, g_theirs) <= 1e-6


@needs_mcore
def test_z_loss_matches_megatron(seed):
    logits = _logits(seed, 48, 12).requires_grad_()
    ours = reference.z_loss(logits, 0.001)
    theirs = mcore.z_loss_func(logits, 0.001)
    assert abs(ours.item() - theirs.item()) <= 1e-6 * abs(theirs.item())
    g_ours, = torch.autograd.grad(ours, logits)
    g_theirs, = torch.autograd.grad(theirs, logits)
    assert _rel(g_ours, g_theirs) <= 1e-6


def test_aux_loss_is_differentiable(seed):
    """The load-balance loss has a gradient through the score distribution P (also through the
    full ``reference.moe``, to the gate weight)."""
    logits = _logits(seed, 32, 8).double().requires_grad_()
    for score_func in ("softmax", "sigmoid"):
        loss = reference.load_balance_loss(logits, 2, score_func, 0.1)
        (g,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(g).all() and g.norm() > 0
        # finite-difference check of the (piecewise smooth) loss at this point
        assert torch.autograd.gradcheck(
            lambda lg: reference.load_balance_loss(lg, 2, score_func, 0.1), (logits,))

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 8, generator=gen, dtype=torch.float64)
    gate = torch.randn(4, 8, generator=gen, dtype=torch.float64).requires_grad_()
    w_up = torch.randn(4, 6, 8, generator=gen, dtype=torch.float64)
    w_down = torch.randn(4, 8, 3, generator=gen, dtype=torch.float64)
    _, info = reference.moe(x, gate, w_up, w_down, 2, aux_loss_coeff=0.1)
    (g,) = torch.autograd.grad(info["aux_loss"], gate)
    assert g.norm() > 0


# ----------------------------------------------------------------------------------------------
# routing vs Megatron-Core's topk_routing_with_score_function

# name: (reference.route kwargs, Megatron kwargs)
ROUTING = {
    "softmax_renorm": (dict(score_func="softmax", renormalize=True),
                       dict(score_function="softmax", use_pre_softmax=False)),
    "softmax_pre_softmax": (dict(score_func="softmax", renormalize=False),
                            dict(score_function="softmax", use_pre_softmax=True)),
    "softmax_renorm_scaled": (dict(score_func="softmax", renormalize=True, scaling_factor=2.5),
                              dict(score_function="softmax", scaling_factor=2.5)),
    "sigmoid": (dict(score_func="sigmoid", renormalize=True),
                dict(score_function="sigmoid")),
    "sigmoid_bias": (dict(score_func="sigmoid", renormalize=True, expert_bias="bias"),
                     dict(score_function="sigmoid", expert_bias="bias")),
    # Megatron-Core groups on whatever it takes the top-k of: the softmax scores with
    # pre-softmax (our selection scores), the raw logits without; so only pre-softmax compares.
    "groups_pre_softmax": (dict(score_func="softmax", renormalize=False, num_groups=4,
                                group_topk=2),
                           dict(score_function="softmax", use_pre_softmax=True, num_groups=4,
                                group_topk=2)),
    "groups_sigmoid_bias_scaled": (dict(score_func="sigmoid", renormalize=True, num_groups=4,
                                        group_topk=2, expert_bias="bias", scaling_factor=2.5),
                                   dict(score_function="sigmoid", num_groups=4, group_topk=2,
                                        expert_bias="bias", scaling_factor=2.5)),
}


@needs_mcore
@pytest.mark.parametrize("case", ROUTING)
@pytest.mark.parametrize("top_k", [2, 4])
def test_route_matches_megatron(case, top_k, seed):
    n, e = 64, 16
    logits = _logits(seed, n, e)
    bias = torch.randn(e, generator=torch.Generator().manual_seed(seed + 1)) * 0.1
    ours_kw, theirs_kw = (dict(kw) for kw in ROUTING[case])
    for kw in (ours_kw, theirs_kw):
        if kw.get("expert_bias") == "bias":
            kw["expert_bias"] = bias
    ids, weights, scores = reference.route(logits, top_k, **ours_kw)
    probs, routing_map = mcore.topk_routing_with_score_function(logits, top_k, **theirs_kw)

    assert ids.dtype == torch.int64 and ids.shape == (n, top_k)
    dense_map = _dense(ids, torch.ones_like(weights), e).bool()
    assert torch.equal(dense_map, routing_map)
    assert _rel(_dense(ids, weights, e), probs) <= 1e-6
    # ids come in descending order of the selection scores
    sel = scores + (bias if "expert_bias" in ours_kw else 0)
    picked = sel.gather(1, ids)
    assert (picked[:, :-1] >= picked[:, 1:]).all()
    if "expert_bias" in ours_kw:   # the bias steers selection only
        expected = scores.gather(1, ids)
        expected = expected / (expected.sum(-1, keepdim=True) + 1e-20)
        expected = expected * ours_kw.get("scaling_factor", 1.0)
        assert _rel(weights, expected) <= 1e-6


@needs_mcore
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_capacity_drop_probs_matches_megatron(capacity_factor, seed):
    n, e, k = 64, 8, 2
    logits = _logits(seed, n, e)
    ids, weights, _ = reference.route(logits, k)
    dropped = reference.capacity_drop(ids, weights, e, capacity_factor, "probs")
    probs = _dense(ids, weights, e)
    final_probs, final_map = mcore.apply_router_token_dropping(
        probs, probs > 0, k, capacity_factor, "probs")
    ours_map = _dense(dropped, torch.ones_like(weights), e).bool()
    assert torch.equal(ours_map, final_map)
    if capacity_factor < 1:
        assert (dropped == -1).any()


# ----------------------------------------------------------------------------------------------
# reference semantics without Megatron

def test_route_ties_go_to_lower_index():
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0]])
    ids, weights, _ = reference.route(logits, 2)
    assert ids.tolist() == [[1, 2], [0, 1]]
    assert torch.allclose(weights, torch.full((2, 2), 0.5))


def test_route_softmax_renormalised_equals_softmax_of_selected_logits(seed):
    logits = _logits(seed, 16, 8).double()
    ids, weights, _ = reference.route(logits, 3)
    assert _rel(weights, torch.softmax(logits.gather(1, ids), dim=-1)) <= 1e-12
    ids2, weights2, _ = reference.route(logits, 3, renormalize=False)
    assert torch.equal(ids, ids2)
    assert _rel(weights2, torch.softmax(logits, -1).gather(1, ids)) <= 1e-12


def test_route_group_limited_stays_in_groups(seed):
    logits = _logits(seed, 64, 16).double()
    ids, _, _ = reference.route(logits, 4, num_groups=4, group_topk=2)
    plain, _, _ = reference.route(logits, 4)
    groups = ids // 4
    assert all(len(set(row.tolist())) <= 2 for row in groups)
    assert not torch.equal(ids, plain)


def test_capacity_drop_position_keeps_first_slots_in_token_order():
    ids = torch.tensor([[0, 1], [0, 1], [1, 0], [-1, 0], [0, 2]])
    weights = torch.tensor([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.5, 0.5], [0.9, 0.1]])
    # capacity ceil(5*2/3*0.5) = 2
    got = reference.capacity_drop(ids, weights, 3, 0.5, "position")
    # expert 0 keeps slots 0 and 2 of its five, expert 1 slots 1 and 3 of its three
    assert got.tolist() == [[0, 1], [0, 1], [-1, -1], [-1, -1], [-1, 2]]
    got = reference.capacity_drop(ids, weights, 3, 0.5, "probs")
    # expert 0 keeps its largest weights 0.9 (slot 8) and 0.7 (slot 5); expert 1 0.9 and 0.8
    assert got.tolist() == [[-1, 1], [-1, 1], [-1, 0], [-1, -1], [0, 2]]


# ----------------------------------------------------------------------------------------------
# experts

@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_experts_gradcheck(activation, seed):
    gen = torch.Generator().manual_seed(seed)
    n, d, f, e = 5, 4, 3, 3
    rows = 2 * f if GATED[activation] else f
    scale = 4.0 if activation == "swiglu_oai" else 1.0   # reach the clamp at +-7
    x = (torch.randn(n, d, generator=gen, dtype=torch.float64) * scale).requires_grad_()
    w_up = (torch.randn(e, rows, d, generator=gen, dtype=torch.float64)).requires_grad_()
    w_down = torch.randn(e, d, f, generator=gen, dtype=torch.float64).requires_grad_()
    ids = torch.tensor([[0, 2], [1, -1], [2, 0], [-1, -1], [1, 1]])
    w = torch.rand(n, 2, generator=gen, dtype=torch.float64).requires_grad_()
    fn = lambda x_, w_, u_, d_: reference.experts(x_, ids, w_, u_, d_, activation)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, w_up, w_down))
    out = fn(x, w, w_up, w_down)
    assert (out[3] == 0).all() and out.abs().sum() > 0


def test_activations_definitions():
    g = torch.linspace(-9, 9, 37, dtype=torch.float64)
    u = torch.linspace(8, -8, 37, dtype=torch.float64)
    pre = torch.cat([g, u])[None]
    torch.testing.assert_close(reference.activation("swiglu", pre)[0], g * torch.sigmoid(g) * u)
    gelu_tanh = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
    torch.testing.assert_close(reference.activation("geglu", pre)[0], gelu_tanh * u)
    gc, uc = g.clamp(max=7), u.clamp(-7, 7)
    torch.testing.assert_close(reference.activation("swiglu_oai", pre)[0],
                               gc * torch.sigmoid(1.702 * gc) * (uc + 1))
    torch.testing.assert_close(reference.activation("gelu", g[None])[0], gelu_tanh)
    torch.testing.assert_close(reference.activation("relu2", g[None])[0], g.clamp(min=0) ** 2)
    torch.testing.assert_close(reference.activation("silu", g[None])[0], g * torch.sigmoid(g))


def test_erf_activations_are_torch_gelu():
    """``gelu_erf`` is ``F.gelu`` (exact, Megatron-Core's default ``activation_func``) and
    ``geglu_erf`` is ``F.gelu(g) · u`` (Megatron's gated ``glu`` with ``F.gelu``), bitwise;
    both equal ``x · Φ(x)`` written out with erf, and differ from the tanh approximations."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=gen, dtype=torch.float64) * 3
    assert torch.equal(reference.activation("gelu_erf", x), torch.nn.functional.gelu(x))
    g, u = x.chunk(2, dim=-1)
    assert torch.equal(reference.activation("geglu_erf", x), torch.nn.functional.gelu(g) * u)
    phi = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    torch.testing.assert_close(reference.activation("gelu_erf", x), x * phi)
    assert (reference.activation("gelu_erf", x) - reference.activation("gelu", x)).abs().max() \
        > 1e-4


class _BiasedExpert(torch.nn.Module):
    """One expert as Megatron-Core's MLP with ``add_bias_linear``: ``linear_fc2(act(
    linear_fc1(x)))``, both ``nn.Linear`` with bias; gated: fc1's output chunked [gate, up]."""

    def __init__(self, d, f, gated):
        super().__init__()
        self.gated = gated
        self.linear_fc1 = torch.nn.Linear(d, 2 * f if gated else f, dtype=torch.float64)
        self.linear_fc2 = torch.nn.Linear(f, d, dtype=torch.float64)

    def forward(self, x):
        h = self.linear_fc1(x)
        if self.gated:
            g, u = torch.chunk(h, 2, dim=-1)
            h = torch.nn.functional.gelu(g) * u
        else:
            h = torch.nn.functional.gelu(h)
        return self.linear_fc2(h)


@pytest.mark.parametrize("activation", ["gelu_erf", "geglu_erf"])
def test_expert_biases_are_a_per_expert_linear_loop(activation, seed):
    """``reference.experts`` with ``b_up``/``b_down`` is Megatron-Core's expert computation:
    ``out[t] = Σ_j p[t, j] · FC2(act(FC1(x[t])))`` with FC1/FC2 ``nn.Linear`` layers with
    bias (the routing probability multiplies FC2's output *including* its bias), -1 slots
    skipped. Outputs and gradients of x, the routing weights, the weights and the biases."""
    torch.manual_seed(seed)
    n, d, f, e = 9, 6, 4, 3
    gated = GATED[activation]
    experts = [_BiasedExpert(d, f, gated) for _ in range(e)]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64).requires_grad_()
    probs = torch.rand(n, 2, generator=gen, dtype=torch.float64).requires_grad_()
    ids = torch.tensor([[0, 2], [1, -1], [2, 0], [-1, -1], [1, 2], [0, 1], [2, -1], [0, 2],
                        [1, 0]])
    rows = []
    for t in range(n):
        row = torch.zeros(d, dtype=torch.float64)
        for j in range(2):
            if ids[t, j] >= 0:
                row = row + probs[t, j] * experts[ids[t, j]](x[t])
        rows.append(row)
    loop = torch.stack(rows)
    w_up = torch.stack([m.linear_fc1.weight for m in experts])
    b_up = torch.stack([m.linear_fc1.bias for m in experts])
    w_down = torch.stack([m.linear_fc2.weight for m in experts])
    b_down = torch.stack([m.linear_fc2.bias for m in experts])
    out = reference.experts(x, ids, probs, w_up, w_down, activation, b_up, b_down)
    torch.testing.assert_close(out, loop)
    gout = torch.randn(n, d, generator=gen, dtype=torch.float64)
    params = [p for m in experts for p in (m.linear_fc1.weight, m.linear_fc1.bias,
                                           m.linear_fc2.weight, m.linear_fc2.bias)]
    g_loop = torch.autograd.grad(loop, [x, probs] + params, gout)
    g_ref = torch.autograd.grad(out, [x, probs] + params, gout)
    for a, b in zip(g_ref, g_loop):
        torch.testing.assert_close(a, b)
    assert (g_ref[1][ids < 0] == 0).all()
    # a bias really enters: the routing weights' gradient includes FC2's bias
    plain = reference.experts(x, ids, probs, w_up, w_down, activation, b_up, None)
    (g_plain,) = torch.autograd.grad(plain, probs, gout)
    assert (g_plain - g_ref[1]).abs().max() > 1e-3


@pytest.mark.parametrize("activation", ["swiglu", "gelu_erf"])
def test_experts_with_biases_gradcheck(activation, seed):
    gen = torch.Generator().manual_seed(seed)
    n, d, f, e = 5, 4, 3, 3
    rows = 2 * f if GATED[activation] else f

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()
    x, w_up, w_down, b_up, b_down = rnd(n, d), rnd(e, rows, d), rnd(e, d, f), rnd(e, rows), \
        rnd(e, d)
    w = torch.rand(n, 2, generator=gen, dtype=torch.float64).requires_grad_()
    ids = torch.tensor([[0, 2], [1, -1], [2, 0], [-1, -1], [0, 0]])   # -1 slots, a token without
    def fn(x_, w_, u_, d_, bu_, bd_):
        return reference.experts(x_, ids, w_, u_, d_, activation, bu_, bd_)
    assert torch.autograd.gradcheck(fn, (x, w, w_up, w_down, b_up, b_down))
    assert (fn(x, w, w_up, w_down, b_up, b_down)[3] == 0).all()
