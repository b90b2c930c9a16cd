"""A model of the row-grouped Gluon kernel's ring protocol (``gluon_gemm._grouped_mm_ws``, 16-bit
path), run under random interleavings to check its synchronisation without a GPU.

Modelled: per CTA a producer and two consumers; per ring slot the mbarriers ``ready`` (the
producer's ``expect`` plus the bytes landing), ``empty`` (the slot's consumers' releases) and, in
a cluster of two CTAs, the shared ``m_empty`` held by the first CTA (every consumer's release in
both CTAs; waited for only by the first CTA's producer, which loads the shared operand into both
CTAs). An mbarrier completes a phase when its pending arrivals and bytes reach zero; a wait on
parity P passes while the barrier's current phase has the other parity (PTX ``try_wait.parity``:
a wait two phases ahead passes too). Consumers release a slot one k-step late (one MMA in
flight). With ``pingpong`` each consumer takes every other tile, skipping the other's k-steps;
``ordered`` adds the kernel's ``turn`` hand-over between their main loops.

Checked, for every interleaving drawn: a consumer never reads a slot before its data for that
k-step landed, no load overwrites a slot a consumer is reading, no barrier gets more arrivals
than its count, no deadlock.

Also modelled: the TMA-store epilogue's two buffers (``store_parts``).

    python benchmarks/ring_model.py              # the kernel's protocols: all pass
    python benchmarks/ring_model.py --unordered  # ping-pong without the turns: fails
"""
import argparse
import random


class Barrier:
    """An mbarrier: ``count`` arrivals and the expected bytes complete a phase."""

    def __init__(self, count):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0

    def arrive(self):
        self.pending -= 1
        if self.pending < 0:
            raise AssertionError("more arrivals than the barrier's count")
        self._complete()

    def expect(self, nbytes):  # arrive.expect_tx: one arrival, nbytes to land
        self.tx += nbytes
        self.arrive()

    def land(self, nbytes):  # complete_tx of a copy
        self.tx -= nbytes
        self._complete()

    def _complete(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count

    def passed(self, parity):
        """``try_wait.parity``: true while the current phase's parity is not ``parity``."""
        return (self.phase & 1) != parity


def run(seed, *, stages, nk, tiles, pingpong, cluster, ordered):
    """One random interleaving; raises AssertionError on a violation. Returns the steps."""
    rnd = random.Random(seed)
    ctas = 2 if cluster else 1
    per_slot = 1 if pingpong else 2  # the consumers that release a slot use
    ready = [[Barrier(1) for _ in range(stages)] for _ in range(ctas)]
    empty = [[Barrier(per_slot) for _ in range(stages)] for _ in range(ctas)]
    m_empty = [Barrier(per_slot * ctas) for _ in range(stages)]
    turn = [[Barrier(1), Barrier(1)] for _ in range(ctas)]
    # per slot and part ("own", "shared"): the (tile, k-step) whose data landed there
    landed = [[{} for _ in range(stages)] for _ in range(ctas)]
    reading = [[set() for _ in range(stages)] for _ in range(ctas)]

    def producer(c):
        it = 0
        for t in range(tiles):
            for ks in range(nk):
                s, par = it % stages, ((it // stages) & 1) ^ 1
                while not empty[c][s].passed(par):
                    yield
                if cluster and c == 0:
                    while not m_empty[s].passed(par):
                        yield
                if reading[c][s]:
                    raise AssertionError(f"CTA {c} slot {s} reloaded while read")
                landed[c][s].pop("own", None)
                ready[c][s].expect(2 if cluster else 1)  # own part (+ the shared one)
                yield
                landed[c][s]["own"] = (t, ks)
                ready[c][s].land(1)
                if cluster and c == 0:  # the shared part, multicast into both CTAs
                    for d in range(ctas):
                        if reading[d][s]:
                            raise AssertionError(f"multicast into CTA {d} slot {s} while read")
                        landed[d][s]["shared"] = (t, ks)
                        ready[d][s].land(1)
                it += 1

    def release(c, s):
        empty[c][s].arrive()
        if cluster:
            m_empty[s].arrive()

    def consumer(c, h):
        it, mine = 0, 0
        for t in range(tiles):
            if pingpong and t % 2 != h:
                it += nk  # the other consumer's tile
                continue
            if pingpong and ordered:
                while not turn[c][h].passed((mine & 1) ^ (1 - h)):
                    yield
            prev = None
            for ks in range(nk):
                s = it % stages
                while not ready[c][s].passed((it // stages) & 1):
                    yield
                parts = ("own", "shared") if cluster else ("own",)
                if any(landed[c][s].get(part) != (t, ks) for part in parts):
                    raise AssertionError(f"CTA {c} consumer {h} read slot {s} for {(t, ks)}: "
                                         f"it holds {landed[c][s]}")
                reading[c][s].add(h)
                yield  # the MMA runs
                if prev is not None:
                    reading[c][prev].discard(h)
                    release(c, prev)
                prev = s
                it += 1
            if pingpong and ordered:
                turn[c][1 - h].arrive()
                mine += 1
            yield
            reading[c][prev].discard(h)
            release(c, prev)

    procs = [producer(c) for c in range(ctas)] + [consumer(c, h) for c in range(ctas)
                                                  for h in (0, 1)]
    steps = 0
    while procs:
        p = rnd.choice(procs)
        steps += 1
        try:
            next(p)
        except StopIteration:
            procs.remove(p)
        if steps > 100 * (tiles * nk + 10) * len(procs or [1]) * 10:
            raise AssertionError("deadlock")
    return steps


def check(*, seeds, ordered=True, stages=3, tiles=6, nks=(1, 2, 3, 4, 7, 12)):
    """Every protocol of the kernel (cooperative or ping-pong consumers, one CTA or a cluster
    of two) under ``seeds`` interleavings per k-step count; returns the failures."""
    failures = []
    for pingpong in (False, True):
        for cluster in (False, True):
            for nk in nks:
                for seed in range(seeds):
                    try:
                        run(seed, stages=stages, nk=nk, tiles=tiles, pingpong=pingpong,
                            cluster=cluster, ordered=ordered)
                    except AssertionError as ex:
                        failures.append((pingpong, cluster, nk, seed, str(ex)))
                        break
    return failures


def store_parts(tiles, parts=4, partial_waits_all=True):
    """The TMA-store epilogue in column parts (``gluon_gemm._tma_store_part``): one consumer's
    parts go through two buffers in turn (part j of all parts so far: buffer j % 2); a part
    whose rows are all inside the expert's (``tiles[i]`` True) waits until at most one bulk
    store is still reading shared memory (``store_wait(1)``) and issues one; a part across an
    expert's end waits for all (``store_wait(0)``; False: ``store_wait(1)`` too) and stores
    without TMA. Worst case: a store finishes reading only when a wait forces it. Returns the
    first (tile, part) that overwrites a buffer a pending store still reads, or None."""
    pending = []  # the buffers of the stores issued and not yet known done, oldest first
    j = 0
    for i, full in enumerate(tiles):
        for part in range(parts):
            keep = 1 if full or not partial_waits_all else 0
            pending = pending[len(pending) - keep:] if len(pending) > keep else pending
            if j % 2 in pending:
                return i, part
            if full:
                pending.append(j % 2)
            j += 1
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unordered", action="store_true",
                    help="ping-pong consumers without the turn hand-over")
    ap.add_argument("--seeds", type=int, default=500)
    args = ap.parse_args()
    failures = check(seeds=args.seeds, ordered=not args.unordered)
    for pingpong, cluster, nk, seed, msg in failures:
        print(f"{'ping-pong' if pingpong else 'cooperative'}, "
              f"{'cluster of 2' if cluster else 'one CTA'}, {nk} k-steps, seed {seed}: {msg}")
    print("all interleavings passed" if not failures else f"{len(failures)} protocol(s) failed")


if __name__ == "__main__":
    main()
