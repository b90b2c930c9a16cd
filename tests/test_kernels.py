"""Unit tests of single kernels: permutation metadata, the un-permute reduce, and routing."""
import dataclasses

import pytest
import torch

from conftest import DEVICE, FP32_TOL, assert_close, random_ids
from moe_plugin import kernels as K
from moe_plugin import reference

pytestmark = pytest.mark.usefixtures("poison_empty")


def test_poison_fixture_is_active():
    assert torch.isnan(torch.empty(3, device=DEVICE)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(2))).all()


def _ids_with_holes(seed, n, e, k, *, minus_one=0.2, experts=None):
    gen = torch.Generator().manual_seed(seed)
    ids = random_ids(gen, n, e, k)
    if experts is not None:  # only these experts get slots
        ids = torch.tensor(experts)[torch.randint(0, len(experts), (n, k), generator=gen)]
    ids[torch.rand(n, k, generator=gen) < minus_one] = -1
    if n > 2:
        ids[1] = -1
    return ids


def _check_meta(ids: torch.Tensor, e: int):
    meta = K.permute_metadata(ids.to(DEVICE), e)
    flat = ids.reshape(-1).long()
    s = flat.numel()
    valid = flat >= 0
    nvalid = int(valid.sum())
    counts = torch.bincount(flat[valid], minlength=e)
    offsets = torch.zeros(e + 1, dtype=torch.long)
    offsets[1:] = counts.cumsum(0)
    # expected order: stable sort of the slots by expert id, unused slots last
    key = torch.where(valid, flat, e)
    order = torch.sort(key, stable=True).indices
    expected_pos = torch.full((s,), -1, dtype=torch.long)
    expected_pos[order[:nvalid]] = torch.arange(nvalid)

    assert meta.counts.dtype == torch.int32 and meta.offsets.dtype == torch.int32
    assert meta.num_experts == e and meta.top_k == ids.shape[1]
    assert torch.equal(meta.counts.long().cpu(), counts)
    assert torch.equal(meta.offsets.long().cpu(), offsets)
    assert meta.slot_pos.shape == (s,) and meta.sorted_slot.shape == (s,)
    assert torch.equal(meta.slot_pos.long().cpu(), expected_pos)
    assert torch.equal(meta.sorted_slot[:nvalid].long().cpu(), order[:nvalid])
    return meta


@pytest.mark.parametrize("n,e,k,experts", [
    (50, 5, 3, None),            # 150 slots: several programs of the counting sort
    (64, 16, 4, [0, 3, 9, 15]),  # experts with no slot
    (40, 1, 1, None),            # one expert
    (33, 8, 2, [6]),             # every slot on one expert
    (9, 300, 4, None),           # E > 256
    (12, 600, 8, [0, 299, 300, 511, 599]),
])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_permute_metadata(n, e, k, experts, ids_dtype, seed):
    ids = _ids_with_holes(seed, n, e, k, experts=experts).to(ids_dtype)
    _check_meta(ids, e)


def test_permute_metadata_without_minus_one_and_all_minus_one(seed):
    gen = torch.Generator().manual_seed(seed)
    ids = random_ids(gen, 70, 7, 2)
    meta = _check_meta(ids, 7)
    assert (meta.slot_pos >= 0).all()
    meta = _check_meta(torch.full((20, 3), -1), 4)
    assert (meta.counts == 0).all() and (meta.slot_pos == -1).all()


def test_permute_metadata_no_tokens():
    meta = K.permute_metadata(torch.zeros(0, 2, dtype=torch.int64, device=DEVICE), 5)
    assert meta.counts.tolist() == [0] * 5
    assert meta.offsets.tolist() == [0] * 6
    assert meta.slot_pos.numel() == 0 and meta.sorted_slot.numel() == 0


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("n,d,e,k", [(37, 45, 5, 3), (5, 8, 3, 1), (20, 64, 300, 2)])
def test_gather_reduce(weighted, n, d, e, k, seed):
    ids = _ids_with_holes(seed, n, e, k)
    meta = K.permute_metadata(ids.to(DEVICE), e)
    gen = torch.Generator().manual_seed(seed + 1)
    y = torch.randn(n * k, d, generator=gen)
    valid_rows = int(meta.offsets[-1])
    y[valid_rows:] = float("nan")   # rows past the used positions must never be read
    w = torch.rand(n, k, generator=gen)
    out = K.gather_reduce(y.to(DEVICE), meta, w.to(DEVICE) if weighted else None)
    pos = meta.slot_pos.long().cpu().view(n, k)
    expected = torch.zeros(n, d, dtype=torch.float64)
    for t in range(n):
        for j in range(k):
            if pos[t, j] >= 0:
                expected[t] += y[pos[t, j]].double() * (w[t, j].double() if weighted else 1.0)
    assert out.shape == (n, d) and out.dtype == torch.float32
    assert_close(out, expected, FP32_TOL, "gather_reduce")
    assert (out[1] == 0).all()   # token 1 has no used slot


def test_gather_reduce_out_dtype(seed):
    n, d, e, k = 10, 16, 4, 2
    ids = _ids_with_holes(seed, n, e, k)
    meta = K.permute_metadata(ids.to(DEVICE), e)
    y = torch.randn(n * k, d, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    out = K.gather_reduce(y, meta, None, out_dtype=torch.float16)
    ref = K.gather_reduce(y, meta, None)
    assert out.dtype == torch.float16
    assert torch.equal(out, ref.to(torch.float16))


# ----------------------------------------------------------------------------------------------
# routing kernels (forward and backward) against reference.route on float64 logits

ROUTES = {
    "softmax": dict(score_func="softmax", renormalize=True),
    "softmax_plain_scaled": dict(score_func="softmax", renormalize=False, scaling_factor=2.0),
    "softmax_bias": dict(score_func="softmax", renormalize=True, expert_bias=True),
    "sigmoid": dict(score_func="sigmoid", renormalize=True),
    "sigmoid_plain": dict(score_func="sigmoid", renormalize=False),
    "sigmoid_bias_groups": dict(score_func="sigmoid", renormalize=True, expert_bias=True,
                                num_groups=4, group_topk=2, scaling_factor=2.5),
    "softmax_groups": dict(score_func="softmax", renormalize=True, num_groups=8, group_topk=3),
}


@pytest.mark.parametrize("case", ROUTES)
@pytest.mark.parametrize("n,e,k", [(37, 16, 4), (6, 320, 8)])
def test_route_kernels(case, n, e, k, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, e, generator=gen) * 2
    kw = dict(ROUTES[case])
    bias = torch.randn(e, generator=gen) * 0.1 if kw.pop("expert_bias", False) else None
    kw.setdefault("num_groups", None)
    kw.setdefault("group_topk", None)
    kw.setdefault("scaling_factor", 1.0)
    ids, w, colsum, cnt, lse = K.route_forward(
        logits.to(DEVICE), k, expert_bias=None if bias is None else bias.to(DEVICE),
        need_aux=True, need_lse=True, **kw)

    lg = logits.double().requires_grad_()
    r_ids, r_w, _ = reference.route(lg, k, expert_bias=bias, **kw)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids.long().cpu(), r_ids)
    assert_close(w, r_w, FP32_TOL, "weights")
    # aux statistics: column sums of the aux distribution, counts of its plain top-k
    p = reference._aux_scores(lg, kw["score_func"])
    plain = torch.sort(p.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(cnt.long().cpu(), torch.bincount(plain.flatten(), minlength=e))
    assert_close(colsum, p.sum(0), FP32_TOL, "aux column sums")
    r_lse = torch.logsumexp(lg, -1)
    assert_close(lse, r_lse, FP32_TOL, "logsumexp")

    # backward: gradient of <dw, w> + <dcol, colsum> + <dlse, lse>
    dw = torch.randn(n, k, generator=gen)
    dcol = torch.randn(e, generator=gen)
    dlse = torch.randn(n, generator=gen)
    for use in [(True, True, True), (True, False, False), (False, True, False),
                (False, False, True)]:
        parts = [((r_w * dw.double()).sum(), use[0]), ((p.sum(0) * dcol.double()).sum(), use[1]),
                 ((r_lse * dlse.double()).sum(), use[2])]
        loss = sum(v for v, u in parts if u)
        (r_dl,) = torch.autograd.grad(loss, lg, retain_graph=True)
        dl = K.route_backward(logits.to(DEVICE), ids,
                              dw.to(DEVICE) if use[0] else None,
                              dcol.to(DEVICE) if use[1] else None,
                              dlse.to(DEVICE) if use[2] else None,
                              score_func=kw["score_func"], renormalize=kw["renormalize"],
                              scaling_factor=kw["scaling_factor"])
        assert_close(dl, r_dl, FP32_TOL, f"dlogits {use}")


def test_route_kernels_take_strided_logits():
    """``route_forward`` / ``route_backward`` index the logits by rows: a view with a column
    stride (every other column of a wider tensor) and int64 ids give what the contiguous
    tensor and int32 ids give."""
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(9, 16, generator=gen).to(DEVICE)
    view, dense = wide[:, ::2], wide[:, ::2].contiguous()
    kw = dict(score_func="softmax", renormalize=True, expert_bias=None, num_groups=None,
              group_topk=None, scaling_factor=1.0, need_aux=True, need_lse=True)
    got, want = K.route_forward(view, 2, **kw), K.route_forward(dense, 2, **kw)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    dw = torch.randn(9, 2, generator=gen).to(DEVICE)
    bw = dict(score_func="softmax", renormalize=True, scaling_factor=1.0)
    assert torch.equal(K.route_backward(view, want[0].long(), dw, None, None, **bw),
                       K.route_backward(dense, want[0], dw, None, None, **bw))


@pytest.mark.parametrize("groups", [None, 4])
def test_route_forward_ties_and_non_finite_order(groups):
    """The forward's top-k (one max of packed ranks a pick) orders as a stable descending
    ``torch.sort`` of the selection scores: ties to the lowest expert, NaN above +inf (several
    NaNs: lowest first), -inf last; group-limited: the groups by their top-2 sums (ties:
    lowest group). Sigmoid scores of small integers (distinct in fp32), NaN and +-inf logits;
    the aux counts."""
    gen = torch.Generator().manual_seed(11)
    n, e, k = 40, 16, 5
    logits = torch.randint(-2, 3, (n, e), generator=gen).float()
    logits[3, [1, 7]] = float("nan")
    logits[4, [2, 9, 12]] = float("inf")
    logits[5, :] = float("-inf")
    logits[6, [0, 5]] = float("-inf")
    logits[6, [4, 11]] = float("nan")
    logits[7, :] = 0.0
    kw = dict(score_func="sigmoid", renormalize=False, expert_bias=None, num_groups=groups,
              group_topk=2 if groups else None, scaling_factor=1.0)
    ids, w, _, cnt, _ = K.route_forward(logits.to(DEVICE), k, need_aux=True, need_lse=False,
                                        **kw)
    s = torch.sigmoid(logits.double())
    if groups:  # sort's key: NaN first, then the value (stable: lowest index on ties)
        gs = s.view(n, groups, -1)
        top2 = torch.sort(gs, dim=-1, descending=True, stable=True).values[..., :2].sum(-1)
        keep = torch.sort(top2, dim=-1, descending=True, stable=True).indices[:, :2]
        mask = torch.zeros(n, groups, dtype=torch.bool).scatter_(1, keep, True)
        s = s.masked_fill(~mask.repeat_interleave(e // groups, 1), float("-inf"))
    want = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(ids.long().cpu(), want)
    # the aux counts: without groups those of the selection itself, with groups those of a
    # plain top-k of the aux distribution (all NaN in a row with a NaN: its lowest k experts)
    if groups:
        aux = reference._aux_scores(logits.double(), "sigmoid")
        want = torch.sort(aux, dim=-1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(cnt.long().cpu(), torch.bincount(want.flatten(), minlength=e))


@pytest.mark.parametrize("mode", [1, 2], ids=["atomic", "read_modify_write"])
@pytest.mark.parametrize("which", ["wgrad_up", "wgrad_down"])
def test_wgrad_accumulates_into_buffer(which, mode, seed, tune):
    """``out=``: the weight gradient is added into an fp32 buffer (gradient-accumulation
    fusion), experts without rows keep the buffer's values; the same as buffer + the plain
    kernel's fp32 result, by atomic adds and by read-modify-write."""
    from moe_plugin.kernels import grouped_gemm as G
    tune(wgrad_accum_mode=mode)
    n, d, f, e, k = 40, 24, 16, 6, 2
    ids = _ids_with_holes(seed, n, e, k, experts=[0, 2, 5])
    meta = K.permute_metadata(ids.to(DEVICE), e)
    gen = torch.Generator().manual_seed(seed)
    s = n * k
    x = torch.randn(n, d, generator=gen).to(DEVICE)
    rows = torch.randn(s, 2 * f if which == "wgrad_up" else f, generator=gen).to(DEVICE)
    fn = getattr(G, which)
    operands = (rows, x) if which == "wgrad_up" else (x, rows)
    plain = fn(*operands, meta)
    buf = torch.randn(plain.shape, generator=gen).to(DEVICE)
    start = buf.clone()
    got = fn(*operands, meta, out=buf)
    assert got is buf
    assert torch.equal(buf[[1, 3, 4]], start[[1, 3, 4]])  # no rows: untouched
    assert plain[[0, 2, 5]].norm() > 0
    assert_close(buf, start + plain, FP32_TOL, which)
    with pytest.raises(ValueError, match="accumulation buffer"):
        fn(*operands, meta, out=buf[:, :-1])


@pytest.mark.parametrize("activation", ["swiglu", "relu2", "geglu_erf", "gelu_erf"])
def test_split_activation_backward_matches_fused_epilogue(activation, seed, tune):
    """``expert_up_bwd``: the split form (dh' stored, then ``_act_bwd_kernel``) gives the
    fused epilogue's dpre, hw and routing-weight gradient (fp32: dh' is stored unrounded),
    for experts without rows and unused slots too; the pass's two tile orders
    (``act_bwd_cols_fast``) give the same bits."""
    from moe_plugin.config import check_activation
    act, gated = check_activation(activation)
    n, d, f, e, k = 37, 24, 40, 6, 2
    ids = _ids_with_holes(seed, n, e, k, experts=[0, 2, 3, 5])
    meta = K.permute_metadata(ids.to(DEVICE), e)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen).to(DEVICE)
    w_up = (torch.randn(e, 2 * f if gated else f, d, generator=gen) / d ** 0.5).to(DEVICE)
    w_down = (torch.randn(e, d, f, generator=gen) / f ** 0.5).to(DEVICE)
    weights = torch.rand(n, k, generator=gen).to(DEVICE)
    dout = torch.randn(n, d, generator=gen).to(DEVICE)
    pre, _ = K.expert_up(x, w_up, meta, act, gated, store_pre=True, store_h=False)
    valid = int(meta.offsets[-1])
    out = {}
    for form, split, cols_fast in (("fused", False, True), ("split", True, True),
                                   ("split_rows_fast", True, False)):
        tune(split_up_bwd=split, act_bwd_cols_fast=cols_fast)
        dpre, hw, dwp = K.expert_up_bwd(dout, w_down, pre, meta, weights, act, gated)
        out[form] = (dpre[:valid], hw[:valid], dwp[:valid])
    assert 0 < valid < n * k
    for name, a, b, c in zip(("dpre", "hw", "dw_perm"), out["split"], out["fused"],
                             out["split_rows_fast"]):
        assert b.norm() > 0, name
        assert_close(a, b, FP32_TOL, name)
        assert torch.equal(a, c), f"{name}: the two tile orders differ"


def test_bias_gradient_kernels(seed):
    """``bias_up_grad`` / ``bias_down_grad`` (``_segment_colsum_kernel``): per-expert sums over
    the expert's rows, weighted for b_down, and the per-slot dots ``dout[t] · b_down[e]``,
    against plain loops; experts without rows get exactly zero, rows past the routed ones
    (NaN here) are never read, -1 slots never touched. D spans several column tiles."""
    from moe_plugin.kernels import grouped_gemm as G
    n, d, f2, e, k = 30, 70, 36, 6, 2
    ids = _ids_with_holes(seed, n, e, k, experts=[0, 2, 3, 5])
    meta = K.permute_metadata(ids.to(DEVICE), e)
    gen = torch.Generator().manual_seed(seed)
    valid = int(meta.offsets[-1])
    dpre = torch.randn(n * k, f2, generator=gen)
    dpre[valid:] = float("nan")
    dout = torch.randn(n, d, generator=gen)
    w = torch.rand(n, k, generator=gen)
    w.view(-1)[ids.view(-1) < 0] = float("nan")      # the weight of a -1 slot is never read
    b_down = torch.randn(e, d, generator=gen)
    db_up = G.bias_up_grad(dpre.to(DEVICE), meta)
    db_down, dwb = G.bias_down_grad(dout.to(DEVICE), b_down.to(DEVICE), w.to(DEVICE), meta,
                                    True, True)
    pos = meta.slot_pos.long().cpu()
    want_up = torch.zeros(e, f2, dtype=torch.float64)
    want_down = torch.zeros(e, d, dtype=torch.float64)
    want_dot = torch.zeros(valid, dtype=torch.float64)
    for s_, ex in enumerate(ids.view(-1).tolist()):
        if ex < 0:
            continue
        t, p = s_ // k, pos[s_]
        want_up[ex] += dpre[p].double()
        want_down[ex] += w.view(-1)[s_].double() * dout[t].double()
        want_dot[p] = (dout[t].double() * b_down[ex].double()).sum()
    assert db_up.shape == (e, f2) and db_down.shape == (e, d) and dwb.shape == (n * k,)
    assert_close(db_up, want_up, FP32_TOL, "db_up")
    assert_close(db_down, want_down, FP32_TOL, "db_down")
    assert_close(dwb[:valid], want_dot, FP32_TOL, "dout · b_down")
    for empty in (1, 4):
        assert (db_up[empty] == 0).all() and (db_down[empty] == 0).all()
    # only what is asked for
    db_only, none = G.bias_down_grad(dout.to(DEVICE), b_down.to(DEVICE), w.to(DEVICE), meta,
                                     True, False)
    assert none is None and torch.equal(db_only, db_down)
    none, dwb_only = G.bias_down_grad(dout.to(DEVICE), b_down.to(DEVICE), w.to(DEVICE), meta,
                                      False, True)
    assert none is None and torch.equal(dwb_only[:valid], dwb[:valid])


def test_gluon_row_grouped_fits_exactly_the_operands_it_reads():
    """``gluon_gemm.grouped_direct_fits`` (which 16-bit row-grouped GEMMs the Hopper kernel
    serves): the weights as the TMA descriptor spans them -- K-major ``[E·NB, K]`` with NB = n
    (2n for the gated GEMM1) exactly, or N-major ``[E·K, n]`` -- so a slice of a bigger weight
    (whose last expert's tile rows would lie past the tensor) goes to the Triton kernel; K a
    multiple of the 64-wide k-step; GEMM1 K-major only, the fused dh' N-major only; bf16."""
    from moe_plugin.kernels import gluon_gemm as GF
    from moe_plugin.kernels.codes import Epilogue
    e, d, f = 4, 128, 64
    bf = torch.bfloat16
    x = torch.zeros(10, d, dtype=bf)
    w_up = torch.zeros(e, 2 * f, d, dtype=bf)          # [E, 2F, D]
    w_down = torch.zeros(e, d, f, dtype=bf)            # [E, D, F]

    def kmajor(w):                                     # B = W[e]ᵀ: strides (expert, k, n)
        return (w.stride(0), w.stride(2), w.stride(1))
    fits = GF.grouped_direct_fits
    up = Epilogue.ACT_FWD
    assert fits(x, w_up, kmajor(w_up), f, d, epi=up, gated=True)
    plain = w_up[:, :f].contiguous()
    assert fits(x, plain, kmajor(plain), f, d, epi=up)
    # the up half of a gated weight as an ungated one: its expert stride spans 2F rows
    assert not fits(x, w_up[:, f:], kmajor(w_up[:, f:]), f, d, epi=up)
    assert not fits(x, w_up, kmajor(w_up), f, d, epi=up)            # gated weight, ungated
    h = torch.zeros(10, f, dtype=bf)
    assert fits(h, w_down, kmajor(w_down), d, f)                     # GEMM2
    dpre = torch.zeros(10, 2 * f, dtype=bf)
    assert fits(dpre, w_up, w_up.stride(), d, 2 * f)                 # dx, N-major
    assert fits(x, w_down, w_down.stride(), f, d)                    # dh', N-major
    assert fits(x, w_down, w_down.stride(), f, d, epi=Epilogue.ACT_BWD)
    assert not fits(x, w_down, kmajor(torch.zeros(e, f, d, dtype=bf)), f, d,
                    epi=Epilogue.ACT_BWD)                            # fused dh': N-major only
    assert not fits(x, w_down, w_down.stride(), f, d, epi=up)        # GEMM1: K-major only
    x96 = torch.zeros(10, 96, dtype=bf)                              # K not a multiple of 64
    assert not fits(x96, torch.zeros(e, f, 96, dtype=bf), (f * 96, 1, 96), f, 96)
    assert not fits(x.float(), w_down.float(), w_down.stride(), f, d)   # fp32: Triton
    assert not fits(x.half(), w_down.half(), w_down.stride(), f, d)     # fp16: Triton
    # the weight gradients likewise: bf16 operands only
    c = torch.zeros(e, 2 * f, d, dtype=torch.float32)
    assert GF.segment_direct_fits(dpre, x, c, GF.Accum.STORE)
    assert not GF.segment_direct_fits(dpre.half(), x.half(), c, GF.Accum.STORE)
    # the dh' GEMM with the activation backward in its epilogue has its own launcher
    # (grouped_mm_act_bwd: routing weights, partial sums, hw); the plain one refuses it
    with pytest.raises(ValueError, match="grouped_mm_act_bwd"):
        GF.grouped_mm_direct(None, x, w_down, w_down.stride(), h, None, n=f, k=d,
                             gather=True, epi=Epilogue.ACT_BWD)


def test_gluon_row_grouped_launches_name_their_gemm(monkeypatch):
    """Each 16-bit row-grouped GEMM hands the Gluon launcher its name (``kind``), the key of
    ``Tuning.gluon_bf16_kind_configs`` (a configuration for that GEMM alone): GEMM1 "up",
    GEMM2 "down", the split form's dh' "dh", dx "dx" (the launcher replaced by a recorder:
    this machine has no Hopper GPU)."""
    from moe_plugin.kernels import gluon_gemm as GF, grouped_gemm as G, tuning
    from moe_plugin.kernels.permute import permute_metadata
    kinds = []
    monkeypatch.setattr(GF, "available", lambda tune, t: True)
    monkeypatch.setattr(GF, "grouped_direct_fits", lambda *a, **k: True)
    monkeypatch.setattr(GF, "grouped_mm_direct", lambda *a, **k: kinds.append(k["kind"]))
    bf = torch.bfloat16
    n, k, e, d, f = 8, 2, 3, 64, 64
    meta = permute_metadata(torch.randint(0, e, (n, k), dtype=torch.int32), e)
    x = torch.zeros(n, d, dtype=bf)
    w_up, w_down = torch.zeros(e, 2 * f, d, dtype=bf), torch.zeros(e, d, f, dtype=bf)
    G.expert_up(x, w_up, meta, 0, True, store_pre=True, store_h=True)
    G.expert_down(torch.zeros(n * k, f, dtype=bf), w_down, meta)
    with tuning.override(split_up_bwd=True, gluon_bf16_fuse_act_bwd=False):
        G.expert_up_bwd(x, w_down, torch.zeros(n * k, 2 * f, dtype=bf), meta,
                        torch.rand(n, k), 0, True)
    G.expert_dx(torch.zeros(n * k, 2 * f, dtype=bf), w_up, meta)
    assert kinds == ["up", "down", "dh", "dx"]


def test_gluon_bf16_wgrad_tiles_fit_the_output():
    """``gluon_gemm.bf16_seg_config``: the 16-bit weight gradients' 128 x 256 tiles
    (``gluon_bf16_seg_config``; dW_down, A's rows gathered), 256 x 128 where B's rows are
    gathered (dW_up: 128 columns of x gathered a k-step), 128 x 128 (``gluon_bf16_seg_narrow_
    config``) for a read-add-write into fp32 (the fp32 tile and the ring exceed a Hopper
    block's shared memory) and for widths not multiples of 16 (the masked epilogue spills
    registers at 256 wide); the ring's slots lowered to what fits beside a read-add-write
    tile or the TMA store's part buffers (a stored 16-bit output: ``TMA_STORE``)."""
    from moe_plugin.kernels import gluon_gemm as GF, tuning
    from moe_plugin.kernels.codes import Accum
    tune = tuning.current()
    bf, f32 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)

    def cfg(*args, **kw):
        c = GF.bf16_seg_config(tune, *args, **kw)
        tile = c["BM"] * c["BN"] * args[0].element_size()
        smem = ((c["BM"] + c["BN"]) * c["BK"] * 2 * c["STAGES"]
                + (tile if args[1] == Accum.RMW else tile // 2 if c["TMA_STORE"] else 0))
        assert c["TMA_STORE"] == (args[1] == Accum.STORE and args[0].element_size() == 2)
        assert smem + GF._SEG_SMEM_OTHER <= GF._SMEM_LIMIT, c
        return c["BM"], c["BN"], c["STAGES"]
    assert cfg(f32, Accum.ATOMIC, 1024, 4096) == (128, 256, 3)
    assert cfg(bf, Accum.STORE, 1024, 4096) == (128, 256, 3)
    assert cfg(bf, Accum.RMW, 1024, 4096) == (128, 256, 3)
    assert cfg(f32, Accum.ATOMIC, 1024, 4096, b_gather=True) == (256, 128, 4)
    # stored by TMA: the part buffers beside the ring (256 x 128: 3 slots fit)
    assert cfg(bf, Accum.STORE, 1024, 4096, b_gather=True) == (256, 128, 3)
    assert cfg(bf, Accum.RMW, 1024, 4096, b_gather=True) == (256, 128, 3)  # 4 do not fit
    for b_gather in (False, True):
        assert cfg(f32, Accum.RMW, 1024, 4096, b_gather=b_gather) == (128, 128, 4)
        assert cfg(bf, Accum.STORE, 1024, 200, b_gather=b_gather) == (128, 128, 4)
        assert cfg(bf, Accum.STORE, 136, 4096, b_gather=b_gather) == (128, 128, 4)


def test_gluon_runs_only_under_a_verified_triton_unless_asked(monkeypatch):
    """``gluon_gemm.api_supported``: the Gluon kernels run under a Triton they ran with on a
    Hopper GPU (``GLUON_TRITON_VERSIONS``); under one they only compile under
    (``GLUON_TRITON_COMPILES``, 3.7 to 3.9) only with ``MOE_PLUGIN_GLUON_UNVERIFIED=1``; never under
    one they do not compile under."""
    from moe_plugin.kernels import gluon_gemm as GF
    if not GF._HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    unverified = [v for v in GF.GLUON_TRITON_COMPILES if v not in GF.GLUON_TRITON_VERSIONS]
    assert set(GF.GLUON_TRITON_VERSIONS) <= set(GF.GLUON_TRITON_COMPILES)
    assert (3, 9) in GF.GLUON_TRITON_COMPILES and (3, 99) not in GF.GLUON_TRITON_COMPILES
    for asked in (False, True):
        if asked:
            monkeypatch.setenv("MOE_PLUGIN_GLUON_UNVERIFIED", "1")
        else:
            monkeypatch.delenv("MOE_PLUGIN_GLUON_UNVERIFIED", raising=False)
        for version in [*GF.GLUON_TRITON_VERSIONS, *unverified, (3, 99)]:
            monkeypatch.setattr(GF, "_triton_version", lambda v=version: v)
            compiles = version in GF.GLUON_TRITON_COMPILES
            runs = version in GF.GLUON_TRITON_VERSIONS or (asked and compiles)
            assert (GF.api_compiles(), GF.api_supported()) == (compiles, runs), (version, asked)


def test_gluon_cluster_grid_and_gate(monkeypatch):
    """The row-grouped kernel launched as clusters of two CTAs (``gluon_bf16_config["CLUSTER"]``):
    only where this Triton's Gluon has TMA multicast (``cluster_compiles``: from 3.8); its
    persistent grid counts clusters, one per SM pair (or per two of ``gluon_programs``), no
    more than the driver said fit at once, and at most one per tile."""
    from moe_plugin.kernels import gluon_gemm as GF, tuning
    if not GF._HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    for version, want in (((3, 6), False), ((3, 7), False), ((3, 8), True), ((3, 9), True),
                          ((3, 99), False)):
        monkeypatch.setattr(GF, "_triton_version", lambda v=version: v)
        assert GF.cluster_compiles() == want, version
    monkeypatch.setattr(GF, "sm_count", lambda device: 132)
    monkeypatch.setattr(GF, "_CLUSTER_CAPACITY", {})
    t = tuning.current()
    dev = "cuda:0"
    assert GF._programs(t, 10_000, dev) == 132
    assert GF._programs(t, 10_000, dev, 2) == 66
    assert GF._programs(t, 40, dev, 2) == 40
    assert GF._programs(dataclasses.replace(t, gluon_programs=3), 10_000, dev, 2) == 1
    GF._CLUSTER_CAPACITY[(dev, 2)] = 60  # the driver's answer after a first launch
    assert GF._programs(t, 10_000, dev, 2) == 60
    assert GF._programs(t, 10_000, dev) == 132  # one-CTA launches unaffected
    GF._CLUSTER_CAPACITY[(dev, 2)] = None  # no answer: one per SM pair
    assert GF._programs(t, 10_000, dev, 2) == 66


@pytest.mark.parametrize("shape", [(37, 8), (5, 130)])
def test_split_bf16_kernel_equals_torch(shape):
    """The router backward's operand split (``routing.split_bf16_pieces``: one Triton pass)
    equals the PyTorch form (``autograd.router.split_bf16`` off CUDA) bitwise, values across
    forty decades and signs, and the pieces sum back to the fp32 input."""
    from moe_plugin.autograd.router import split_bf16
    from moe_plugin.kernels.routing import split_bf16_pieces
    g = torch.Generator().manual_seed(5)
    n, e = shape
    t = torch.randn(n, e, generator=g) * torch.logspace(-20, 20, n * e).view(n, e)
    got = split_bf16_pieces(t.to(DEVICE), 3).cpu()
    want = split_bf16(t, 3)
    assert got.dtype == torch.bfloat16 and got.shape == (n, 3 * e)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    total = sum(got[:, i * e:(i + 1) * e].double() for i in range(3))
    assert torch.equal(total.float(), t)
    # non-finite values: as the PyTorch form (inf, then NaN left over; NaN throughout; a
    # finite value rounding up to inf)
    t[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.4e38])
    got = split_bf16_pieces(t.to(DEVICE), 3).cpu().float()
    want = split_bf16(t, 3).float()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
    with pytest.raises(ValueError, match="parts"):
        split_bf16_pieces(t.to(DEVICE), 0)


def test_pieces_dx_sums_pieces_and_c():
    """``routing.pieces_dx`` (the router's split-form dx with the experts' dx added): ``c +
    Σ_i piece_i · W`` in one fp32 accumulator, within fp32 summation's error bound of the
    exact sum, for widths off the tile sizes (E 40: k-steps, the last partial; E 24: one
    k-step, W's tile kept for all row tiles; D 45, N 37: partial tiles, several row tiles a
    program); with ``c`` absent, fp32 operands, one piece; bad shapes named."""
    from moe_plugin.kernels.routing import pieces_dx, split_bf16_pieces
    g = torch.Generator().manual_seed(7)
    n, d = 37, 45

    def check_sum(p3, w, c, e):
        """pieces_dx(p3, w, c) within fp32 summation's bound of the exact ``c + Σ p_i · w``;
        returns the result (fp32, on the CPU)."""
        got = pieces_dx(p3.to(DEVICE), w.to(DEVICE), c.to(DEVICE)).cpu()
        assert got.dtype == torch.float32 and got.shape == (n, d)
        pd, wd = p3.cpu().double(), w.double()
        exact = c.double() + sum(pd[:, i * e:(i + 1) * e] @ wd for i in range(3))
        bound = c.double().abs() + sum(pd[:, i * e:(i + 1) * e].abs() @ wd.abs()
                                       for i in range(3))
        assert ((got.double() - exact).abs() <= (3 * e + 1) * 2.0 ** -24 * bound).all(), e
        return got

    for e in (24, 40):  # (the interpreter's k-step: 32)
        dl = torch.randn(n, e, generator=g) * torch.logspace(-4, 2, e)
        w = torch.randn(e, d, generator=g).to(torch.bfloat16)
        c = torch.randn(n, d, generator=g)
        p3 = split_bf16_pieces(dl.to(DEVICE), 3)
        got = check_sum(p3, w, c, e)
        # pieces of one magnitude (each piece's product counts alike)
        check_sum(torch.randn(n, 3 * e, generator=g).to(torch.bfloat16), w, c, e)
        wd = w.double()
        # the pieces carry the fp32 dlogits: the result is dlogits · W to fp32 accuracy
        bound1 = c.double().abs() + dl.double().abs() @ wd.abs()
        assert ((got.double() - c.double() - dl.double() @ wd).abs()
                <= (3 * e + 1) * 2.0 ** -24 * bound1).all(), e
    wf = w.float()
    got1 = pieces_dx(dl.to(DEVICE), wf.to(DEVICE)).cpu()
    exact1 = dl.double() @ wf.double()
    assert ((got1.double() - exact1).abs()
            <= e * 2.0 ** -24 * (dl.double().abs() @ wf.double().abs())).all()
    # the registered op (what the router's backward calls): its fake implementation and
    # schema agree with the function, with and without c
    from moe_plugin.kernels.routing import pieces_dx_op
    for args in ((p3, w.to(DEVICE), c.to(DEVICE)), (p3, w.to(DEVICE), None)):
        torch.library.opcheck(pieces_dx_op.op, args,
                              test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="c must be"):
        pieces_dx(p3, w.to(DEVICE), c[:, :-1].to(DEVICE))
    with pytest.raises(ValueError, match="pieces must be"):
        pieces_dx(p3[:, :-1], w.to(DEVICE))
    with pytest.raises(ValueError, match="one dtype"):
        pieces_dx(p3, wf.to(DEVICE))


def test_pieces_gather_reduce_sums_pieces_and_slots():
    """``routing.pieces_gather_reduce`` (the experts' dx reduction with the router's split-form
    dx product): ``Σ_i piece_i · W + Σ_j y[slot_pos[t·k + j]]`` in one fp32 accumulator, within
    fp32 summation's bound of the exact sum (bf16: three pieces; fp32: dlogits itself), unused
    slots skipped, sizes off the tiles (E 40: k-steps; N 37, D 45); bad shapes named."""
    from moe_plugin.kernels.permute import permute_metadata
    from moe_plugin.kernels.routing import pieces_gather_reduce, split_bf16_pieces
    g = torch.Generator().manual_seed(8)
    n, d, e, k = 37, 45, 40, 3
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)]).int()
    ids[:4, 1] = -1
    meta = permute_metadata(ids.to(DEVICE), e)
    pos = meta.slot_pos.cpu().view(n, k).long()
    dl = torch.randn(n, e, generator=g) * torch.logspace(-4, 2, e)
    for dtype, parts in ((torch.float32, 1), (torch.bfloat16, 3)):
        y = torch.randn(int(meta.counts.sum()), d, generator=g).to(dtype)
        w = torch.randn(e, d, generator=g).to(dtype)
        p = dl if parts == 1 else split_bf16_pieces(dl.to(DEVICE), 3).cpu()
        got = pieces_gather_reduce(y.to(DEVICE), meta, p.to(DEVICE), w.to(DEVICE),
                                   torch.float32).cpu()
        rows = torch.where((pos >= 0)[..., None], y.double()[pos.clamp(min=0)], 0.0)
        pd = p.double().view(n, parts, e)
        exact = rows.sum(1) + pd.sum(1) @ w.double()
        bound = rows.abs().sum(1) + pd.abs().sum(1) @ w.double().abs()
        assert ((got.double() - exact).abs() <= (parts * e + k) * 2.0 ** -24 * bound).all()
    with pytest.raises(ValueError, match="pieces must have 37 rows"):
        pieces_gather_reduce(y.to(DEVICE), meta, p[:-1].to(DEVICE), w.to(DEVICE),
                             torch.float32)
    with pytest.raises(ValueError, match="y must be"):
        pieces_gather_reduce(y[:, :-1].to(DEVICE), meta, p.to(DEVICE), w.to(DEVICE),
                             torch.float32)


def test_pieces_dw_sums_pieces_over_token_chunks():
    """``routing.pieces_dw`` (the router's split-form weight gradient, ``router_dw_kernel``):
    ``Σ_i piece_iᵀ · x`` within fp32 summation's error bound of the exact sum, over several
    token chunks (N 150: chunks of 64 rows under the interpreter, the last partial), widths
    off the tile sizes (E 40, D 45); bf16 out one rounding of the fp32 sum; the op's schema
    and fake implementation; bad shapes named."""
    from moe_plugin.kernels.routing import pieces_dw, pieces_dw_op, split_bf16_pieces
    g = torch.Generator().manual_seed(8)
    n, e, d = 150, 40, 45
    dl = torch.randn(n, e, generator=g) * torch.logspace(-4, 2, e)
    x = torch.randn(n, d, generator=g).to(torch.bfloat16)
    p3 = split_bf16_pieces(dl.to(DEVICE), 3)
    got = pieces_dw(p3, x.to(DEVICE), 3, torch.float32).cpu()
    assert got.dtype == torch.float32 and got.shape == (e, d)
    p3d, xd = p3.cpu().double(), x.double()
    exact = sum(p3d[:, i * e:(i + 1) * e].t() @ xd for i in range(3))
    bound = sum(p3d[:, i * e:(i + 1) * e].abs().t() @ xd.abs() for i in range(3))
    assert ((got.double() - exact).abs() <= (3 * n + 3) * 2.0 ** -24 * bound).all()
    # bf16 out (the router's gradient dtype): one rounding of the fp32 result
    got16 = pieces_dw(p3, x.to(DEVICE)).cpu()
    assert got16.dtype == torch.bfloat16 and torch.equal(got16, got.to(torch.bfloat16))
    # one chunk, fp32 operands, one piece
    got1 = pieces_dw(dl[:50].to(DEVICE), x[:50].float().to(DEVICE), 1).cpu()
    exact1 = dl[:50].double().t() @ x[:50].double()
    assert ((got1.double() - exact1).abs()
            <= 50 * 2.0 ** -24 * (dl[:50].double().abs().t() @ x[:50].double().abs())).all()
    torch.library.opcheck(pieces_dw_op.op, (p3, x.to(DEVICE), 3, torch.bfloat16),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="rows"):
        pieces_dw(p3, x[:-1].to(DEVICE))
    with pytest.raises(ValueError, match="3·E"):
        pieces_dw(p3[:, :-1], x.to(DEVICE))
    with pytest.raises(ValueError, match="one dtype"):
        pieces_dw(p3, x.float().to(DEVICE))
    # the empty batch: a zero gradient of the right shape
    assert torch.equal(pieces_dw(p3[:0], x[:0].to(DEVICE)).cpu(), torch.zeros(e, d,
                                                                             dtype=x.dtype))
