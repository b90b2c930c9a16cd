"""Plain-PyTorch implementation of every moe_plugin path: the oracle for tests.

Written for clarity, not speed (loops over experts, host synchronisation allowed). It runs
in whatever dtype it is given; tests call it on float64 copies of their inputs.

Semantics defined here and followed by the fused path
------------------------------------------------------
Routing (``route``), on fp32-or-wider logits ``[N, E]``:

* scores: ``softmax(logits)`` or ``sigmoid(logits)`` over the full expert dimension.
* selection scores: ``scores + expert_bias`` (the bias steers selection only; it never enters
  the weights or the losses).
* group-limited top-k (``num_groups``, ``group_topk``): experts are split into
  ``num_groups`` equal contiguous groups; a group's score is the sum of its top
  ``top_k // group_topk`` selection scores; the ``group_topk`` best groups are kept and the
  top-k is taken over their experts only (Megatron-Core's ``group_limited_topk``, applied to
  the selection scores).
* weights: the scores (not the selection scores) of the selected experts; with
  ``renormalize`` divided by their sum (+1e-20 for sigmoid, as Megatron-Core does); then
  multiplied by ``scaling_factor``. Softmax + renormalize equals Megatron-Core's default
  (softmax over the selected logits); softmax without renormalize equals its
  ``moe_router_pre_softmax``.
* ties between equal scores go to the lower expert index.

Capacity dropping (``capacity_drop``): capacity C = ceil(N·k/E · capacity_factor)
(Megatron-Core's ``get_capacity``). Each expert keeps at most C of the slots routed to it:
policy ``"probs"`` keeps the C slots with the largest routing weight (ties: lower slot index
first; a NaN weight ranks above every number, as in ``torch.sort``); ``"position"`` keeps the
first C slots in token order (slot t·k+j before t'·k+j' when
t < t', or t == t' and j < j'). A dropped slot gets id -1: it contributes exactly zero to the
output and its weight gets zero gradient.

Losses (Megatron-Core's definitions, coefficients applied):

* load-balance: ``coeff · E/(k·N²) · Σ_e P_e · f_e`` with ``P_e = Σ_t p[t, e]`` over the full
  score distribution ``p`` (softmax, or sigmoid normalised per token) and ``f_e`` the number of
  tokens whose plain top-k of ``p`` (no bias, no groups, before dropping) contains e.
  Differentiable through ``p``.
* z-loss: ``coeff · mean_t(logsumexp(logits[t])²)``.

Experts (``experts``): ``out[t] = Σ_j w[t, j] · (W_down[e] · act(W_up[e] · x[t] + b_up[e])
+ b_down[e])`` with ``e = ids[t, j]``; slots with id -1 are skipped; the biases are optional
(absent = 0). This is Megatron-Core's expert MLP with ``add_bias_linear`` (``SequentialMLP`` /
``TEGroupedMLP``: the routing probability multiplies ``FC2(x) + bias``).

Activations (``activation``; gated ones split the pre-activation ``[..., 2F]`` into the gate
part ``g`` (first F) and the up part ``u``): ``swiglu`` silu(g)·u, ``geglu`` gelu_tanh(g)·u,
``geglu_erf`` gelu(g)·u (exact, erf), ``swiglu_oai`` (see ``activation``); non-gated ``gelu``
(tanh approximation), ``gelu_erf`` (exact, erf: ``F.gelu``, Megatron-Core's default),
``relu2``, ``silu``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .config import check_activation, expert_capacity
from .kernels.codes import SWIGLU_OAI_ALPHA, SWIGLU_OAI_BETA, SWIGLU_OAI_LIMIT

__all__ = ["activation", "scores_of", "route", "capacity_drop", "load_balance_loss",
           "seq_load_balance_loss", "z_loss", "experts", "experts_quantized", "moe", "moe_layer"]


def activation(name: str, pre: torch.Tensor) -> torch.Tensor:
    """Applies activation ``name`` to the GEMM1 output ``pre`` [..., 2F] (gated) or [..., F]."""
    _, gated = check_activation(name)
    if gated:
        g, u = pre.chunk(2, dim=-1)
        if name == "swiglu":
            return F.silu(g) * u
        if name == "geglu":
            return F.gelu(g, approximate="tanh") * u
        if name == "geglu_erf":
            return F.gelu(g) * u
        # swiglu_oai
        g = g.clamp(max=SWIGLU_OAI_LIMIT)
        u = u.clamp(-SWIGLU_OAI_LIMIT, SWIGLU_OAI_LIMIT)
        return g * torch.sigmoid(SWIGLU_OAI_ALPHA * g) * (u + SWIGLU_OAI_BETA)
    if name == "gelu":
        return F.gelu(pre, approximate="tanh")
    if name == "gelu_erf":
        return F.gelu(pre)
    if name == "relu2":
        return F.relu(pre).square()
    return F.silu(pre)


_apply_activation = activation  # for functions whose ``activation`` argument is the name


def scores_of(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    if score_func == "softmax":
        return torch.softmax(logits, dim=-1)
    if score_func == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"score_func: expected 'softmax' or 'sigmoid', got {score_func!r}")


def _topk_lowest_index(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values per row; ties go to the lower index."""
    # A stable descending sort keeps equal values in index order.
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def route(logits: torch.Tensor, top_k: int, *, score_func: str = "softmax",
          renormalize: bool = True, expert_bias: Optional[torch.Tensor] = None,
          num_groups: Optional[int] = None, group_topk: Optional[int] = None,
          scaling_factor: float = 1.0):
    """Top-k routing. Returns ``(topk_ids int64 [N, k], topk_weights [N, k], scores [N, E])``."""
    n, e = logits.shape
    scores = scores_of(logits, score_func)
    sel = scores if expert_bias is None else scores + expert_bias.to(scores.dtype)
    if num_groups is not None:
        per_group = e // num_groups
        grouped = sel.reshape(n, num_groups, per_group)
        top_in_group = torch.sort(grouped, dim=-1, descending=True).values[..., :top_k // group_topk]
        group_scores = top_in_group.sum(-1)
        keep_groups = _topk_lowest_index(group_scores, group_topk)
        group_mask = torch.zeros(n, num_groups, dtype=torch.bool, device=logits.device)
        group_mask[torch.arange(n, device=logits.device)[:, None], keep_groups] = True
        expert_mask = group_mask[:, :, None].expand(n, num_groups, per_group).reshape(n, e)
        sel = sel.masked_fill(~expert_mask, float("-inf"))
    ids = _topk_lowest_index(sel, top_k)
    weights = scores.gather(1, ids)
    if renormalize:
        denom = weights.sum(-1, keepdim=True)
        if score_func == "sigmoid":
            denom = denom + 1e-20
        weights = weights / denom
    weights = weights * scaling_factor
    return ids, weights, scores


def capacity_drop(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                  capacity_factor: float, drop_policy: str = "probs") -> torch.Tensor:
    """Returns ``topk_ids`` with the slots over each expert's capacity set to -1."""
    n, k = topk_ids.shape
    cap = expert_capacity(n, k, num_experts, capacity_factor)
    flat_ids = topk_ids.reshape(-1).clone()
    flat_w = topk_weights.detach().reshape(-1)
    for ex in range(num_experts):
        slots = (flat_ids == ex).nonzero().flatten().tolist()  # token order
        if len(slots) <= cap:
            continue
        if drop_policy == "probs":  # NaN weights rank first, as in torch.sort(descending)
            slots.sort(key=lambda s: (not math.isnan(flat_w[s]), -float(flat_w[s]), s))
        elif drop_policy != "position":
            raise ValueError(f"drop_policy: expected 'probs' or 'position', got {drop_policy!r}")
        for s in slots[cap:]:
            flat_ids[s] = -1
    return flat_ids.reshape(n, k)


def _aux_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    if score_func == "softmax":
        return torch.softmax(logits, dim=-1)
    s = torch.sigmoid(logits)
    return s / (s.sum(-1, keepdim=True) + 1e-20)


def load_balance_loss(logits: torch.Tensor, top_k: int, score_func: str = "softmax",
                      coeff: float = 1.0, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Megatron-Core's switch load-balancing loss (see the module docstring).

    ``valid`` (bool [N], optional): only these tokens count (Megatron's ``padding_mask``,
    inverted): their scores, their top-k counts, and their number as ``N``."""
    n, e = logits.shape
    p = _aux_scores(logits, score_func)
    sel = torch.zeros_like(p).scatter_(1, _topk_lowest_index(p.detach(), top_k), 1.0)
    if valid is not None:
        p, sel = p * valid[:, None], sel * valid[:, None]
        n = sel.sum() / top_k  # a 0-dim tensor: no host synchronisation
    return coeff * e / (top_k * n * n) * (p.sum(0) * sel.sum(0)).sum()


def seq_load_balance_loss(logits: torch.Tensor, top_k: int, score_func: str, coeff: float,
                          num_seqs: int, seq_len: int, batch_first: bool = True,
                          valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sequence load-balance loss (Megatron-Core's ``seq_aux_loss``): the switch loss of
    each sequence on its own (``N`` = its length), averaged over the sequences.

    ``logits [N, E]`` hold ``num_seqs`` sequences of ``seq_len`` tokens, token ``t = b·S + s``
    when ``batch_first`` else ``t = s·B + b`` (Megatron's [s, b] layout). With ``valid``
    (bool [N]) only those tokens count, and ``N`` of every sequence is the mean number of
    valid tokens per sequence (Megatron-Core's choice)."""
    n, e = logits.shape
    p = _aux_scores(logits, score_func)
    ids = _topk_lowest_index(p.detach(), top_k)
    sel = torch.zeros_like(p).scatter_(1, ids, 1.0)
    length = seq_len
    if valid is not None:
        p, sel = p * valid[:, None], sel * valid[:, None]
        length = sel.sum() / (top_k * num_seqs)
    if batch_first:
        p, sel = p.view(num_seqs, seq_len, e), sel.view(num_seqs, seq_len, e)
        dim = 1
    else:
        p, sel = p.view(seq_len, num_seqs, e), sel.view(seq_len, num_seqs, e)
        dim = 0
    per_seq = (p.sum(dim) * sel.sum(dim)).sum(-1) * (e / (top_k * length * length))
    return coeff * per_seq.mean()


def z_loss(logits: torch.Tensor, coeff: float = 1.0,
           valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``coeff · mean(logsumexp(logits)²)``, over the ``valid`` tokens only when given (at
    least one in the denominator, as Megatron-Core)."""
    sq = torch.logsumexp(logits, dim=-1).square()
    if valid is None:
        return coeff * sq.mean()
    return coeff * (sq * valid).sum() / valid.sum().clamp(min=1)


def experts(hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
            w_up: torch.Tensor, w_down: torch.Tensor, activation_name: str = "swiglu",
            b_up: Optional[torch.Tensor] = None, b_down: Optional[torch.Tensor] = None):
    """Routing given: ``out[t] = Σ_j w[t, j] · expert_{ids[t, j]}(x[t])``; -1 slots skipped.

    ``x [N, D]``, ``w_up [E, 2F|F, D]``, ``w_down [E, D, F]``; optional biases ``b_up
    [E, 2F|F]`` (before the activation) and ``b_down [E, D]`` (before the routing weight):
    ``expert_e(x) = W_down[e] · act(W_up[e] · x + b_up[e]) + b_down[e]``."""
    n, d = hidden_states.shape
    out = torch.zeros(n, d, dtype=hidden_states.dtype, device=hidden_states.device)
    for ex in range(w_up.shape[0]):
        tok, slot = (topk_ids == ex).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        pre = hidden_states[tok] @ w_up[ex].t()
        if b_up is not None:
            pre = pre + b_up[ex]
        y = activation(activation_name, pre) @ w_down[ex].t()
        if b_down is not None:
            y = y + b_down[ex]
        out = out.index_add(0, tok, y * topk_weights[tok, slot, None].to(y.dtype))
    return out


def experts_quantized(hidden_states: torch.Tensor, topk_ids: torch.Tensor,
                      topk_weights: torch.Tensor, w_up_q: torch.Tensor, w_up_scale: torch.Tensor,
                      w_down_q: torch.Tensor, w_down_scale: torch.Tensor,
                      activation_name: str = "swiglu", quant_mode: str = "fp8",
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``experts`` with quantised operands, simulated: the tokens are quantised as the fused
    path does (``moe_plugin.quant``: fp8 per token and 128 columns, int8 per token), every
    operand dequantised to ``dtype`` and the GEMMs run there; h is quantised the same way
    between the GEMMs (from fp32 values)."""
    from . import quant as Q
    rows = Q.quantize_fp8_rows if quant_mode == "fp8" else Q.quantize_int8_rows
    x = Q.dequantize_rows(*rows(hidden_states), dtype=dtype)
    wu = Q.dequantize_weight(w_up_q, w_up_scale, dtype)
    wd = Q.dequantize_weight(w_down_q, w_down_scale, dtype)
    out = torch.zeros(x.shape, dtype=dtype, device=x.device)
    for ex in range(wu.shape[0]):
        tok, slot = (topk_ids == ex).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = activation(activation_name, x[tok] @ wu[ex].t())
        h = Q.dequantize_rows(*rows(h.float()), dtype=dtype)
        out = out.index_add(0, tok, (h @ wd[ex].t()) * topk_weights[tok, slot, None].to(dtype))
    return out


def moe(hidden_states: torch.Tensor, gate_weight: torch.Tensor, w_up: torch.Tensor,
        w_down: torch.Tensor, top_k: int, *, activation: str = "swiglu",
        score_func: str = "softmax", renormalize: bool = True,
        expert_bias: Optional[torch.Tensor] = None, num_groups: Optional[int] = None,
        group_topk: Optional[int] = None, scaling_factor: float = 1.0,
        capacity_factor: Optional[float] = None, drop_policy: str = "probs",
        aux_loss_coeff: float = 0.0, z_loss_coeff: float = 0.0,
        b_up: Optional[torch.Tensor] = None, b_down: Optional[torch.Tensor] = None):
    """Router + experts. Returns ``(out [N, D], info)`` like ``moe_plugin.fused_moe``
    (``b_up``/``b_down``: the expert biases of ``experts``).

    The router runs in the dtype of ``hidden_states`` when that is float64, else in fp32."""
    rdt = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
    logits = hidden_states.to(rdt) @ gate_weight.to(rdt).t()
    ids, weights, _ = route(logits, top_k, score_func=score_func, renormalize=renormalize,
                            expert_bias=expert_bias, num_groups=num_groups,
                            group_topk=group_topk, scaling_factor=scaling_factor)
    if capacity_factor is not None:
        ids = capacity_drop(ids, weights, w_up.shape[0], capacity_factor, drop_policy)
    out = experts(hidden_states, ids, weights, w_up, w_down, activation, b_up, b_down)
    e = w_up.shape[0]
    valid = ids[ids >= 0]
    info = {
        "aux_loss": (load_balance_loss(logits, top_k, score_func, aux_loss_coeff)
                     if aux_loss_coeff > 0 else logits.new_zeros(())),
        "z_loss": z_loss(logits, z_loss_coeff) if z_loss_coeff > 0 else logits.new_zeros(()),
        "tokens_per_expert": torch.bincount(valid, minlength=e),
        "topk_ids": ids,
        "topk_weights": weights,
        "logits": logits,
    }
    return out, info


def moe_layer(x: torch.Tensor, params: dict, top_k: int, *, activation: str = "swiglu",
              score_func: str = "softmax", renormalize: bool = True,
              num_groups: Optional[int] = None, group_topk: Optional[int] = None,
              scaling_factor: float = 1.0, apply_weight_to_input: bool = False,
              capacity_factor: Optional[float] = None, drop_policy: str = "probs",
              aux_loss_coeff: float = 0.0, aux_loss_type: str = "batch",
              z_loss_coeff: float = 0.0, batch_first: bool = True,
              router_noise: Optional[torch.Tensor] = None):
    """``moe_plugin.MoELayer`` in plain PyTorch. Returns ``(out [..., D], info)``.

    ``params``: ``w_gate [E, D]``, ``w_up``, ``w_down`` (on the latent width L when
    ``latent_down [L, D]`` / ``latent_up [D, L]`` are given), optional ``b_up [E, 2F|F]`` /
    ``b_down [E, D|L]`` (expert biases, as in ``experts``), ``expert_bias [E]``,
    ``shared_w_up [2Fs|Fs, D]``, ``shared_w_down [D, Fs]``, optional ``shared_b_up [2Fs|Fs]`` /
    ``shared_b_down [D]``, ``shared_gate [1, D]``.
    ``router_noise`` (same shape as the flattened input) multiplies the router input (jitter).

    * router input: ``x`` (times ``router_noise``); logits in fp32 (float64 for float64 input)
    * routed input: ``x``, or ``x · latent_downᵀ``; with ``apply_weight_to_input`` (top-1) the
      routed input is multiplied by the routing weight and the output is not
    * out = routed (· ``latent_upᵀ``) + shared, shared = ``W_down_s · act(W_up_s · x + b_up_s)
      + b_down_s``, times ``sigmoid(x · shared_gateᵀ)`` when a shared gate is given
    """
    shape = x.shape
    d = shape[-1]
    h = x.reshape(-1, d)
    rdt = torch.float64 if h.dtype == torch.float64 else torch.float32
    hr = h if router_noise is None else h * router_noise.to(h.dtype)
    logits = hr.to(rdt) @ params["w_gate"].to(rdt).t()
    e = params["w_gate"].shape[0]
    ids, weights, _ = route(logits, top_k, score_func=score_func, renormalize=renormalize,
                            expert_bias=params.get("expert_bias"), num_groups=num_groups,
                            group_topk=group_topk, scaling_factor=scaling_factor)
    if capacity_factor is not None:
        ids = capacity_drop(ids, weights, e, capacity_factor, drop_policy)
    xe = h if params.get("latent_down") is None else h @ params["latent_down"].t()
    if apply_weight_to_input:
        xe = xe * weights.to(xe.dtype)
        routed = experts(xe, ids, torch.ones_like(weights), params["w_up"], params["w_down"],
                         activation, params.get("b_up"), params.get("b_down"))
    else:
        routed = experts(xe, ids, weights, params["w_up"], params["w_down"], activation,
                         params.get("b_up"), params.get("b_down"))
    if params.get("latent_up") is not None:
        routed = routed @ params["latent_up"].t()
    out = routed
    if params.get("shared_w_up") is not None:
        shared = F.linear(h, params["shared_w_up"], params.get("shared_b_up"))
        shared = F.linear(_apply_activation(activation, shared), params["shared_w_down"],
                          params.get("shared_b_down"))
        if params.get("shared_gate") is not None:
            shared = shared * torch.sigmoid(h @ params["shared_gate"].t())
        out = out + shared
    zero = logits.new_zeros(())
    if aux_loss_coeff > 0 and h.shape[0] > 0:
        if aux_loss_type == "seq":
            b, s = (shape[0], shape[1]) if batch_first else (shape[1], shape[0])
            aux = seq_load_balance_loss(logits, top_k, score_func, aux_loss_coeff, b, s,
                                        batch_first)
        else:
            aux = load_balance_loss(logits, top_k, score_func, aux_loss_coeff)
    else:
        aux = zero
    z = z_loss(logits, z_loss_coeff) if z_loss_coeff > 0 and h.shape[0] > 0 else zero
    valid = ids[ids >= 0]
    info = {"aux_loss": aux, "z_loss": z, "tokens_per_expert": torch.bincount(valid, minlength=e),
            "topk_ids": ids, "topk_weights": weights}
    return out.reshape(shape), info
