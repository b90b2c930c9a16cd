"""Fingerprints of the GPU code Triton generated: one hash per compiled kernel, source
locations left out, so that a restructuring that moves code between files (but does not change
what it computes) can be checked to leave the generated code unchanged.

Run the GPU tests with a fresh cache, then fingerprint it::

    TRITON_CACHE_DIR=/tmp/tc pytest -m gpu tests
    python benchmarks/kernel_fingerprint.py /tmp/tc > before.json
    ...  # restructure, run again into a second cache
    python benchmarks/kernel_fingerprint.py /tmp/tc2 > after.json
    python benchmarks/kernel_fingerprint.py --compare before.json after.json

The fingerprint of a kernel is the SHA-256 of its PTX with the ``.file`` / ``.loc`` directives
and the DWARF sections removed (they name source files and lines). Kernels are keyed by their
entry name; a name maps to the sorted list of hashes of all its specialisations.
"""
import argparse
import hashlib
import json
import os
import re
import sys

_ENTRY = re.compile(r"\.entry\s+([A-Za-z_][A-Za-z0-9_$]*)")


def normalise_ptx(text: str) -> str:
    """PTX without source locations: drops ``.file``/``.loc`` lines and everything from the
    first DWARF ``.section`` on."""
    cut = text.find(".section\t.debug")
    if cut < 0:
        cut = text.find(".section .debug")
    if cut >= 0:
        text = text[:cut]
    keep = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(".file") or s.startswith(".loc") or s.startswith("//"):
            continue
        keep.append(line.rstrip())
    return "\n".join(keep)


def fingerprint(cache_dir: str) -> dict:
    """``{entry name: sorted unique hashes}`` over every ``*.ptx`` file under ``cache_dir``."""
    out: dict = {}
    for root, _, files in os.walk(cache_dir):
        for f in files:
            if not f.endswith(".ptx"):
                continue
            with open(os.path.join(root, f), encoding="utf-8", errors="replace") as fh:
                text = fh.read()
            m = _ENTRY.search(text)
            name = m.group(1) if m else f[:-4]
            h = hashlib.sha256(normalise_ptx(text).encode()).hexdigest()[:16]
            out.setdefault(name, set()).add(h)
    return {k: sorted(v) for k, v in sorted(out.items())}


def compare(a: dict, b: dict, subset: bool = False) -> list:
    """Lines describing every difference between two fingerprints (empty: identical). With
    ``subset``, only what ``a`` has and ``b`` lacks counts (``a`` from a subset of the tests
    ``b`` ran)."""
    diffs = []
    for name in sorted(set(a) | set(b)):
        ha, hb = set(a.get(name, [])), set(b.get(name, []))
        if (ha - hb) if subset else (ha != hb):
            diffs.append(f"{name}: only before {sorted(ha - hb)}, only after {sorted(hb - ha)}")
    return diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="a Triton cache directory, or with --compare two "
                   "fingerprint JSON files")
    p.add_argument("--compare", action="store_true")
    p.add_argument("--subset", action="store_true",
                   help="with --compare: every specialisation of the first must be in the second")
    p.add_argument("--only", default=None,
                   help="with --compare: only kernel names starting with this prefix")
    args = p.parse_args(argv)
    if args.compare:
        if len(args.paths) != 2:
            p.error("--compare takes two fingerprint files")
        a, b = (json.load(open(x)) for x in args.paths)
        if args.only:
            a, b = ({k: v for k, v in d.items() if k.startswith(args.only)} for d in (a, b))
        diffs = compare(a, b, args.subset)
        n = sum(len(v) for v in a.values())
        print(f"{len(a)} kernels, {n} specialisations before; "
              f"{len(b)} kernels, {sum(len(v) for v in b.values())} after; "
              f"{len(diffs)} differing kernel names")
        for d in diffs:
            print(" ", d)
        return 1 if diffs else 0
    if len(args.paths) != 1:
        p.error("give one cache directory")
    json.dump(fingerprint(args.paths[0]), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
