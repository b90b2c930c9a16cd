"""Issue 21's targets from ``bench_layer.py`` JSON files of one GPU: moe_plugin against SonicMoE
(and against the ``torch._grouped_mm`` pipeline on mixtral), per config, beside the floor.

    python benchmarks/peer_targets.py RUN.json... [--md OUT.md] [--json OUT.json] [--png OUT.png]

Each input is one ``bench_layer.py`` run (one process): the plain mode with ``--impls
moe_plugin sonicmoe ...`` (``gpu_check.sh ... peers`` writes one per config) or the ``--router``
mode with SonicMoE (rows ``moe_plugin_router`` and ``sonicmoe_router``). A ratio is formed only
between rows of the same file, so every comparison is of implementations measured in one
process; where several files hold both rows of a target, the last one given is used. A
target whose two rows are not in one file is reported as not measured, never estimated. A
run whose SonicMoE autotuning was shortlisted (``bench_layer.py --quack-top N``) says so in
the run column. The plain mode's extra peak memory is compared only from runs measured after
``bench_layer.time_and_peak`` (metadata ``peak_grads_in_pass``): earlier ones understated
SonicMoE's (``NEEDS_META``).

Targets (``TARGETS``): forward + backward at least 1.1x SonicMoE (1.15x on fine_7b), forward
and backward each at least 1.0x; the router-included layer at least 1.1x SonicMoE's; mixtral
at least 1.15x ``grouped_mm``; extra peak memory at most SonicMoE's; the router at most 3% of
the layer's forward + backward on fine_30b; ``fp8_block_wgrad`` on fine_7b not slower than
bf16. A ratio is the other's time over ours (the same FLOPs: our TFLOP/s over theirs); the
router's share is (router included − routing given) / router included. The floor of a config
is its forward + backward FLOPs (18·T·k·D·F) at the dense bf16 GEMM rate measured in that file.

What the fwd+bwd target asks of the GEMMs (a model on measured inputs, ``floors``): both
implementations make the same separate memory passes besides their GEMMs (``pass_bytes``:
the k-way sums of the forward output and of dx, the SwiGLU backward), taken at the copy rate
measured in that file; what is left of a time is GEMM time, and the floor over it is the
share of the dense rate the GEMMs ran at — ours, SonicMoE's, and what the target needs
(SonicMoE's time over the required ratio, less the passes). SonicMoE fuses its activation
backward into a GEMM, so its share is somewhat overstated and the needed one understated.

``--json`` writes one plain-mode run per config (each row with its run's ceiling) for
``plot_results.py``; ``--png`` draws that chart.
"""
import argparse
import json
import os
import sys

# (name, config or None for all, implementation row, peer row, metric, required ratio)
SPEED = "speed"    # the peer's time over ours
MEMORY = "memory"  # our extra peak memory at most the peer's
SHARE = "share"    # (ours − the peer's) / ours at most the required fraction: the router's part
TARGETS = [
    ("fwd+bwd vs SonicMoE", None, "moe_plugin", "sonicmoe", ("fwd_bwd_ms", SPEED), 1.10),
    ("fwd vs SonicMoE", None, "moe_plugin", "sonicmoe", ("fwd_ms", SPEED), 1.0),
    ("bwd vs SonicMoE", None, "moe_plugin", "sonicmoe", ("bwd_ms", SPEED), 1.0),
    ("router included vs SonicMoE's", None, "moe_plugin_router", "sonicmoe_router",
     ("fwd_bwd_ms", SPEED), 1.10),
    ("fwd+bwd vs grouped_mm", "mixtral", "moe_plugin", "grouped_mm", ("fwd_bwd_ms", SPEED),
     1.15),
    ("extra peak memory vs SonicMoE", None, "moe_plugin", "sonicmoe",
     ("peak_extra_gib", MEMORY), 1.0),
    ("extra peak memory vs SonicMoE's, router included", None, "moe_plugin_router",
     "sonicmoe_router", ("peak_extra_gib", MEMORY), 1.0),
    # the router's share of the layer: the router-included layer against the same layer with
    # the routing given (``bench_layer.py --router``'s two rows of ours)
    ("router share of the layer", "fine_30b", "moe_plugin_router", "moe_plugin_given_routing",
     ("fwd_bwd_ms", SHARE), 0.03),
    # the FP8 path with FP8 weight gradients not slower than bf16 (the row "moe_plugin" is the
    # peer here: its time over fp8_block_wgrad's)
    ("fp8_block_wgrad fwd+bwd vs bf16", "fine_7b", "moe_plugin_fp8w", "moe_plugin",
     ("fwd_bwd_ms", SPEED), 1.0),
]
# targets whose rows are comparable only in runs whose metadata has the key: the plain mode's
# peak memory before ``bench_layer.time_and_peak`` held SonicMoE's own weight copies'
# gradients in the baseline and released them in the pass (its peak understated by them)
NEEDS_META = {"extra peak memory vs SonicMoE": "peak_grads_in_pass"}
# configs with their own fwd+bwd requirement
FWD_BWD_REQUIRED = {"fine_7b": 1.15}


def fwd_bwd_required(config) -> float:
    """The ratio of SonicMoE's fwd+bwd time over ours that ``config`` must reach: its own
    (``FWD_BWD_REQUIRED``), else the target's in ``TARGETS``."""
    return FWD_BWD_REQUIRED.get(config, next(t[-1] for t in TARGETS
                                             if t[0] == "fwd+bwd vs SonicMoE"))
ISSUE_CONFIGS = ["fine_7b", "fine_30b", "coarse_120b", "mixtral", "qwen3_30b_a3b"]


def load(paths):
    """``{config: [(path, meta, {impl: row}), ...]}`` in the order given: each file's
    balanced-routing rows by config."""
    found = {}
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        per_config = {}
        for row in data["rows"]:
            if not row.get("skew"):
                per_config.setdefault(row["config"], {})[row["impl"]] = row
        for config, rows in per_config.items():
            found.setdefault(config, []).append((path, data["meta"], rows))
    return found


def _pairs(runs, mine, peer):
    """Every run (one file, one process) holding both rows, in the order given."""
    return [(path, meta, rows[mine], rows[peer]) for path, meta, rows in runs
            if mine in rows and peer in rows]


def _pair(runs, mine, peer):
    """The last run holding both rows, or None."""
    pairs = _pairs(runs, mine, peer)
    return pairs[-1] if pairs else None


def _judge(kind, a, b, required):
    """(ratio, met) of ours ``a`` against the peer's ``b`` for a target of ``kind``."""
    if kind == SPEED:
        return b / a, b / a >= required
    if kind == SHARE:
        return (a - b) / a, (a - b) / a <= required
    return (a / b if b else None), a <= b * required


def verdicts(found, configs=None):
    """One dict per (config, target): ours, the peer's, the ratio, what is required, and
    ``met`` (True / False, None when the two were not measured in one process), from the last
    run given that holds both; ``others``: the (file, ratio, met) of each earlier such run."""
    out = []
    for config in configs or ISSUE_CONFIGS:
        runs = found.get(config, [])
        for name, only, mine, peer, (key, kind), required in TARGETS:
            if only is not None and config != only:
                continue
            if name == "fwd+bwd vs SonicMoE":
                required = fwd_bwd_required(config)
            res = {"config": config, "target": name, "required": required, "ours": None,
                   "peer": None, "ratio": None, "met": None, "unit": key, "source": None,
                   "others": []}
            pairs = _pairs(runs, mine, peer)
            if name in NEEDS_META:
                usable = [p for p in pairs if p[1].get(NEEDS_META[name])]
                if pairs and not usable:
                    res.update(source=os.path.basename(pairs[-1][0]), comparable=False)
                pairs = usable
            if pairs:
                path, meta, a_row, b_row = pairs[-1]
                a, b = a_row[key], b_row[key]
                ratio, met = _judge(kind, a, b, required)
                res.update(ours=a, peer=b, source=os.path.basename(path), ratio=ratio, met=met,
                           quack_top=meta.get("sonicmoe_quack_top"))
                ra, rb = a_row.get(key + "_rounds"), b_row.get(key + "_rounds")
                if ra and rb and len(ra) == len(rb) > 1:  # --rounds: round i against round i
                    res["round_ratios"] = [_judge(kind, x, y, required)[0]
                                           for x, y in zip(ra, rb)]
                res["others"] = [(os.path.basename(p), *_judge(kind, x[key], y[key], required))
                                 for p, _, x, y in pairs[:-1]]
            out.append(res)
    return out


def pass_bytes(T, D, F, k, elem=2):
    """Bytes of the forward + backward's memory passes outside the GEMMs (16-bit, SwiGLU, S =
    T·k slots): the forward output's and dx's k-way sums (each reads [S, D], writes [T, D])
    and the activation backward (reads pre [S, 2F] and dh [S, F], writes dpre [S, 2F] and the
    weighted h [S, F])."""
    S = T * k
    return elem * (2 * (S * D + T * D) + 6 * S * F)


def floors(found, configs=None):
    """Per config: moe_plugin's forward + backward time (from the run compared with SonicMoE
    when there is one, else the last run with moe_plugin), the floor (its FLOPs at that run's
    dense bf16 rate) and their ratio; where the run measured its copy rate, the memory passes'
    time at it (``pass_bytes``) and the share of the dense rate the GEMMs ran at (``gemm_share``:
    ours, SonicMoE's and the one the fwd+bwd target needs, None without SonicMoE's row)."""
    out = []
    for config in configs or ISSUE_CONFIGS:
        runs = found.get(config, [])
        pair = _pair(runs, "moe_plugin", "sonicmoe")
        with_peer = pair is not None
        pair = pair or _pair(runs, "moe_plugin", "moe_plugin")
        if pair is None:
            continue
        path, meta, row, peer = pair
        flops = 18 * row["T"] * row["k"] * row["D"] * row["F"]
        rate = meta["ceilings"]["bf16_gemm_tflops"]
        floor_ms = flops / rate / 1e9
        f = {"config": config, "ms": row["fwd_bwd_ms"], "floor_ms": floor_ms,
             "of_floor": floor_ms / row["fwd_bwd_ms"], "bf16_tflops": rate,
             "source": os.path.basename(path), "passes_ms": None,
             "gemm_share": {"ours": None, "sonicmoe": None, "needed": None}}
        copy = meta["ceilings"].get("copy_tbps")
        if copy:
            passes = pass_bytes(row["T"], row["D"], row["F"], row["k"]) / copy / 1e9
            f["passes_ms"] = passes

            def share(ms):
                return floor_ms / (ms - passes) if ms > passes else None
            f["gemm_share"]["ours"] = share(row["fwd_bwd_ms"])
            if with_peer:
                f["gemm_share"]["sonicmoe"] = share(peer["fwd_bwd_ms"])
                f["gemm_share"]["needed"] = share(peer["fwd_bwd_ms"] / fwd_bwd_required(config))
        out.append(f)
    return out


def _fmt(value, unit):
    if value is None:
        return "—"
    return f"{value:.2f} GiB" if unit == "peak_extra_gib" else f"{value:.3f} ms"


def markdown(found, configs=None) -> str:
    metas = {f"{m['device']}, torch {m['torch']}, triton {m['triton']}"
             for runs in found.values() for _, m, _ in runs}
    lines = ["Runs: " + "; ".join(sorted(metas)), "",
             "| config | target | moe_plugin | peer | ratio | required | verdict | run |",
             "|---|---|---|---|---|---|---|---|"]
    for v in verdicts(found, configs):
        verdict = {True: "met", False: "missed", None: "not measured"}[v["met"]]
        if v.get("comparable") is False:
            verdict = "not comparable (measured before bench_layer's peak fix)"
        share = v["target"].startswith("router share")

        def fmt(r):
            return "—" if r is None else f"{r:.1%}" if share else f"{r:.2f}"
        ratio = fmt(v["ratio"])
        if v.get("round_ratios"):
            ratio += (f" (rounds {fmt(min(v['round_ratios']))}-"
                      f"{fmt(max(v['round_ratios']))})")
        if v["others"]:  # the same target measured in other runs: each one's ratio shown
            ratio += " (other runs: " + ", ".join(fmt(r) for _, r, _ in v["others"]) + ")"
            if any(m != v["met"] for _, _, m in v["others"]):
                verdict += " here, " + ("missed" if v["met"] else "met") + " in another run"
        need = (f"≤ {v['required']:.0%}" if share
                else f"≤ {v['required']:.2f}x" if v["unit"] == "peak_extra_gib"
                else f"≥ {v['required']:.2f}x")
        lines.append(f"| {v['config']} | {v['target']} | {_fmt(v['ours'], v['unit'])} | "
                     f"{_fmt(v['peer'], v['unit'])} | {ratio} | {need} | {verdict} | "
                     f"{v['source'] or '—'}"
                     + (f" (SonicMoE tuned on shortlists of {v['quack_top']})"
                        if v.get("quack_top") is not None and "SonicMoE" in v["target"]
                        else "") + " |")
    lines += ["", "| config | moe_plugin fwd+bwd | floor (FLOPs at the run's dense bf16 rate) | "
              "floor / ours | memory passes (model, at the run's copy rate) | GEMMs' share of "
              "the dense rate: ours / SonicMoE / needed for the target | run |",
              "|---|---|---|---|---|---|---|"]

    def pct(x):
        return "—" if x is None else f"{x:.0%}"
    for f in floors(found, configs):
        g = f["gemm_share"]
        lines.append(f"| {f['config']} | {f['ms']:.3f} ms | {f['floor_ms']:.3f} ms "
                     f"({f['bf16_tflops']:.0f} TFLOP/s) | {f['of_floor']:.2f} | "
                     + ("—" if f["passes_ms"] is None else f"{f['passes_ms']:.3f} ms")
                     + f" | {pct(g['ours'])} / {pct(g['sonicmoe'])} / {pct(g['needed'])} | "
                     f"{f['source']} |")
    return "\n".join(lines) + "\n"


def router_mode(impl) -> bool:
    """A row of ``bench_layer.py --router`` (or ``--with-router``): a router-included layer or
    the experts alone on its routing."""
    return "router" in impl or impl.startswith("moe_plugin_given_routing")


def merged(found, configs=None) -> dict:
    """The plain-mode rows of one run per config (the run compared with SonicMoE when there is
    one, else the last), each with its run's dense bf16 rate, and the runs' metadata
    (``plot_results.plot``'s input)."""
    rows, metas = [], []
    for config in configs or [c for c in ISSUE_CONFIGS if c in found]:
        runs = found.get(config, [])
        with_peer = [r for r in runs if "moe_plugin" in r[2] and "sonicmoe" in r[2]]
        plain = [r for r in runs if any(not router_mode(impl) for impl in r[2])]
        chosen = (with_peer or plain or [None])[-1]
        if chosen is None:
            continue
        path, meta, by_impl = chosen
        for impl, row in by_impl.items():
            if not router_mode(impl):
                rows.append({**row, "bf16_gemm_tflops": meta["ceilings"]["bf16_gemm_tflops"],
                             "source": os.path.basename(path)})
        if meta not in metas:
            metas.append(meta)
    return {"meta": metas[0] if metas else {}, "metas": metas, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="bench_layer.py JSON files")
    ap.add_argument("--configs", nargs="*", default=None,
                    help=f"configs to report (default: {' '.join(ISSUE_CONFIGS)})")
    ap.add_argument("--md", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    args = ap.parse_args(argv)
    for path in args.runs:
        if not os.path.isfile(path):
            ap.error(f"runs: no such file: {path}")
    found = load(args.runs)
    table = markdown(found, args.configs)
    print(table)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(table)
    data = merged(found, args.configs)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(data, fh, indent=1)
    if args.png:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import plot_results
        plot_results.plot(data, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
