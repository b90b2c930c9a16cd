"""The EP traffic model (benchmarks/ep_traffic_model.py) against what moe_plugin.comm.dispatch
sends.

The byte test runs the real ``ep_experts`` forward and backward for every rank of a small
P-rank problem in one process: ``torch.distributed`` is replaced inside
``moe_plugin.comm.dispatch`` by a stand-in that reports the group size and answers the count
exchange with the other ranks' counts (taken from a first pass of the real
``dispatch_layout``), and the all-to-all backend by one that records the bytes per destination
/ source of every exchange and hands back zero rows of the right shape (received packed rows
marked as padding, so the experts have no work under the interpreter). Received data are not
the other ranks' (this test counts bytes only; the numerics of EP are tests/test_ep.py's)."""
import itertools
import math
import os
import sys

import pytest
import torch

import conftest  # noqa: F401  (sets TRITON_INTERPRET before moe_plugin is imported)
from moe_plugin.autograd.ep_experts import ep_experts
from moe_plugin.comm import dispatch as ep_mod
from moe_plugin.kernels.pack import PackedRows, packed_row_bytes

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import ep_traffic_model as tm  # noqa: E402


class _GroupStandIn:
    """``dist`` as comm/dispatch.py uses it, for virtual rank ``rank`` of ``P``."""

    def __init__(self, P, rank, send_counts=None):
        self.P, self.rank, self.send_counts = P, rank, send_counts
        self.count_bytes = torch.zeros(P, dtype=torch.int64)  # bytes sent per destination

    def get_world_size(self, group=None):
        return self.P

    def get_rank(self, group=None):
        return self.rank

    def all_to_all_single(self, out, inp, output_split_sizes=None, input_split_sizes=None,
                          group=None, async_op=False):
        assert input_split_sizes is None and inp.numel() == self.P  # only the count exchange
        self.count_bytes += inp.element_size()  # one count to every rank
        if self.send_counts is None:
            out.zero_()
        else:
            out.copy_(self.send_counts[:, self.rank])


class _RecordingBackend:
    name = "record"

    def __init__(self, P, d, dtype):
        self.P, self.d, self.dtype, self.log = P, d, dtype, []

    def exchange(self, send, send_splits, recv_splits, group, out=None, async_op=False):
        row_bytes = math.prod(send.shape[1:]) * send.element_size()
        chunk = send.shape[0] // self.P
        ss = send_splits if send_splits is not None else [chunk] * self.P
        rs = recv_splits if recv_splits is not None else [chunk] * self.P
        assert sum(ss) == send.shape[0]
        self.log.append((torch.tensor(ss) * row_bytes, torch.tensor(rs) * row_bytes))
        recv = send.new_zeros((sum(rs),) + tuple(send.shape[1:]))
        if send.dtype == torch.uint8:  # packed rows: received as padding (id -1), which keeps
            PackedRows(recv, self.d, self.dtype).ids.fill_(-1)  # the interpreter quick
        return recv, None


def _routing(P, tokens, E, k, gen):
    ids = []
    for t in tokens:
        ids_r = torch.rand(t, E, generator=gen).topk(k, dim=-1).indices.to(torch.int32)
        if t > 2:
            ids_r[::3, -1] = -1          # unused slots are not sent
        ids.append(ids_r)
    return ids


@pytest.mark.parametrize("max_tokens", [None, 3])
def test_bytes_per_destination_match_ep(monkeypatch, max_tokens):
    P, E, k, D, F = 4, 8, 3, 13, 8  # 2 experts per rank < k; D·4 B = 52 B: row padding
    tokens = [5, 6, 1, 4] if max_tokens is None else [3, 2, 1, 3]
    gen = torch.Generator().manual_seed(7)
    ids = _routing(P, tokens, E, k, gen)
    prob = tm.Problem(tokens=max(tokens), d=D, experts=E, top_k=k, ep=P, ranks_per_node=2,
                      dtype_bytes=4, max_tokens_per_rank=max_tokens)
    model = tm.flat_exchanges(tm.flat_rows(ids, E, P, max_tokens), prob)

    # pass 1: each rank's count vector as the real dispatch_layout computes it
    send_counts = torch.zeros(P, P, dtype=torch.int64)
    if max_tokens is None:
        for r in range(P):
            stand_in = _GroupStandIn(P, r)
            monkeypatch.setattr(ep_mod, "dist", stand_in)
            layout = ep_mod.dispatch_layout(ids[r], E, None)
            send_counts[r] = torch.tensor(layout.send_splits)

    names = ("dispatch", "combine", "combine_bwd", "dispatch_bwd")
    for r in range(P):
        stand_in = _GroupStandIn(P, r, send_counts)
        backend = _RecordingBackend(P, D, torch.float32)
        monkeypatch.setattr(ep_mod, "dist", stand_in)
        monkeypatch.setattr(ep_mod, "get_backend", lambda name: backend)
        x = torch.randn(tokens[r], D, generator=gen, requires_grad=True)
        w = torch.rand(tokens[r], k, generator=gen).requires_grad_()
        w_up = torch.randn(E // P, 2 * F, D, generator=gen, requires_grad=True)
        w_down = torch.randn(E // P, D, F, generator=gen, requires_grad=True)
        out, _ = ep_experts(x, ids[r], w, w_up, w_down, num_experts=E, act=0, gated=True,
                            recompute=False, group=None, max_tokens_per_rank=max_tokens)
        out.backward(torch.randn_like(out))
        assert len(backend.log) == 4, [len(s) for s, _ in backend.log]
        for name, (sent, received) in zip(names, backend.log):
            assert torch.equal(sent, model[name][r]), (r, name, sent, model[name][r])
            assert torch.equal(received, model[name][:, r]), (r, name, received,
                                                              model[name][:, r])
        # the count exchange: 8 bytes to every rank in exact mode, none in fixed-size mode
        assert torch.equal(stand_in.count_bytes, model["count"][r]), stand_in.count_bytes


@pytest.mark.parametrize("d,dtype", [(1, torch.float32), (13, torch.float32), (8, torch.bfloat16),
                                     (7168, torch.bfloat16), (4095, torch.float16),
                                     (4096, torch.float8_e4m3fn)])
def test_packed_row_bytes(d, dtype):
    assert tm.packed_row_bytes(d, dtype.itemsize) == packed_row_bytes(d, dtype)


def _brute_force_rows(ids_per_rank, E, P, G):
    """Per-token loops: every (token, destination rank) pair delivered exactly once."""
    e = E // P
    out = {n: torch.zeros(P, P, dtype=torch.int64) for n in ("flat", "dedup", "net", "nvl")}
    for src, ids in enumerate(ids_per_rank):
        for row in ids.tolist():
            dests = [i // e for i in row if i >= 0]
            for d in dests:
                out["flat"][src, d] += 1
            for n in {d // G for d in set(dests)} - {src // G}:
                out["net"][src, n * G + src % G] += 1
            for d in set(dests):
                out["dedup"][src, d] += 1
                via = src if d // G == src // G else (d // G) * G + src % G
                if via != d:
                    out["nvl"][via, d] += 1
    return out


@pytest.mark.parametrize("P,G,E,k", [(8, 4, 16, 3), (12, 4, 24, 4), (4, 8, 8, 2)])
def test_scheme_rows_match_per_token_count(P, G, E, k):
    gen = torch.Generator().manual_seed(P * 100 + E)
    ids = _routing(P, [9] * P, E, k, gen)
    got = tm.scheme_rows(ids, E, P, min(G, P))
    want = _brute_force_rows(ids, E, P, min(G, P))
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("P,G,E,k", [(4, 2, 8, 3), (8, 4, 16, 2), (6, 2, 12, 4), (4, 4, 8, 3)])
def test_closed_forms_equal_enumeration(P, G, E, k):
    """Every rank routes one token to each k-subset of the experts once: the average over them
    is the uniform-routing expectation exactly."""
    subsets = torch.tensor(list(itertools.combinations(range(E), k)))
    rows = tm.scheme_rows([subsets] * P, E, P, G)
    prob = tm.Problem(tokens=len(subsets), d=8, experts=E, top_k=k, ep=P, ranks_per_node=G)
    expected = tm.expected_scheme_rows(prob)
    for name in rows:
        assert torch.allclose(rows[name].double(), expected[name], rtol=0, atol=1e-9), name


def test_exchange_time_by_hand():
    links = tm.Links(nvlink_GBps=200, net_GBps=50, nvlink_latency_us=10, net_latency_us=20)
    b = torch.zeros(16, 16, dtype=torch.int64)
    b[0, 1] = 10 ** 9          # NVLink: 10 us + 5 ms
    b[0, 8] = 10 ** 8          # network: 20 us + 2 ms
    b[0, 0] = 10 ** 12         # self chunk: free unless it shares NVLink
    assert tm.exchange_time(b, 8, links)["time"] == pytest.approx(5.01e-3, rel=1e-12)
    b[2, 9] = 3 * 10 ** 8      # another rank's network: 20 us + 6 ms bounds the exchange
    assert tm.exchange_time(b, 8, links)["time"] == pytest.approx(6.02e-3, rel=1e-12)
    shared = tm.Links(nvlink_GBps=200, net_GBps=50, self_on_nvlink=True)
    assert tm.exchange_time(b, 8, shared)["time"] == pytest.approx((10 ** 12 + 10 ** 9) / 200e9)


def test_check_reproduces_its_fit_points():
    res = tm.check_measured()
    fitted = [r for r in res["rows"] if r["fit"]]
    assert {(r["config"], r["figure"]) for r in fitted} == {
        ("fine_30b", "raw dispatch a2a"), ("mixtral", "raw dispatch a2a")}
    for r in fitted:
        for m in r["fit"].split(","):
            assert r[f"err_{m}"] == pytest.approx(0, abs=1e-9), (r, m)
