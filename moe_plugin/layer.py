"""``MoELayer``: the nn.Module a PyTorch user drops into a model.

Router + routed experts (the fused path of ``moe_plugin.functional``) + optional shared
experts (on a side CUDA stream), latent projection, aux-loss-free balancing and recompute.
``moe_plugin.reference.moe_layer`` is its plain-PyTorch twin (the test oracle).
"""
from __future__ import annotations

import re
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import reference
from .config import (FLOAT_DTYPES, check_activation, check_choice,
                     check_expert_biases, check_nonneg_float, check_positive_int,
                     check_router_jitter, check_routing_args, check_tensor, TRAIN_QUANTS)
from .functional import (check_ep_group, route_tokens, routed_experts, routed_layer,
                         router_experts_fused, select_triton)

AUX_LOSS_TYPES = ("batch", "seq")
_SIDE_STREAMS: dict = {}  # device -> side stream for the shared experts (shared by all layers)
EXPERT_FORMATS = ("mixtral", "qwen3", "megatron")
BIAS_NAMES = ("b_up", "b_down", "shared_b_up", "shared_b_down")


class MoELayer(nn.Module):
    """Mixture-of-Experts feed-forward layer.

    Args:
        d_model: token width D.
        ffn_dim: per-expert intermediate size F (gated activations hold 2F rows in ``w_up``).
        num_experts: routed experts E.
        top_k: experts per token.
        activation: gated ``swiglu``, ``geglu`` (tanh gelu), ``geglu_erf`` (exact gelu),
            ``swiglu_oai``; non-gated ``gelu`` (tanh), ``gelu_erf`` (exact, ``F.gelu``:
            Megatron-Core's default), ``relu2``, ``silu``.
        bias: experts with biases (Megatron-Core's ``add_bias_linear``): parameters ``b_up``
            ``[E, 2F|F]`` (added before the activation) and ``b_down`` ``[E, D]`` (added before
            the routing weight; ``[E, latent_dim]`` with a latent projection), under expert
            parallelism the local experts' rows; the shared experts get ``shared_b_up`` and
            ``shared_b_down`` too. Zero-initialised (as Megatron-Core does), or by
            ``init_method`` when one is given. Not with ``quant``.
        score_func, renormalize, num_groups, group_topk, scaling_factor, capacity_factor,
        drop_policy: routing, as in ``moe_plugin.fused_moe``.
        apply_weight_to_input: top-1 only: multiply the routed expert's *input* by the routing
            weight instead of its output (Llama-4 style).
        router_jitter: multiply the router input by U(1-eps, 1+eps) noise in training mode.
        aux_loss_coeff, aux_loss_type: load-balance loss, ``"batch"`` (over all tokens of the
            call) or ``"seq"`` (per sequence, averaged; needs a 3-D input).
        z_loss_coeff: router z-loss.
        enable_expert_bias: aux-loss-free balancing: an ``expert_bias`` buffer used for
            selection only, updated by ``update_expert_bias(rate)``.
        num_shared_experts, shared_ffn_dim: always-on shared experts (merged into one MLP of
            width ``num_shared_experts · shared_ffn_dim``, default ``shared_ffn_dim = ffn_dim``).
        shared_expert_gate: scale the shared output by ``sigmoid(x · shared_gateᵀ)``
            (Qwen2-MoE style).
        shared_expert_overlap: on CUDA, compute the shared experts on a side stream while the
            routed path runs.
        latent_dim: route tokens through a ``D → latent_dim`` projection before the routed
            experts and back after (the experts then work on width ``latent_dim``).
        recompute: save only what the routed path needs to recompute GEMM1 + activation.
        batch_first: a 3-D input is ``[B, S, D]`` (default) or ``[S, B, D]`` (Megatron).
        init_std, init_method: weights are ``init_method(tensor)`` if given, else N(0, init_std).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see ``fused_experts``).
        ep_group: expert parallelism: the layer holds only this rank's E/P experts (rank r:
            experts [r·E/P, (r+1)·E/P)); tokens travel by all-to-all (see ``fused_moe``).
            ``shard_experts(group)`` does the same for a layer built with all experts.
        ep_backend, max_tokens_per_rank: as in ``fused_moe``.
        quant: ``None``, ``"fp8_block"`` or ``"fp8_block_wgrad"``: the routed experts' GEMMs
            in FP8 with block scales, the weight gradients in ``dtype`` or in FP8 too (see
            ``fused_experts``; the shared experts and the router stay in ``dtype``). The
            weights are quantised in every forward unless the layer's ``quant_weight_cache``
            holds a ``quant.WeightCache`` (``quant.cache_quantized_weights(model, optimizer)``
            sets one, refreshed after each optimizer step).
        dtype, device: of the parameters.

    ``forward(x [..., D]) -> (out [..., D], info)`` with ``info``: ``aux_loss``, ``z_loss``
    (coefficients applied, differentiable), ``tokens_per_expert`` (after dropping),
    ``topk_ids``, ``topk_weights``.
    """

    def __init__(self, d_model: int, ffn_dim: int, num_experts: int, top_k: int = 2, *,
                 activation: str = "swiglu", score_func: str = "softmax",
                 renormalize: bool = True, num_groups: Optional[int] = None,
                 group_topk: Optional[int] = None, scaling_factor: float = 1.0,
                 apply_weight_to_input: bool = False, router_jitter: float = 0.0,
                 capacity_factor: Optional[float] = None, drop_policy: str = "probs",
                 aux_loss_coeff: float = 0.0, aux_loss_type: str = "batch",
                 z_loss_coeff: float = 0.0, enable_expert_bias: bool = False,
                 num_shared_experts: int = 0, shared_ffn_dim: Optional[int] = None,
                 shared_expert_gate: bool = False, shared_expert_overlap: bool = True,
                 latent_dim: Optional[int] = None, recompute: bool = False,
                 batch_first: bool = True, init_std: float = 0.02,
                 init_method: Optional[Callable[[torch.Tensor], None]] = None,
                 backend: str = "auto", ep_group=None, ep_backend: str = "nccl",
                 max_tokens_per_rank: Optional[int] = None, quant: Optional[str] = None,
                 bias: bool = False, dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("ffn_dim", ffn_dim)
        check_positive_int("num_experts", num_experts)
        _, gated = check_activation(activation)
        check_routing_args(num_experts, top_k, score_func, renormalize, None, num_groups,
                           group_topk, scaling_factor, capacity_factor, drop_policy,
                           aux_loss_coeff, z_loss_coeff)
        check_choice("aux_loss_type", aux_loss_type, AUX_LOSS_TYPES)
        check_choice("backend", backend, ("auto", "triton", "torch"))
        check_choice("quant", quant, TRAIN_QUANTS)
        if apply_weight_to_input and top_k != 1:
            raise ValueError(f"apply_weight_to_input: needs top_k=1 (the weight scales the "
                             f"one expert's input), got top_k={top_k}")
        check_router_jitter(router_jitter)
        if isinstance(num_shared_experts, bool) or not isinstance(num_shared_experts, int) \
                or num_shared_experts < 0:
            raise ValueError(f"num_shared_experts: expected an int >= 0, "
                             f"got {num_shared_experts!r}")
        check_positive_int("shared_ffn_dim", shared_ffn_dim, allow_none=True)
        if shared_expert_gate and num_shared_experts == 0:
            raise ValueError("shared_expert_gate: needs num_shared_experts >= 1")
        check_positive_int("latent_dim", latent_dim, allow_none=True)
        check_nonneg_float("init_std", init_std)
        if init_method is not None and not callable(init_method):
            raise TypeError(f"init_method: expected a callable(tensor), "
                            f"got {type(init_method).__name__}")
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected a floating dtype, got {dtype}")
        for name, flag in (("renormalize", renormalize), ("recompute", recompute),
                           ("enable_expert_bias", enable_expert_bias),
                           ("shared_expert_overlap", shared_expert_overlap),
                           ("batch_first", batch_first),
                           ("apply_weight_to_input", apply_weight_to_input), ("bias", bias)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
        if bias and quant is not None:
            raise ValueError(f"bias: expert biases are not supported with quant={quant!r} "
                             f"(FP8 expert GEMMs)")

        self.d_model, self.ffn_dim, self.num_experts, self.top_k = d_model, ffn_dim, num_experts, top_k
        self.activation, self.gated = activation, gated
        self.score_func, self.renormalize = score_func, renormalize
        self.num_groups, self.group_topk, self.scaling_factor = num_groups, group_topk, scaling_factor
        self.apply_weight_to_input, self.router_jitter = apply_weight_to_input, router_jitter
        self.capacity_factor, self.drop_policy = capacity_factor, drop_policy
        self.aux_loss_coeff, self.aux_loss_type = aux_loss_coeff, aux_loss_type
        self.z_loss_coeff = z_loss_coeff
        self.enable_expert_bias = enable_expert_bias
        self.num_shared_experts = num_shared_experts
        self.shared_ffn_dim = (shared_ffn_dim or ffn_dim) if num_shared_experts else 0
        self.shared_expert_overlap = shared_expert_overlap
        self.latent_dim = latent_dim
        self.recompute, self.batch_first, self.backend = recompute, batch_first, backend
        self.quant = quant
        self.bias = bias
        # FP8: a quant.WeightCache shared with other layers, refreshed by whatever writes the
        # weights (quant.cache_quantized_weights); None quantises the weights in every forward
        self.quant_weight_cache = None
        self._init_std, self._init_method = init_std, init_method
        self.ep_group, self.ep_backend = None, ep_backend
        self.max_tokens_per_rank = max_tokens_per_rank
        ep_size = check_ep_group(ep_group, num_experts, ep_backend, max_tokens_per_rank)
        self.ep_group = ep_group
        num_local = num_experts // ep_size

        fk = dict(dtype=dtype, device=device)
        width = latent_dim or d_model
        up_rows = 2 * ffn_dim if gated else ffn_dim
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, **fk))
        self.w_up = nn.Parameter(torch.empty(num_local, up_rows, width, **fk))
        self.w_down = nn.Parameter(torch.empty(num_local, width, ffn_dim, **fk))
        if bias:
            self.b_up = nn.Parameter(torch.empty(num_local, up_rows, **fk))
            self.b_down = nn.Parameter(torch.empty(num_local, width, **fk))
        else:
            self.b_up = self.b_down = None
        for p in (self.w_up, self.w_down, self.b_up, self.b_down):
            if p is not None:
                p.moe_expert = True  # expert-sharded under expert parallelism
        if latent_dim:
            self.latent_down = nn.Parameter(torch.empty(latent_dim, d_model, **fk))
            self.latent_up = nn.Parameter(torch.empty(d_model, latent_dim, **fk))
        else:
            self.latent_down = self.latent_up = None
        if num_shared_experts:
            fs = num_shared_experts * self.shared_ffn_dim
            self.shared_w_up = nn.Parameter(torch.empty(2 * fs if gated else fs, d_model, **fk))
            self.shared_w_down = nn.Parameter(torch.empty(d_model, fs, **fk))
        else:
            self.shared_w_up = self.shared_w_down = None
        if num_shared_experts and bias:
            self.shared_b_up = nn.Parameter(torch.empty(self.shared_w_up.shape[0], **fk))
            self.shared_b_down = nn.Parameter(torch.empty(d_model, **fk))
        else:
            self.shared_b_up = self.shared_b_down = None
        self.shared_gate = (nn.Parameter(torch.empty(1, d_model, **fk)) if shared_expert_gate
                            else None)
        if enable_expert_bias:
            self.register_buffer("expert_bias",
                                 torch.zeros(num_experts, dtype=torch.float32, device=device))
            self.register_buffer("local_tokens_per_expert",
                                 torch.zeros(num_experts, dtype=torch.float32, device=device),
                                 persistent=False)
        else:
            self.expert_bias = self.local_tokens_per_expert = None
        self.reset_parameters()

    # ------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Weights ``init_method(p)`` or N(0, init_std); biases (``bias=True``) zero, or
        ``init_method(p)`` when one is given."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if self._init_method is not None:
                    self._init_method(p)
                elif name in BIAS_NAMES:
                    p.zero_()
                else:
                    p.normal_(0.0, self._init_std)

    def _apply(self, fn, recurse=True):
        # The balancing state stays fp32 through .to(dtype) / .half() / .bfloat16() (as
        # Megatron-Core keeps its expert bias fp32): in bf16 a load above 256 is rounded and a
        # bias step of 1e-3 on a bias of 0.5 rounds away. Device moves still apply.
        fp32 = {n: b for n, b in self._buffers.items()
                if n in ("expert_bias", "local_tokens_per_expert") and b is not None}
        super()._apply(fn, recurse)
        for name, old in fp32.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:
                self._buffers[name] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        s = (f"d_model={self.d_model}, ffn_dim={self.ffn_dim}, num_experts={self.num_experts}, "
             f"top_k={self.top_k}, activation={self.activation!r}, "
             f"score_func={self.score_func!r}")
        if self.num_shared_experts:
            s += f", num_shared_experts={self.num_shared_experts}"
        if self.latent_dim:
            s += f", latent_dim={self.latent_dim}"
        if self.bias:
            s += ", bias=True"
        return s

    def routing_kwargs(self) -> dict:
        """The routing / loss options, as keyword arguments of ``reference.moe_layer``."""
        return dict(activation=self.activation, score_func=self.score_func,
                    renormalize=self.renormalize, num_groups=self.num_groups,
                    group_topk=self.group_topk, scaling_factor=self.scaling_factor,
                    apply_weight_to_input=self.apply_weight_to_input,
                    capacity_factor=self.capacity_factor, drop_policy=self.drop_policy,
                    aux_loss_coeff=self.aux_loss_coeff, aux_loss_type=self.aux_loss_type,
                    z_loss_coeff=self.z_loss_coeff, batch_first=self.batch_first)

    # ------------------------------------------------------------------------------------
    def _check_input(self, x) -> None:
        check_tensor("x", x, dtypes=FLOAT_DTYPES, device=self.w_gate.device)
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected shape [..., {self.d_model}] (d_model), "
                             f"got {tuple(x.shape)}")
        if x.dtype != self.w_gate.dtype:
            raise TypeError(f"x: expected dtype {self.w_gate.dtype} (the layer's parameters), "
                            f"got {x.dtype}")
        if self.aux_loss_type == "seq" and self.aux_loss_coeff > 0 and x.dim() != 3:
            raise ValueError(f"x: aux_loss_type='seq' needs a 3-D input "
                             f"({'[B, S, D]' if self.batch_first else '[S, B, D]'}), "
                             f"got shape {tuple(x.shape)}")

    def _shared(self, h: torch.Tensor) -> torch.Tensor:
        a = reference.activation(self.activation, F.linear(h, self.shared_w_up, self.shared_b_up))
        out = F.linear(a, self.shared_w_down, self.shared_b_down)
        if self.shared_gate is not None:
            out = out * torch.sigmoid(F.linear(h, self.shared_gate))
        return out

    @staticmethod
    def _side_stream(device) -> torch.cuda.Stream:
        if device not in _SIDE_STREAMS:
            _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
        return _SIDE_STREAMS[device]

    def forward(self, x: torch.Tensor):
        self._check_input(x)
        shape = x.shape
        seq_shape = None
        if self.aux_loss_type == "seq" and x.dim() == 3:
            b, s = (shape[0], shape[1]) if self.batch_first else (shape[1], shape[0])
            seq_shape = (b, s, self.batch_first)
        out, info = moe_forward(
            self, x.reshape(-1, self.d_model), w_gate=self.w_gate, w_up=self.w_up,
            w_down=self.w_down, b_up=self.b_up, b_down=self.b_down,
            expert_bias=self.expert_bias, latent_down=self.latent_down, latent_up=self.latent_up,
            shared_fn=self._shared if self.shared_w_up is not None else None,
            load_counter=self.local_tokens_per_expert, seq_shape=seq_shape,
            weight_cache=self.quant_weight_cache)
        return out.reshape(shape), info

    # ------------------------------------------------------------------------------------
    @property
    def num_local_experts(self) -> int:
        return self.w_up.shape[0]

    @property
    def local_expert_offset(self) -> int:
        """Global index of this rank's first expert (0 without expert parallelism)."""
        if self.ep_group is None:
            return 0
        return dist.get_rank(self.ep_group) * self.num_local_experts

    @torch.no_grad()
    def shard_experts(self, ep_group) -> "MoELayer":
        """Keeps only this rank's experts [r·E/P, (r+1)·E/P) of a layer that holds all E, and
        routes through ``ep_group`` from now on. Returns ``self``."""
        if self.ep_group is not None:
            raise ValueError("ep_group: the layer is already sharded")
        size = check_ep_group(ep_group, self.num_experts, self.ep_backend, self.max_tokens_per_rank)
        num_local = self.num_experts // size
        first = dist.get_rank(ep_group) * num_local
        for name in ("w_up", "w_down", "b_up", "b_down"):
            old = getattr(self, name)
            if old is None:
                continue
            new = nn.Parameter(old.detach()[first:first + num_local].clone(),
                               requires_grad=old.requires_grad)
            new.moe_expert = True
            setattr(self, name, new)
        self.ep_group = ep_group
        return self

    # ------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_expert_bias(self, rate: float, group=None) -> None:
        """DeepSeek-V3's aux-loss-free update from the loads seen since the last update:
        ``bias_e += rate · sign(mean_load − load_e)``; the loads are all-reduced over
        ``group`` (the data-parallel group) when one is given, then reset."""
        if not self.enable_expert_bias:
            raise RuntimeError("update_expert_bias: the layer was built with "
                               "enable_expert_bias=False")
        check_nonneg_float("rate", rate)
        load = self.local_tokens_per_expert.clone()
        if group is not None:
            dist.all_reduce(load, group=group)
        self.expert_bias += rate * torch.sign(load.mean() - load)
        self.local_tokens_per_expert.zero_()

    # ------------------------------------------------------------------------------------
    # weight interop with per-expert nn.Linear layouts

    def _check_format(self, fmt: str) -> None:
        check_choice("format", fmt, EXPERT_FORMATS)
        if self.latent_dim:
            raise ValueError(f"format: {fmt!r} has no latent projection; this layer has "
                             f"latent_dim={self.latent_dim}")
        if fmt in ("mixtral", "qwen3") and not self.gated:
            raise ValueError(f"format: {fmt!r} experts are gated (gate/up/down); this layer "
                             f"uses the non-gated activation {self.activation!r}")
        if fmt == "mixtral" and self.num_shared_experts:
            raise ValueError("format: 'mixtral' has no shared experts; this layer has "
                             f"num_shared_experts={self.num_shared_experts}")
        if fmt != "megatron" and self.bias:
            raise ValueError(f"format: {fmt!r} experts have no biases; this layer has "
                             f"bias=True (use format='megatron')")

    def _layout(self, fmt: str, prefix: str):
        """Yields ``(key, getter, setter)`` for every tensor of the per-expert layout."""
        f = self.ffn_dim
        items = []

        def param(name):
            return (lambda: getattr(self, name)), (lambda v: getattr(self, name).copy_(v))

        def rows(name, e, lo, hi):
            return ((lambda: getattr(self, name)[e, lo:hi]),
                    (lambda v: getattr(self, name)[e, lo:hi].copy_(v)))

        router = {"mixtral": "gate.weight", "qwen3": "gate.weight",
                  "megatron": "router.weight"}[fmt]
        items.append((prefix + router, *param("w_gate")))
        offset = self.local_expert_offset  # keys carry global expert indices under EP
        for e in range(self.num_local_experts):
            if fmt == "mixtral":
                base = f"{prefix}experts.{e + offset}."
                items += [(base + "w1.weight", *rows("w_up", e, 0, f)),
                          (base + "w3.weight", *rows("w_up", e, f, 2 * f)),
                          (base + "w2.weight", *rows("w_down", e, 0, self.d_model))]
            elif fmt == "qwen3":
                base = f"{prefix}experts.{e + offset}."
                items += [(base + "gate_proj.weight", *rows("w_up", e, 0, f)),
                          (base + "up_proj.weight", *rows("w_up", e, f, 2 * f)),
                          (base + "down_proj.weight", *rows("w_down", e, 0, self.d_model))]
            else:
                base = f"{prefix}experts.local_experts.{e + offset}."
                items += [(base + "linear_fc1.weight", *rows("w_up", e, 0, self.w_up.shape[1])),
                          (base + "linear_fc2.weight", *rows("w_down", e, 0, self.d_model))]
                if self.bias:
                    items += [(base + "linear_fc1.bias", *rows("b_up", e, 0, self.w_up.shape[1])),
                              (base + "linear_fc2.bias", *rows("b_down", e, 0, self.d_model))]
        if self.num_shared_experts:
            fs = self.num_shared_experts * self.shared_ffn_dim

            def srows(lo, hi):
                return ((lambda: self.shared_w_up[lo:hi]),
                        (lambda v: self.shared_w_up[lo:hi].copy_(v)))
            if fmt == "qwen3":
                items += [(prefix + "shared_expert.gate_proj.weight", *srows(0, fs)),
                          (prefix + "shared_expert.up_proj.weight", *srows(fs, 2 * fs)),
                          (prefix + "shared_expert.down_proj.weight", *param("shared_w_down"))]
                if self.shared_gate is not None:
                    items.append((prefix + "shared_expert_gate.weight", *param("shared_gate")))
            else:
                items += [(prefix + "shared_experts.linear_fc1.weight", *param("shared_w_up")),
                          (prefix + "shared_experts.linear_fc2.weight", *param("shared_w_down"))]
                if self.bias:
                    items += [(prefix + "shared_experts.linear_fc1.bias", *param("shared_b_up")),
                              (prefix + "shared_experts.linear_fc2.bias",
                               *param("shared_b_down"))]
                if self.shared_gate is not None:
                    items.append((prefix + "shared_experts.gate_weight", *param("shared_gate")))
        if fmt == "megatron" and self.enable_expert_bias:
            items.append((prefix + "router.expert_bias",
                          lambda: self.expert_bias, lambda v: self.expert_bias.copy_(v)))
        return items

    def per_expert_state_dict(self, format: str = "mixtral", prefix: str = "") -> dict:
        """Exports the weights as per-expert ``nn.Linear`` weights (``format``: ``"mixtral"``
        (HF Mixtral ``block_sparse_moe``), ``"qwen3"`` (HF Qwen3-MoE / Qwen2-MoE ``mlp``, with
        ``shared_expert`` and ``shared_expert_gate``) or ``"megatron"`` (Megatron-Core's
        ``SequentialMLP`` experts, ``router``, ``shared_experts``; with ``bias=True`` also their
        ``linear_fc1.bias`` / ``linear_fc2.bias``; the other formats have no biases and raise
        ``ValueError`` for such a layer)). Tensors are copies. Under
        expert parallelism only this rank's experts are exported, under their global
        indices."""
        self._check_format(format)
        return {k: get().detach().clone() for k, get, _ in self._layout(format, prefix)}

    def _other_rank_expert_key(self, key: str) -> bool:
        """A key of an expert that another expert-parallel rank holds (ignored when loading)."""
        m = re.match(r"experts\.(?:local_experts\.)?(\d+)\.", key)
        if m is None or self.ep_group is None:
            return False
        e = int(m.group(1))
        lo = self.local_expert_offset
        return e < self.num_experts and not lo <= e < lo + self.num_local_experts

    @torch.no_grad()
    def load_per_expert_state_dict(self, state_dict: dict, format: str = "mixtral",
                                   prefix: str = "", strict: bool = True) -> None:
        """Loads weights from a per-expert layout (see ``per_expert_state_dict``). With
        ``strict``, a missing key or a key under ``prefix`` that the layout does not know
        raises ``KeyError``; shapes must match exactly (``ValueError``)."""
        self._check_format(format)
        layout = self._layout(format, prefix)
        known = {k for k, _, _ in layout}
        if strict:
            missing = [k for k in known if k not in state_dict]
            unexpected = [k for k in state_dict if k.startswith(prefix) and k not in known
                          and not self._other_rank_expert_key(k[len(prefix):])]
            if missing or unexpected:
                raise KeyError(f"state_dict: missing keys {sorted(missing)[:8]}, unexpected "
                               f"keys {sorted(unexpected)[:8]} for format {format!r}")
        for key, get, put in layout:
            if key not in state_dict:
                continue
            value = state_dict[key]
            if tuple(value.shape) != tuple(get().shape):
                raise ValueError(f"state_dict: {key} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(get().shape)}")
            put(value.to(get().dtype))


def moe_forward(cfg, h: torch.Tensor, *, w_gate, w_up, w_down, expert_bias=None,
                latent_down=None, latent_up=None, shared_fn=None, load_counter=None,
                seq_shape=None, weight_cache=None, router_input=None, gate_bias=None,
                logits_hook=None, valid=None, b_up=None,
                b_down=None):
    """The forward of an MoE layer on tokens ``h [N, D]``, shared by ``MoELayer`` and the
    Megatron-Core adapter (``moe_plugin.megatron``), which hold their parameters differently.

    ``cfg`` carries the options under ``MoELayer``'s attribute names (``training``,
    ``backend``, ``top_k``, ``score_func``, ...). ``shared_fn(h)`` computes the shared experts
    (on a side CUDA stream when ``cfg.shared_expert_overlap``); ``load_counter`` [E] receives
    the per-expert loads in training mode (aux-loss-free balancing); ``weight_cache`` is the
    FP8 path's ``quant.WeightCache`` (None: quantise in every call). ``router_input``
    replaces ``h`` (after the layer's own jitter) as the router's input; ``gate_bias``,
    ``logits_hook`` and ``valid`` (bool [N]: the tokens that enter the losses and the loads)
    are ``route_tokens``'. ``b_up [E, 2F|F]`` / ``b_down [E, D]``: optional expert biases
    (the local experts' under EP; their shapes checked here, before any kernel runs). Returns
    ``(out [N, D], info)``."""
    use_triton = select_triton(cfg.backend, h)
    if b_up is not None or b_down is not None:  # (with quant: refused by routed_experts)
        check_expert_biases(b_up, b_down, w_up, w_down, cfg.activation)

    # shared experts: on a side stream, overlapping the router and the routed experts
    shared = None
    side = None
    if shared_fn is not None:
        if cfg.shared_expert_overlap and h.is_cuda and not torch.compiler.is_compiling():
            main = torch.cuda.current_stream(h.device)
            side = MoELayer._side_stream(h.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                shared = shared_fn(h)
        else:
            shared = shared_fn(h)

    hr = h if router_input is None else router_input
    if cfg.training and cfg.router_jitter > 0:
        eps = cfg.router_jitter
        hr = hr * torch.empty_like(hr).uniform_(1.0 - eps, 1.0 + eps)
    quant = getattr(cfg, "quant", None)
    if (hr is h and latent_down is None and not cfg.apply_weight_to_input
            and router_experts_fused(
                h, w_gate, use_triton, ep_group=cfg.ep_group,
                capacity_factor=cfg.capacity_factor,
                per_seq_aux=seq_shape is not None and cfg.aux_loss_coeff > 0,
                gate_bias=gate_bias, logits_hook=logits_hook, valid=valid)):
        # one Function: the router's dx inside the experts' dx reduction
        out, counts, ids, weights, aux, z = routed_layer(
            h, w_gate, w_up, w_down, cfg.top_k, cfg.activation, score_func=cfg.score_func,
            renormalize=cfg.renormalize, expert_bias=expert_bias, num_groups=cfg.num_groups,
            group_topk=cfg.group_topk, scaling_factor=cfg.scaling_factor,
            aux_loss_coeff=cfg.aux_loss_coeff, z_loss_coeff=cfg.z_loss_coeff,
            recompute=cfg.recompute, quant=quant, weight_cache=weight_cache, b_up=b_up,
            b_down=b_down)
        recv = None
    else:
        ids, weights, aux, z, hr_after = route_tokens(
            hr, w_gate, cfg.top_k, score_func=cfg.score_func, renormalize=cfg.renormalize,
            expert_bias=expert_bias, num_groups=cfg.num_groups, group_topk=cfg.group_topk,
            scaling_factor=cfg.scaling_factor, capacity_factor=cfg.capacity_factor,
            drop_policy=cfg.drop_policy, aux_loss_coeff=cfg.aux_loss_coeff,
            z_loss_coeff=cfg.z_loss_coeff, use_triton=use_triton, seq_shape=seq_shape,
            gate_bias=gate_bias, logits_hook=logits_hook, valid=valid)
        if hr is h:  # the router's input alias: its backward adds the experts' dx in its GEMM
            h = hr_after

        xe = h if latent_down is None else F.linear(h, latent_down)
        if cfg.apply_weight_to_input:
            xe = xe * weights.to(xe.dtype)
            expert_weights = torch.ones_like(weights)
        else:
            expert_weights = weights
        out, counts, recv, ids = routed_experts(
            xe, ids, expert_weights, w_up, w_down, cfg.activation, use_triton, cfg.recompute,
            num_experts=cfg.num_experts, ep_group=cfg.ep_group, ep_backend=cfg.ep_backend,
            max_tokens_per_rank=cfg.max_tokens_per_rank,
            allow_drop=cfg.capacity_factor is not None, drop_policy=cfg.drop_policy,
            quant=quant, weight_cache=weight_cache, b_up=b_up, b_down=b_down)
    if latent_up is not None:
        out = F.linear(out, latent_up)
    if load_counter is not None and cfg.training and torch.is_grad_enabled():
        with torch.no_grad():
            if valid is None:
                load_counter += counts.to(load_counter.dtype)
            else:  # the loads of the valid tokens only
                kept = ids.long().masked_fill(~valid[:, None], -1).reshape(-1)
                load_counter.index_add_(0, kept.clamp(min=0),
                                        (kept >= 0).to(load_counter.dtype))
    if shared is not None:
        if side is not None:
            main = torch.cuda.current_stream(h.device)
            main.wait_stream(side)
            shared.record_stream(main)  # allocated on the side stream, used on main
        out = out + shared
    info = {"aux_loss": aux, "z_loss": z, "tokens_per_expert": counts, "topk_ids": ids,
            "topk_weights": weights}
    if cfg.ep_group is not None:
        info["ep_recv_count"] = recv
    return out, info
