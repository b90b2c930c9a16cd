"""``benchmarks/ring_model.py``: the row-grouped Gluon kernel's ring protocol, modelled and run
under random interleavings (no GPU): the protocols the kernel uses hold, and the model finds the
hazard the ping-pong consumers' turns exist for."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import ring_model as RM  # noqa: E402


def test_the_kernels_ring_protocols_hold():
    """Cooperative and ping-pong consumers (their main loops in turn), one CTA and a cluster
    of two with the shared operand multicast by the first CTA: no read before its data landed,
    no reload of a slot being read, no over-arrival, no deadlock, 1 to 12 k-steps a tile."""
    assert RM.check(seeds=60) == []


def test_ping_pong_without_turns_reads_too_early():
    """Without the turn hand-over a ping-pong consumer that skips the other's tile waits on a
    slot's ``ready`` up to two phases ahead, whose parity passes: with as many k-steps a tile as
    ring slots or more it reads data that has not landed (one CTA and in a cluster); with fewer
    the window never opens."""
    failures = RM.check(seeds=60, ordered=False)
    failed = {(pingpong, cluster, nk) for pingpong, cluster, nk, _, _ in failures}
    assert all(pingpong for pingpong, _, _ in failed)
    for cluster in (False, True):
        assert {(True, cluster, nk) for nk in (3, 4, 7, 12)} <= failed
        assert not {(True, cluster, nk) for nk in (1, 2)} & failed


def test_store_parts_buffer_reuse():
    """The TMA-store epilogue in column parts through two buffers per consumer: with a part
    across an expert's end waiting for every pending store, no buffer is overwritten while a
    store still reads it, over every sequence of whole and partial tiles up to 6 long; waiting
    for all but one there too fails (a whole tile's last store still reading the buffer a
    partial tile's second part overwrites)."""
    import itertools
    for n in range(1, 7):
        for tiles in itertools.product((True, False), repeat=n):
            for parts in (2, 4):
                assert RM.store_parts(tiles, parts) is None, (tiles, parts)
    assert RM.store_parts((True, False), 4, partial_waits_all=False) == (1, 1)
    assert RM.store_parts((True, False), 2, partial_waits_all=False) == (1, 1)
