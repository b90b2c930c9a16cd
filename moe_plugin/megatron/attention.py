"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

Without TransformerEngine, Megatron-Core's local layer spec computes attention with
``DotProductAttention``: the full ``[b, heads, s, s]`` score matrix is materialised, masked and
soft-maxed as separate passes (forward and backward). ``SDPAttention`` keeps that module's
interface and configuration and calls PyTorch's fused attention instead (flash / memory-efficient
kernels on GPUs, the math kernel on CPU). It is not MoE-specific: the pretraining example uses it
for stock and moe_plugin runs alike (``--attention sdpa``), so that comparisons of the MoE layers
are not buried under unfused attention.

Supported: causal or padding masks (``attention_mask`` True = masked, Megatron's convention;
``None`` with a causal mask type = causal), grouped-query attention, attention dropout (drawn
from PyTorch's default generator, not Megatron's model-parallel RNG tracker: the same on every
rank only without tensor parallelism, which moe_plugin's Megatron spec does not use). Settings it
does not implement raise at construction, naming the field.
"""
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from .options import UnsupportedConfigError

__all__ = ["SDPAttention", "with_sdpa_attention"]


class SDPAttention(DotProductAttention):
    """Drop-in for Megatron-Core's ``DotProductAttention`` (same constructor, same
    ``forward(query, key, value, attention_mask, ...)`` on ``[s, b, heads, dim]`` tensors,
    returning ``[s, b, heads·dim]``)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None):
        for field, ok in (("apply_query_key_layer_scaling",
                           not config.apply_query_key_layer_scaling),
                          ("softmax_type", config.softmax_type == "vanilla"),
                          ("window_size", config.window_size is None)):
            if not ok:
                raise UnsupportedConfigError(
                    f"TransformerConfig.{field}={getattr(config, field)!r} is not supported by "
                    f"SDPAttention (use Megatron's DotProductAttention)")
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention: packed sequences and attention_bias are not "
                             "supported")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, dim]
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        if attention_mask is None:
            mask, causal = None, mask_type == AttnMaskType.causal
        else:
            mask, causal = ~attention_mask, False
        p = self.attention_dropout.p if self.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                             is_causal=causal, scale=self.softmax_scale)
        s, b = query.shape[0], query.shape[1]
        return ctx.permute(2, 0, 1, 3).reshape(s, b, -1)


def with_sdpa_attention(block_spec):
    """``block_spec`` (a GPT decoder block spec from Megatron-Core's builders or
    ``gpt_decoder_block_spec``) with every layer's core attention replaced by ``SDPAttention``,
    in place; returns it."""
    for layer in block_spec.layer_specs:
        attn = layer.submodules.self_attention
        attn.submodules.core_attention = SDPAttention
    return block_spec
