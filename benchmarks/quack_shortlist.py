"""Shortlists for QuACK's autotuner (SonicMoE's GEMMs) from its own earlier tuning results.

On a fresh machine QuACK compiles every candidate configuration of every GEMM it autotunes
(9 to 22 per GEMM, six GEMMs a layer): more than a device call's 10 minutes per config. Its
tuning results (``*.autotune.json`` under ``QUACK_CACHE_DIR``: each candidate's measured time,
keyed by the GEMM's arguments) say which candidates win for each GEMM *role*: the function and
the non-shape part of the key (flags, operand strides and dtypes), e.g. "GEMM2" is
``gemm_tuned`` with A ``[2, 1]`` and B ``[2, 1, 2]`` strides whatever the shapes.

``restrict(top)`` makes the autotuner consider, for a role some result file covers, only the
union of the ``top`` fastest candidates of each such file (so a shorter tuning, not a fixed
choice: the shortlist is still timed on the shape at hand); roles no file covers keep every
candidate. What it did is in ``applied`` (one entry per tuned call) for the benchmark's output.
A shortlist changes QuACK's cache key, so the full tunings already on disk are not reused under
it: run fully tuned configs without it.
"""
import glob
import json
import os

SUFFIX = ".autotune.json"
applied = []


def role(fn_name, key):
    """The role of an autotuning key: the function's name and the key's non-shape parts."""
    return (fn_name,) + tuple(str(p) for p in key if not str(p).startswith("torch.Size("))


def shortlists(cache_dir, top):
    """``{role: [config string, ...]}``: per role the union, in order, of the ``top`` fastest
    candidates of every result file under ``cache_dir``."""
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    lists = {}
    for path in sorted(glob.glob(os.path.join(cache_dir, "**", "*" + SUFFIX), recursive=True)):
        with open(path) as fh:
            data = json.load(fh)
        fn_name = os.path.basename(path)[:-len(SUFFIX)]
        timed = sorted(data["configs_timings"], key=lambda ct: ct[1][0])
        names = lists.setdefault(role(fn_name, data["key"]), [])
        names.extend(c for c, _ in timed[:top] if c not in names)
    return lists


def _key(tuner, kwargs):
    """The autotuning key of the call being tuned, as ``quack.autotuner.Autotuner`` forms it."""
    import torch
    args = {k: v for k, v in {**tuner.nargs, **kwargs}.items() if k in tuner.arg_names}
    key = [str(args[k]) for k in tuner.keys if k in args]
    for v in args.values():
        if isinstance(v, torch.Tensor):
            key += [str(v.shape), str([s if s in {0, 1} else 2 for s in v.stride()]),
                    str(v.dtype)]
    return key


def restrict(top, cache_dir=None):
    """Restrict QuACK's autotuner to the shortlists of ``cache_dir`` (default
    ``QUACK_CACHE_DIR``) for the rest of the process."""
    from quack.autotuner import Autotuner
    cache_dir = cache_dir or os.environ.get("QUACK_CACHE_DIR")
    if not cache_dir or not os.path.isdir(cache_dir):
        raise ValueError(f"cache_dir: no QuACK cache folder to shortlist from ({cache_dir!r})")
    lists = shortlists(cache_dir, top)
    full = Autotuner.prune_configs

    def prune_configs(self, kwargs):
        configs = full(self, kwargs)
        fn_role = role(self.fn.__name__, _key(self, kwargs))
        keep = set(lists.get(fn_role, ()))
        chosen = [c for c in configs if str(c) in keep] or configs
        applied.append({"fn": self.fn.__name__, "role": list(fn_role[1:]),
                         "candidates": len(configs), "timed": len(chosen)})
        return chosen

    Autotuner.prune_configs = prune_configs
    return lists
