"""Traffic model of one MoE layer's expert-parallel all-to-alls, its check against the 2×H200
measurements, and a simulation of flat vs. hierarchical (node-aware) dispatch.

    python benchmarks/ep_traffic_model.py --check      # model vs. results/h200x2_bench_ep.json
    python benchmarks/ep_traffic_model.py --simulate   # flat vs. hierarchical, P = 8..64

Pure PyTorch on CPU; no GPU, no process group.

Notation
========
T tokens per rank, D hidden size, b bytes per element of the activations (2 for bf16), E
experts, k top-k, P ranks in the EP group, G ranks per node (N = P/G nodes), e = E/P experts
per rank (rank r owns experts [r·e, (r+1)·e)), e_n = E/N experts per node. ``node(r) = r // G``.
r_ij = rows rank i sends to rank j in one dispatch.

What ``moe_plugin.comm.dispatch`` sends ("flat", as built)
==========================================================
One row per routed *slot* (token, expert): a token with two experts on the same rank travels
twice. With ``max_tokens_per_rank = M`` every rank sends a fixed chunk to every rank, padding
included::

    r_ij = #{slots of rank i with id >= 0 and id // e == j}     (exact mode)
    r_ij = M · min(k, e)                                        (fixed-size mode)

Row sizes::

    R_p = 16·ceil(D·b / 16) + 16     packed dispatch row: payload | int32 local id | fp32 weight
                                     | pad (``packed_row_bytes``)
    R_y = D·b                        combine / gradient rows (plain [rows, D] tensors)

Bytes from rank i to rank j in the four exchanges of one layer (forward and backward), and the
count exchange (exact mode only; the host synchronisation reads its result)::

    count        8                  (int64 row count per destination, forward only)
    dispatch     r_ij · R_p         (forward: x rows + ids + weights to the experts)
    combine      r_ji · R_y         (forward: weighted expert outputs home)
    combine_bwd  r_ij · R_y         (backward: dout rows to the experts that produced them)
    dispatch_bwd r_ji · R_p         (backward: dx + d(weight) home, packed like a dispatch row)

Everything a rank sends includes the chunk to itself (j = i): ``all_to_all_single`` copies it.

Tiers and time
==============
Each (i, j) pair is one tier: self (i = j), NVLink (same node) or network (other node). Per rank
and tier, the volume is V = max(bytes sent, bytes received) over that tier; the links of one
rank work concurrently and the slowest bounds the exchange, and the slowest rank bounds the
collective::

    t_tier(r)  = alpha_tier + V_tier(r) / B_tier        (0 if V_tier(r) = 0)
    t_exchange = max_r max_tier t_tier(r)

B_nvlink is the per-GPU NVLink all-to-all bandwidth, B_net the per-GPU network bandwidth (one
NIC per GPU, e.g. 400 Gb/s = 50 GB/s), alpha a fixed latency per exchange and tier (the peers
of one exchange are served concurrently by NCCL, so no per-peer term). The self chunk is either
free (``self_on_nvlink=False``: a local copy beside the transfers) or shares the NVLink budget
(``self_on_nvlink=True``: NCCL's kernel moves it with the same channels). On two GPUs the two
variants cannot be told apart (the self chunk is always half); from P = 4 on they differ.

Local memory passes (for the measured ``dispatch`` = pack + exchange and ``combine`` = exchange
+ k-way sum), at the device-copy rate H (read + write bytes)::

    pack     S_send · (D·b + R_p) / H             (gathered x rows in, packed rows out)
    k-sum    (S_send · D·b + T · D·b) / H         (received rows in, token rows out)

with S_send = sum_j r_ij.

Expected rows under uniform routing
===================================
With uniform routing every k-subset of the E experts is equally likely (top-k of i.i.d.
logits). The probability that a token touches none of a set of m experts is
C(E-m, k) / C(E, k), so, per token::

    flat rows to a rank                  k / P
    q_r = P(token touches a given rank)  = 1 - C(E-e, k)   / C(E, k)
    q_n = P(token touches a given node)  = 1 - C(E-e_n, k) / C(E, k)

Schemes compared by the simulation
==================================
flat         as built (above).
dedup        one row per (token, destination rank), carrying the token's k (global id, fp32
             weight) pairs: dispatch row R_m = 16·ceil(D·b/16) + 16·ceil(8k/16); the receiving
             rank runs its local experts with k-wide ids (-1 for the other ranks' experts) and
             sums them, so combine sends one R_y row per (token, rank); dispatch_bwd rows carry
             dx and the k d(weight)s: R_g = 16·ceil(D·b/16) + 16·ceil(4k/16). Expected rows
             i → j: T·q_r.
hier         hierarchical: a token crosses the network at most once per destination node, to
             the rank of that node with the sender's local index (the same "rail"), which
             forwards it over NVLink to each GPU of its node that holds one of the token's
             experts (destinations in the sender's own node get it directly over NVLink).
             Combine is the reverse: each GPU sums its experts' outputs per token, the rail
             rank sums its node's rows per token, one row per (token, node) crosses the
             network. Rows per rank (expected, uniform)::

                 network  sent = received = T · (N-1) · q_n
                 NVLink   sent = received = T · N · (G-1) · q_r
                          (own node (G-1)·q_r·T + forwarded (N-1)·(G-1)·q_r·T)

             Two stages per exchange (network, NVLink); with chunked pipelining the exchange
             takes max(t_net, t_nvlink), without it t_net + t_nvlink.

Times under skewed routing come from sampled routings (``sample_routing``: logits =
N(0, 1) + skew · b_e with a fixed per-expert bias b_e ~ N(0, 1); optionally DeepSeek-V3-style
group-limited routing), counted exactly per rank pair.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

ALIGN = 16
PHASES = ("dispatch", "combine", "combine_bwd", "dispatch_bwd")
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_2GPU = os.path.join(HERE, "results", "h200x2_bench_ep.json")
# Device-to-device copy rate, read + write, measured on an H100 (benchmarks/NOTES.md,
# "Ceilings and floors"). No H200 copy figure is committed; H200's HBM is faster, so this
# overstates the pack / k-sum passes on H200.
H100_COPY_TBPS = 3.00


def _align(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def packed_row_bytes(d: int, dtype_bytes: int) -> int:
    """R_p: bytes of one packed dispatch row of moe_plugin.kernels.pack (payload padded to
    16 B, then a 16-byte block holding the int32 local id and the fp32 routing weight)."""
    return _align(d * dtype_bytes) + ALIGN


def dedup_row_bytes(d: int, dtype_bytes: int, k: int, bytes_per_slot: int = 8) -> int:
    """Row that serves several experts: payload, then k (int32 id, fp32 weight) pairs (8 B per
    slot) in dispatch or k fp32 d(weight)s (4 B per slot) in dispatch's backward."""
    return _align(d * dtype_bytes) + _align(bytes_per_slot * k)


@dataclass(frozen=True)
class Problem:
    """One MoE layer under EP. ``max_tokens_per_rank``: moe_plugin's fixed-size mode."""
    tokens: int          # T, per rank
    d: int               # hidden size
    experts: int         # E
    top_k: int           # k
    ep: int              # P
    ranks_per_node: int = 8
    dtype_bytes: int = 2
    max_tokens_per_rank: Optional[int] = None

    def __post_init__(self):
        if self.experts % self.ep:
            raise ValueError(f"experts={self.experts} not divisible by ep={self.ep}")
        if self.ep > self.ranks_per_node and self.ep % self.ranks_per_node:
            raise ValueError(f"ep={self.ep} not a multiple of ranks_per_node="
                             f"{self.ranks_per_node}")

    @property
    def local_experts(self) -> int:
        return self.experts // self.ep

    @property
    def node_size(self) -> int:     # G, ranks of the group in one node
        return min(self.ranks_per_node, self.ep)

    @property
    def nodes(self) -> int:         # N
        return self.ep // self.node_size


@dataclass(frozen=True)
class Links:
    """Per-GPU link figures. Bandwidths in GB/s (1e9 B/s), latencies in microseconds per
    exchange and tier. ``self_GBps``: rate of the self chunk when it does not share NVLink
    (None: free)."""
    nvlink_GBps: float
    net_GBps: float = 50.0
    nvlink_latency_us: float = 0.0
    net_latency_us: float = 0.0
    self_on_nvlink: bool = False
    self_GBps: Optional[float] = None


# ------------------------------------------------------------------------------------------
# routing

def expert_bias(num_experts: int, seed: int = 0) -> torch.Tensor:
    """Fixed per-expert logit bias b_e ~ N(0, 1): ``skew · b_e`` makes some experts popular."""
    return torch.randn(num_experts, generator=torch.Generator().manual_seed(seed))


def sample_routing(tokens: int, num_experts: int, top_k: int, gen: torch.Generator,
                   skew: float = 0.0, bias: Optional[torch.Tensor] = None,
                   num_groups: Optional[int] = None, group_topk: Optional[int] = None
                   ) -> torch.Tensor:
    """Top-k expert ids [T, k] (int64) of logits N(0, 1) + skew·bias. With ``num_groups`` /
    ``group_topk``: DeepSeek-V3's group-limited routing (groups ranked by the sum of their top-2
    scores; experts chosen among the best ``group_topk`` groups)."""
    logits = torch.randn(tokens, num_experts, generator=gen)
    if skew:
        logits += skew * (bias if bias is not None else expert_bias(num_experts))
    if num_groups:
        g = logits.view(tokens, num_groups, -1)
        gscore = g.topk(min(2, g.shape[-1]), dim=-1).values.sum(-1)
        keep = torch.zeros(tokens, num_groups, dtype=torch.bool)
        keep.scatter_(1, gscore.topk(group_topk, dim=-1).indices, True)
        logits = logits.masked_fill(~keep.repeat_interleave(g.shape[-1], 1), float("-inf"))
    return logits.topk(top_k, dim=-1).indices


def expert_load_imbalance(ids_per_rank: Sequence[torch.Tensor], num_experts: int) -> float:
    """max / mean slots per expert over all ranks' routings."""
    counts = sum(torch.bincount(i[i >= 0].reshape(-1), minlength=num_experts)
                 for i in ids_per_rank).double()
    return (counts.max() / counts.mean()).item()


def rank_load_imbalance(rows: torch.Tensor) -> float:
    """max / mean slots received per rank (flat rows matrix)."""
    recv = rows.sum(0).double()
    return (recv.max() / recv.mean()).item()


# ------------------------------------------------------------------------------------------
# rows per rank pair

def flat_rows(ids_per_rank: Sequence[torch.Tensor], num_experts: int, ep: int,
              max_tokens_per_rank: Optional[int] = None) -> torch.Tensor:
    """r_ij as moe_plugin.comm.dispatch sends it: int64 [P, P], rows from rank i to rank j.
    ``ids_per_rank[i]``: rank i's global top-k ids [T_i, k] (-1 = unused slot)."""
    e = num_experts // ep
    rows = torch.zeros(ep, ep, dtype=torch.int64)
    for src, ids in enumerate(ids_per_rank):
        if max_tokens_per_rank is not None:
            rows[src] = max_tokens_per_rank * min(ids.shape[1], e)
        else:
            flat = ids.reshape(-1).long()
            rows[src] = torch.bincount(flat[flat >= 0] // e, minlength=ep)
    return rows


def _touch(ids: torch.Tensor, e: int, ep: int) -> torch.Tensor:
    """bool [T, P]: token t has at least one expert on rank j."""
    ids = ids.long()
    dst = torch.where(ids >= 0, ids // e, ep)
    hot = torch.zeros(ids.shape[0], ep + 1, dtype=torch.bool)
    hot.scatter_(1, dst, True)
    return hot[:, :ep]


def scheme_rows(ids_per_rank: Sequence[torch.Tensor], num_experts: int, ep: int,
                node_size: int) -> Dict[str, torch.Tensor]:
    """Rows per rank pair [P, P] of one dispatch for each scheme (exact mode).

    ``flat``: per slot (as built). ``dedup``: per (token, destination rank). ``net``: network
    rows of the hierarchical scheme, i → the rank of node n with i's local index (one per
    token and destination node n ≠ node(i)). ``nvl``: its NVLink rows (own node direct, and
    forwarded by the rail rank to the other GPUs of its node)."""
    P, G = ep, node_size
    N, e = P // G, num_experts // P
    flat = flat_rows(ids_per_rank, num_experts, P)
    dedup = torch.zeros(P, P, dtype=torch.int64)
    net = torch.zeros(P, P, dtype=torch.int64)
    nvl = torch.zeros(P, P, dtype=torch.int64)
    local = torch.arange(G)
    for src, ids in enumerate(ids_per_rank):
        hot = _touch(ids, e, P)
        per_rank = hot.sum(0)                                  # [P] rows per destination rank
        per_node = hot.view(-1, N, G).any(2).sum(0)            # [N] tokens per dest node
        dedup[src] += per_rank
        a, g = divmod(src, G)
        for n in range(N):
            dsts = n * G + local
            if n == a:                                         # own node: direct over NVLink
                mask = dsts != src
                nvl[src, dsts[mask]] += per_rank[dsts[mask]]
            else:                                              # network to the rail rank f
                f = n * G + g
                net[src, f] += per_node[n]
                mask = dsts != f                               # f forwards to its node mates
                nvl[f, dsts[mask]] += per_rank[dsts[mask]]
    return {"flat": flat, "dedup": dedup, "net": net, "nvl": nvl}


def expected_scheme_rows(p: Problem) -> Dict[str, torch.Tensor]:
    """Expected rows per rank pair under uniform routing (closed forms of the docstring)."""
    P, G, N, E, k, T = p.ep, p.node_size, p.nodes, p.experts, p.top_k, p.tokens
    e, e_n = E // P, E // N
    q_r = 1 - math.comb(E - e, k) / math.comb(E, k)
    q_n = 1 - math.comb(E - e_n, k) / math.comb(E, k)
    node = torch.arange(P) // G
    same = node[:, None] == node[None, :]
    eye = torch.eye(P, dtype=torch.bool)
    if p.max_tokens_per_rank is not None:
        flat = torch.full((P, P), float(p.max_tokens_per_rank * min(k, e)), dtype=torch.float64)
    else:
        flat = torch.full((P, P), T * k / P, dtype=torch.float64)
    dedup = torch.full((P, P), T * q_r, dtype=torch.float64)
    rail = (torch.arange(P) % G)[:, None] == (torch.arange(P) % G)[None, :]
    net = torch.where(rail & ~same, T * q_n, 0.0).double()
    nvl = torch.where(same & ~eye, T * N * q_r, 0.0).double()
    return {"flat": flat, "dedup": dedup, "net": net, "nvl": nvl}


# ------------------------------------------------------------------------------------------
# bytes per exchange

def flat_exchanges(rows: torch.Tensor, p: Problem) -> Dict[str, torch.Tensor]:
    """Bytes matrix [P, P] (i → j) of each exchange moe_plugin.comm.dispatch makes for one
    layer."""
    rp, ry = packed_row_bytes(p.d, p.dtype_bytes), p.d * p.dtype_bytes
    P = rows.shape[0]
    counts = torch.full((P, P), 0 if p.max_tokens_per_rank is not None else 8,
                        dtype=rows.dtype)
    return {"count": counts, "dispatch": rows * rp, "combine": rows.T * ry,
            "combine_bwd": rows * ry, "dispatch_bwd": rows.T * rp}


def dedup_exchanges(rows: torch.Tensor, p: Problem) -> Dict[str, torch.Tensor]:
    """Bytes of the one-row-per-(token, rank) variant (row formats in the docstring)."""
    rm = dedup_row_bytes(p.d, p.dtype_bytes, p.top_k, 8)
    rg = dedup_row_bytes(p.d, p.dtype_bytes, p.top_k, 4)
    ry = p.d * p.dtype_bytes
    return {"dispatch": rows * rm, "combine": rows.T * ry, "combine_bwd": rows * ry,
            "dispatch_bwd": rows.T * rg}


def hier_exchanges(net: torch.Tensor, nvl: torch.Tensor, p: Problem):
    """Per phase, the (first stage, second stage) bytes matrices of the hierarchical scheme."""
    net_b, nvl_b = dedup_exchanges(net, p), dedup_exchanges(nvl, p)
    return {"dispatch": (net_b["dispatch"], nvl_b["dispatch"]),          # network, then NVLink
            "combine": (nvl_b["combine"], net_b["combine"]),             # reduce in node first
            "combine_bwd": (net_b["combine_bwd"], nvl_b["combine_bwd"]),
            "dispatch_bwd": (nvl_b["dispatch_bwd"], net_b["dispatch_bwd"])}


# ------------------------------------------------------------------------------------------
# time

def tier_matrix(ep: int, node_size: int) -> torch.Tensor:
    """[P, P]: 0 self, 1 NVLink (same node), 2 network."""
    node = torch.arange(ep) // node_size
    t = torch.where(node[:, None] == node[None, :], 1, 2)
    t.fill_diagonal_(0)
    return t


def tier_volumes(bytes_mat: torch.Tensor, node_size: int) -> torch.Tensor:
    """float64 [P, 3, 2]: per rank and tier (self, NVLink, network), bytes (sent, received)."""
    P = bytes_mat.shape[0]
    tiers = tier_matrix(P, node_size)
    b = bytes_mat.double()
    out = torch.zeros(P, 3, 2, dtype=torch.float64)
    for t in range(3):
        m = torch.where(tiers == t, b, 0.0)
        out[:, t, 0], out[:, t, 1] = m.sum(1), m.sum(0)
    return out


def exchange_time(bytes_mat: torch.Tensor, node_size: int, links: Links) -> dict:
    """Predicted seconds of one all-to-all with this bytes matrix (docstring, "Tiers and time").
    Returns ``time`` and the per-tier times of the slowest rank."""
    vol = tier_volumes(bytes_mat, node_size).amax(2)         # [P, 3]: max(sent, received)
    self_v, nvl_v, net_v = vol[:, 0], vol[:, 1], vol[:, 2]
    if links.self_on_nvlink:
        nvl_v, self_v = nvl_v + self_v, torch.zeros_like(self_v)
    def tier(v, latency_us, GBps):
        return torch.where(v > 0, latency_us * 1e-6 + v / (GBps * 1e9), 0.0)
    t_nvl = tier(nvl_v, links.nvlink_latency_us, links.nvlink_GBps)
    t_net = tier(net_v, links.net_latency_us, links.net_GBps)
    t_self = self_v / (links.self_GBps * 1e9) if links.self_GBps else torch.zeros_like(self_v)
    per_rank = torch.stack([t_self, t_nvl, t_net], 1)       # [P, 3]
    worst = per_rank.amax(1).argmax()
    return {"time": per_rank.amax(1).max().item(), "self": per_rank[worst, 0].item(),
            "nvlink": per_rank[worst, 1].item(), "net": per_rank[worst, 2].item()}


def staged_time(stages, node_size: int, links: Links, pipelined: bool) -> float:
    ts = [exchange_time(s, node_size, links)["time"] for s in stages]
    return max(ts) if pipelined else sum(ts)


def max_rank_bytes(bytes_mat: torch.Tensor, node_size: int, tier: int) -> float:
    """Largest max(sent, received) over ranks on one tier (1 NVLink, 2 network)."""
    return tier_volumes(bytes_mat, node_size)[:, tier].amax(1).max().item()


# ------------------------------------------------------------------------------------------
# check against the committed 2×H200 results

def local_pass_seconds(p: Problem, what: str, hbm_TBps: float) -> float:
    """The pack (dispatch) or k-way sum (combine) memory pass, read + write bytes / H."""
    s_send, yb = p.tokens * p.top_k, p.d * p.dtype_bytes
    if what == "dispatch":
        nbytes = s_send * (yb + packed_row_bytes(p.d, p.dtype_bytes))
    else:
        nbytes = s_send * yb + p.tokens * yb
    return nbytes / (hbm_TBps * 1e12)


def check_measured(path: str = RESULTS_2GPU, hbm_TBps: float = H100_COPY_TBPS) -> dict:
    """Predict each exchange figure of the 2-GPU benchmark; the only inputs taken from
    measurements are the NVLink bandwidth (model A: fine_30b's raw dispatch all-to-all) or
    bandwidth + latency (model B: the two raw dispatch all-to-alls), stated in the output."""
    data = json.load(open(path))
    rows = {r["config"]: r for r in data["rows"]}
    probs, remote = {}, {}
    for name, r in rows.items():
        p = Problem(r["tokens_per_rank"], r["D"], r["E"], r["k"], r["ep"], ranks_per_node=8)
        probs[name] = p
        # remote bytes of the raw dispatch (expected rows, uniform routing), packed rows
        ex = flat_exchanges(expected_scheme_rows(p)["flat"], p)
        remote[name] = max_rank_bytes(ex["dispatch"], p.node_size, 1)
    # model A: B from fine_30b's raw dispatch, no latency
    fa = rows["fine_30b"]
    b_a = remote["fine_30b"] / (fa["raw_dispatch_ms"] * 1e-3) / 1e9
    # model B: B and alpha through both raw dispatch points
    fm = rows["mixtral"]
    dt = (fa["raw_dispatch_ms"] - fm["raw_dispatch_ms"]) * 1e-3
    b_b = (remote["fine_30b"] - remote["mixtral"]) / dt / 1e9
    alpha_b = fa["raw_dispatch_ms"] * 1e-3 - remote["fine_30b"] / (b_b * 1e9)
    models = {"A": Links(nvlink_GBps=b_a),
              "B": Links(nvlink_GBps=b_b, nvlink_latency_us=alpha_b * 1e6)}
    table = []
    for name, p in probs.items():
        r = rows[name]
        ex = flat_exchanges(expected_scheme_rows(p)["flat"], p)
        for label, key, phase, local in (
                ("raw dispatch a2a", "raw_dispatch_ms", "dispatch", None),
                ("raw combine a2a", "raw_combine_ms", "combine", None),
                ("dispatch (pack + a2a)", "dispatch_ms", "dispatch", "dispatch"),
                ("combine (a2a + k-sum)", "combine_ms", "combine", "combine"),
                ("a2a per fwd+bwd (bench: 2·(raw d + raw c))", "a2a_ms_per_fwd_bwd", None, None),
                ("layout (sort + count a2a + sync)", "layout_ms", "count", None)):
            row = {"config": name, "figure": label, "measured_ms": r[key]}
            for m, links in models.items():
                if phase is None:
                    t = sum(exchange_time(ex[ph], p.node_size, links)["time"] for ph in PHASES)
                else:
                    t = exchange_time(ex[phase], p.node_size, links)["time"]
                if local:
                    t += local_pass_seconds(p, local, hbm_TBps)
                row[f"model_{m}_ms"] = t * 1e3
                row[f"err_{m}"] = t * 1e3 / r[key] - 1
            row["fit"] = {"raw_dispatch_ms": "A,B" if name == "fine_30b" else "B"}.get(key, "")
            table.append(row)
    meta = {"source": os.path.relpath(path, os.path.dirname(HERE)), "device": data["meta"],
            "model_A": {"nvlink_GBps": b_a, "from": "fine_30b raw_dispatch_ms"},
            "model_B": {"nvlink_GBps": b_b, "latency_us": alpha_b * 1e6,
                        "from": "fine_30b and mixtral raw_dispatch_ms"},
            "hbm_TBps": hbm_TBps,
            "remote_bytes_per_rank": remote,
            "rank0_rows": {n: {"sent": rows[n]["dispatch_GBps"] * rows[n]["dispatch_ms"] * 1e6
                               / packed_row_bytes(p.d, 2),
                               "received": rows[n]["combine_GBps"] * rows[n]["combine_ms"] * 1e6
                               / (p.d * 2), "expected": p.tokens * p.top_k}
                           for n, p in probs.items()}}
    return {"meta": meta, "rows": table}


def check_markdown(res: dict) -> str:
    m = res["meta"]
    out = [f"Model vs. `{m['source']}` ({m['device']['gpus']}× {m['device']['device']}). "
           f"Model A: B_nvlink = {m['model_A']['nvlink_GBps']:.1f} GB/s (remote bytes / "
           f"{m['model_A']['from']}), no latency. Model B: B_nvlink = "
           f"{m['model_B']['nvlink_GBps']:.1f} GB/s, alpha = {m['model_B']['latency_us']:.1f} us "
           f"({m['model_B']['from']}). Local passes at {m['hbm_TBps']:.2f} TB/s (H100 copy).",
           "", "| config | figure | measured ms | model A ms (err) | model B ms (err) |",
           "|---|---|---|---|---|"]
    for r in res["rows"]:
        cells = []
        for k in "AB":
            fit = k in r["fit"].split(",") if r["fit"] else False
            err = "fitted" if fit else f"{r['err_' + k]:+.1%}"
            cells.append(f"{r['model_' + k + '_ms']:.3f} ({err})")
        out.append(f"| {r['config']} | {r['figure']} | {r['measured_ms']:.3f} | "
                   f"{cells[0]} | {cells[1]} |")
    return "\n".join(out) + "\n"


def predict_bench_ep(check: dict, eps=(2, 4, 8), path: str = RESULTS_2GPU) -> List[dict]:
    """Predictions of bench_ep.py's raw all-to-alls on P GPUs of one node (same tokens per
    rank), with model B's link figures, for both treatments of the self chunk."""
    mb = check["meta"]["model_B"]
    out = []
    for r in json.load(open(path))["rows"]:
        for P in eps:
            if r["E"] % P:
                continue
            p = Problem(r["tokens_per_rank"], r["D"], r["E"], r["k"], P, ranks_per_node=8)
            ex = flat_exchanges(expected_scheme_rows(p)["flat"], p)
            row = {"config": r["config"], "P": P}
            for label, shared in (("self_free", False), ("self_shared", True)):
                links = Links(nvlink_GBps=mb["nvlink_GBps"] * (2 if shared else 1),
                              nvlink_latency_us=mb["latency_us"], self_on_nvlink=shared)
                for ph in ("dispatch", "combine"):
                    row[f"raw_{ph}_ms_{label}"] = exchange_time(ex[ph], 8, links)["time"] * 1e3
            out.append(row)
    return out


def predict_markdown(rows: List[dict]) -> str:
    out = ["Predicted raw all-to-all of bench_ep.py on P GPUs of one node (model B; `self "
           "free`: B_nvlink applies to the remote bytes; `self shared`: the P = 2 rate, "
           "2·B_nvlink, applies to all bytes including the self chunk).", "",
           "| config | P | raw dispatch ms self free / shared | raw combine ms self free / "
           "shared |", "|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['config']} | {r['P']} | {r['raw_dispatch_ms_self_free']:.3f} / "
                   f"{r['raw_dispatch_ms_self_shared']:.3f} | {r['raw_combine_ms_self_free']:.3f}"
                   f" / {r['raw_combine_ms_self_shared']:.3f} |")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------
# simulation: flat vs. hierarchical

SIM_CONFIGS = {  # name: (tokens per rank, D, E, k, routing options)
    "deepseek_like": (4096, 7168, 256, 8, {}),
    "deepseek_like_4of8_groups": (4096, 7168, 256, 8, {"num_groups": 8, "group_topk": 4}),
    "deepseek_like_skew0.2": (4096, 7168, 256, 8, {"skew": 0.2}),
    "coarse_120b": (4096, 4096, 64, 4, {}),
}


def layer_times(p: Problem, rows: Dict[str, torch.Tensor], links: Links) -> dict:
    """Per scheme: one dispatch's bytes per rank (max over ranks; network / NVLink) and time,
    and the layer's fwd+bwd all-to-all time (sum of the four exchanges)."""
    G = p.node_size
    fl = flat_exchanges(rows["flat"], p)
    dd = dedup_exchanges(rows["dedup"], p)
    hi = hier_exchanges(rows["net"], rows["nvl"], p)
    res = {}
    for name, ex in (("flat", fl), ("dedup", dd)):
        res[name] = {"net_MB": max_rank_bytes(ex["dispatch"], G, 2) / 1e6,
                     "nvl_MB": max_rank_bytes(ex["dispatch"], G, 1) / 1e6,
                     "dispatch_ms": exchange_time(ex["dispatch"], G, links)["time"] * 1e3,
                     "layer_ms": sum(exchange_time(ex[ph], G, links)["time"]
                                     for ph in PHASES) * 1e3}
    net_d, nvl_d = hi["dispatch"]
    res["hier"] = {"net_MB": max_rank_bytes(net_d, G, 2) / 1e6,
                   "nvl_MB": max_rank_bytes(nvl_d, G, 1) / 1e6,
                   "dispatch_ms": staged_time(hi["dispatch"], G, links, True) * 1e3,
                   "dispatch_seq_ms": staged_time(hi["dispatch"], G, links, False) * 1e3,
                   "layer_ms": sum(staged_time(hi[ph], G, links, True) for ph in PHASES) * 1e3,
                   "layer_seq_ms": sum(staged_time(hi[ph], G, links, False)
                                       for ph in PHASES) * 1e3}
    return res


def simulate(links: Links, eps=(8, 16, 32, 64), node_size: int = 8, configs=None,
             seed: int = 0) -> List[dict]:
    out = []
    for name in configs or SIM_CONFIGS:
        T, D, E, k, opts = SIM_CONFIGS[name]
        bias = expert_bias(E, seed=seed + 1)
        for P in eps:
            p = Problem(T, D, E, k, P, ranks_per_node=node_size)
            gen = torch.Generator().manual_seed(seed + 1000 * P)
            ids = [sample_routing(T, E, k, gen, bias=bias, **opts) for _ in range(P)]
            srows = scheme_rows(ids, E, P, p.node_size)
            sim = layer_times(p, srows, links)
            row = {"config": name, "P": P, "nodes": p.nodes, "T": T, "D": D, "E": E, "k": k,
                   "imbalance": expert_load_imbalance(ids, E),
                   "rank_imbalance": rank_load_imbalance(srows["flat"]), "sim": sim}
            if not opts:
                row["expected"] = layer_times(p, expected_scheme_rows(p), links)
            out.append(row)
    return out


def simulate_markdown(rows: List[dict], links: Links) -> str:
    out = [f"Links: NVLink {links.nvlink_GBps:.0f} GB/s per GPU, network {links.net_GBps:.0f} "
           f"GB/s per GPU, latency {links.nvlink_latency_us:.0f} / {links.net_latency_us:.0f} "
           f"us per exchange; bf16; 8 GPUs per node. Bytes: one forward dispatch, per rank "
           f"(max over ranks, max of sent and received). Times: sampled routing (max over "
           f"ranks); `exp` = closed form (uniform routing).", "",
           "| config | P | max/mean load expert / rank | flat net / NVL MB | dedup net / NVL MB | "
           "hier net / NVL MB | dispatch ms flat / dedup / hier (seq) | layer a2a ms "
           "fwd+bwd flat / dedup / hier (seq) | flat / hier |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["sim"]
        f, d, h = s["flat"], s["dedup"], s["hier"]
        e = r.get("expected")
        exp = f" (exp {e['flat']['layer_ms']:.2f} / {e['dedup']['layer_ms']:.2f} / " \
              f"{e['hier']['layer_ms']:.2f})" if e else ""
        out.append(
            f"| {r['config']} | {r['P']} | {r['imbalance']:.2f} / {r['rank_imbalance']:.2f} | "
            f"{f['net_MB']:.0f} / "
            f"{f['nvl_MB']:.0f} | {d['net_MB']:.0f} / {d['nvl_MB']:.0f} | {h['net_MB']:.0f} / "
            f"{h['nvl_MB']:.0f} | {f['dispatch_ms']:.2f} / {d['dispatch_ms']:.2f} / "
            f"{h['dispatch_ms']:.2f} ({h['dispatch_seq_ms']:.2f}) | {f['layer_ms']:.2f} / "
            f"{d['layer_ms']:.2f} / {h['layer_ms']:.2f} ({h['layer_seq_ms']:.2f}){exp} | "
            f"{f['layer_ms'] / h['layer_ms']:.2f}x |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="model vs. the 2×H200 results")
    ap.add_argument("--simulate", action="store_true", help="flat vs. hierarchical, P=8..64")
    ap.add_argument("--results", default=RESULTS_2GPU)
    ap.add_argument("--net-GBps", type=float, default=50.0,
                    help="network bandwidth per GPU (400 Gb/s NIC = 50 GB/s)")
    ap.add_argument("--nvlink-GBps", type=float, default=None,
                    help="NVLink all-to-all bandwidth per GPU (default: model B's fit)")
    ap.add_argument("--eps", type=int, nargs="*", default=[8, 16, 32, 64])
    ap.add_argument("--configs", nargs="*", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {}
    check = check_measured(args.results)
    if args.check or not args.simulate:
        out["check"] = check
        out["predict_bench_ep"] = predict_bench_ep(check, path=args.results)
        print(check_markdown(check))
        print(predict_markdown(out["predict_bench_ep"]))
    if args.simulate:
        mb = check["meta"]["model_B"]
        links = Links(nvlink_GBps=args.nvlink_GBps or mb["nvlink_GBps"], net_GBps=args.net_GBps,
                      nvlink_latency_us=mb["latency_us"], net_latency_us=mb["latency_us"])
        sim = simulate(links, eps=args.eps, configs=args.configs)
        out["simulate"] = {"links": links.__dict__, "rows": sim}
        print(simulate_markdown(sim, links))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
