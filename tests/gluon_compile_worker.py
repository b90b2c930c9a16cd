"""Compiles the Gluon (Hopper) kernels for sm_90 on a machine without a GPU and prints one JSON
line per case (``tests/test_gluon_compile.py`` runs it in a subprocess: the test session runs
Triton under its interpreter, and kernels compile only outside it).

A stand-in CUDA driver (``Sm90Driver``) makes a launch compile the kernel as usual (Triton's
passes and ``ptxas``) and then raise ``Compiled`` with the compiled kernel's metadata instead
of loading it.

With ``--launch-check CASE...`` the launches run under ``recording()`` instead (a stand-in
launcher that records its arguments) and each case is launched through ``JITFunction.run`` and
through ``fast_launch`` (``launch_check``, ``key_check``); in a process of its own.

    python tests/gluon_compile_worker.py            # every case
    python tests/gluon_compile_worker.py --launch-check bf16_down_aligned ...
"""
import contextlib
import dataclasses
import json
import sys

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver


class Compiled(Exception):
    """Raised at the launch of a compiled kernel; ``args``: its metadata and its constexpr
    arguments by name."""


class _Launcher:
    def __init__(self, src, metadata):
        names = getattr(getattr(src, "fn", None), "arg_names", [])
        consts = {names[k[0]]: v for k, v in getattr(src, "constants", {}).items()
                  if len(k) == 1 and k[0] < len(names)}
        raise Compiled(metadata, consts)


class _Utils:
    """An H100/H200's limits, as the compiler and the launcher ask for them."""

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000,
                "mem_bus_width": 6144}


class Sm90Driver(DriverBase):
    """Targets ``cuda:90``; device 0, stream 0; kernels compile and stop at the launch."""

    def __init__(self):
        self.utils = _Utils()
        self.launcher_cls = _Launcher

    @staticmethod
    def is_active():
        return True

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def set_current_device(self, device):
        pass

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def get_device_interface(self):
        import torch
        return torch.cuda

    def map_python_to_cpp_type(self, ty):
        from triton.backends.nvidia.driver import ty_to_cpp
        return ty_to_cpp(ty)

    def get_benchmarker(self):
        raise NotImplementedError("no GPU: nothing to time")

    def get_empty_cache_for_benchmark(self):
        raise NotImplementedError("no GPU: nothing to time")

    def clear_cache(self, cache):
        pass


@contextlib.contextmanager
def sm90():
    """Within the block Triton compiles for sm_90 (and launches nothing)."""
    saved = driver._active
    driver.set_active(Sm90Driver())
    try:
        yield
    finally:
        driver._active = saved


def compile_launch(fn):
    """Runs ``fn`` (a launcher call) inside ``sm90()``; returns the metadata of the kernel it
    compiled and would have launched, and that launch's constexpr arguments by name."""
    with sm90():
        try:
            fn()
        except Compiled as c:
            return c.args
    raise AssertionError("the call compiled no kernel")


class _Recorder:
    """A launcher that records its calls instead of launching (``recording()``)."""
    calls: list = []

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args):
        _Recorder.calls.append(args)


class _RecordingUtils(_Utils):
    def load_binary(self, name, kernel, shared, device):
        return object(), f"function:{name}", 0, 0, 1024


@contextlib.contextmanager
def recording():
    """Within the block Triton compiles for sm_90 and every launch appends its launcher
    arguments to ``_Recorder.calls``. The kernels keep the recording launcher: a process that
    records compiles nothing with ``compile_launch`` afterwards."""
    stand_in = Sm90Driver()
    stand_in.launcher_cls = _Recorder
    stand_in.utils = _RecordingUtils()
    saved = driver._active
    driver.set_active(stand_in)
    try:
        yield
    finally:
        driver._active = saved


def _launch_view(call) -> tuple:
    """A launcher call with its tensors and tensor descriptors as what they describe."""
    def view(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", v.data_ptr(), tuple(v.shape), v.stride(), v.dtype)
        if dataclasses.is_dataclass(v) and hasattr(v, "block_shape"):
            return ("desc", v.base.data_ptr(), tuple(v.shape), tuple(v.strides),
                    tuple(v.block_shape), v.layout, v.padding)
        return v
    # the launch metadata and the enter / exit hooks: none set (Triton's empty hook chains or
    # None; the metadata is only read by hooks)
    hooks = tuple(h is None or getattr(h, "calls", None) == [] for h in call[7:9])
    return tuple(view(v) for v in call[:6]) + hooks + tuple(view(v) for v in call[9:])


def launch_check(fn) -> dict:
    """Runs the case ``fn`` (under ``recording()``) through ``JITFunction.run`` alone, then
    twice more with ``fast_launch``: the third call must not reach ``JITFunction.run`` and must
    call the launcher with what the first did."""
    from triton.runtime.jit import JITFunction

    from moe_plugin.kernels import fast_launch as FL
    from moe_plugin.kernels import tuning
    runs = []
    plain_run = JITFunction.run

    def counted(self, *args, **kwargs):
        runs.append(self)
        return plain_run(self, *args, **kwargs)

    JITFunction.run = counted
    try:
        with recording(), tuning.override(fast_launch=True):
            FL._OK = False  # every launcher() the function itself
            fn()
            FL._OK = True
            plain = _Recorder.calls[-1]
            fn()
            n = len(runs)
            fn()
            fast = _Recorder.calls[-1]
    finally:
        JITFunction.run = plain_run
        FL._OK = True
    return {"same_launch": _launch_view(plain) == _launch_view(fast),
            "fast_path": len(runs) == n, "args": len(plain)}


def key_check() -> dict:
    """``FastLaunch.key`` on the row-grouped kernel's last recorded launch: the same arguments
    give the same key; a pointer off 16-byte alignment, an int no longer a multiple of 16, an
    int 1 (Triton specialises it to a constant), a constexpr True passed as 1, and an equal
    layout in a new object give another."""
    from triton.experimental.gluon import language as gl

    from moe_plugin.kernels import fast_launch as FL
    from moe_plugin.kernels import gluon_gemm as GF
    fl = FL._WRAPPED[GF._grouped_mm_ws]
    names = fl._plan[0]
    seen = {}
    plain_launch = FL.FastLaunch.launch

    def capture(self, grid, args, kwargs):
        seen["call"] = (args, kwargs)
        return plain_launch(self, grid, args, kwargs)

    FL.FastLaunch.launch = capture
    try:
        with recording():
            _cases()["bf16_dx_aligned"]()
    finally:
        FL.FastLaunch.launch = plain_launch
    args, kwargs = seen["call"]
    values = fl.values(args, kwargs)
    base, _ = fl.key(0, values, kwargs)

    def key_with(name, v):
        changed = list(values)
        changed[names.index(name)] = v
        return fl.key(0, changed, kwargs)[0]

    i = names.index
    c = values[i("c_ptr")]
    desc = values[i("a_desc")]
    relaid = type(desc)(desc.base, desc.shape, desc.strides, desc.block_shape,
                        gl.NVMMASharedLayout(**{f: getattr(desc.layout, f) for f in (
                            "swizzle_byte_width", "element_bitwidth", "rank", "transposed",
                            "fp4_padded", "cga_layout")}))
    n = values[i("N")]
    return {"same": fl.key(0, list(values), kwargs)[0] == base,
            "misaligned_ptr": key_with("c_ptr", c.view(-1)[1:]) != base,
            "int_alignment": n % 16 == 0 and key_with("N", n + 1) != base,
            "int_one": key_with("N", 1) != base,
            "constexpr_type": values[i("INFO")] is True and key_with("INFO", 1) != base,
            "new_layout_object": (relaid.layout == desc.layout
                                  and key_with("a_desc", relaid) != base)}


# the launch choices a case reports (tests/test_gluon_compile.py checks that a variant's case
# compiled the variant)
REPORTED = ("BM", "BN", "STAGES", "A_GATHER", "B_GATHER", "C_TRANS", "TMA_STORE", "PINGPONG",
            "CN", "CM", "DEFER")


# ----------------------------------------------------------------------------------------------
# the cases


class _Meta:
    """The fields of ``PermuteMeta`` the launchers read, on the CPU (5 unused slots at the
    end)."""

    def __init__(self, counts, top_k):
        self.num_experts = len(counts)
        self.top_k = top_k
        self.counts = torch.tensor(counts, dtype=torch.int32)
        self.offsets = torch.zeros(len(counts) + 1, dtype=torch.int32)
        torch.cumsum(self.counts, 0, out=self.offsets[1:])
        self.sorted_slot = torch.arange(int(self.offsets[-1]) + 5, dtype=torch.int32)


def _cases():
    """``name: launcher call`` for every case."""
    from moe_plugin.kernels import gluon_gemm as GF
    from moe_plugin.kernels import tuning
    from moe_plugin.kernels.codes import Accum
    # fast_launch on for the launch check (the compile cases' first launch is the same)
    tune = dataclasses.replace(tuning.current(), gluon_programs=132, fast_launch=True)
    cases = {}
    # bf16 weight gradients: both operand roles (dW_up also transposed: gluon_bf16_wgrad_swap,
    # the gathered x on the tile's rows, C stored transposed), every epilogue, widths that are
    # multiples of 8 but not of 16 or of the tile
    swap = dataclasses.replace(tune, gluon_bf16_wgrad_swap=True)
    plain = dataclasses.replace(tune, gluon_bf16_wgrad_swap=False)
    for gathered, role, t in (("b", "wgrad_up", plain), ("b", "wgrad_up_swap", swap),
                              ("a", "wgrad_down", tune)):
        for (d, f2), shape in (((256, 512), "aligned"), ((200, 136), "odd")):
            for accum in (Accum.STORE, Accum.ATOMIC, Accum.RMW):
                if t is swap and accum == Accum.RMW:  # the untransposed kernel: above
                    continue
                meta = _Meta([100, 0, 37, 300], top_k=2)
                s = meta.sorted_slot.numel()
                ordered = torch.zeros(s, f2, dtype=torch.bfloat16)
                tokens = torch.zeros(s // 2 + 1, d, dtype=torch.bfloat16)
                a, b = (ordered, tokens) if gathered == "b" else (tokens, ordered)
                # RMW into bf16 and (its own tile config) into fp32
                for cdt in ((torch.bfloat16, torch.float32) if accum == Accum.RMW else
                            (torch.float32 if accum == Accum.ATOMIC else torch.bfloat16,)):
                    c = torch.zeros(meta.num_experts, a.shape[1], b.shape[1], dtype=cdt)
                    assert GF.segment_direct_fits(a, b, c, accum)
                    suffix = "32" if accum == Accum.RMW and cdt == torch.float32 else ""
                    cases[f"bf16_{role}_{shape}_{accum.name.lower()}{suffix}"] = (
                        lambda a=a, b=b, c=c, meta=meta, accum=accum, gathered=gathered, t=t:
                        GF.segment_mm_direct(t, a, b, c, meta, accum,
                                             a_gather=gathered == "a", b_gather=gathered == "b"))
                    if accum == Accum.STORE:  # ... and stored by registers (TMA: default)
                        tt = dataclasses.replace(t, gluon_bf16_seg_config={
                            **t.gluon_bf16_seg_config, "TMA_STORE": 0})
                        cases[f"bf16_{role}_{shape}_store_regs"] = (
                            lambda a=a, b=b, c=c, meta=meta, gathered=gathered, tt=tt:
                            GF.segment_mm_direct(tt, a, b, c, meta, Accum.STORE,
                                                 a_gather=gathered == "a",
                                                 b_gather=gathered == "b"))
    # the FP8 weight gradient (the same kernel, PADDED) and the FP8 row-grouped GEMM
    meta8 = _Meta([200, 0, 300, 56], top_k=1)
    g, mo, no = 12, 256, 384
    qa = torch.zeros(g, mo, 128, dtype=torch.float8_e4m3fn)
    qb = torch.zeros(g, no, 128, dtype=torch.float8_e4m3fn)
    sa, sb = torch.ones(g, mo), torch.ones(g, no)
    for accum in (Accum.STORE, Accum.ATOMIC, Accum.RMW):
        c = torch.zeros(meta8.num_experts, mo, no,
                        dtype=torch.float32 if accum == Accum.ATOMIC else torch.bfloat16)
        cases[f"fp8_wgrad_{accum.name.lower()}"] = (
            lambda c=c, accum=accum: GF.segment_mm(tune, qa, sa, qb, sb, c, meta8, accum))
    s, n, k = meta8.sorted_slot.numel(), 256, 512
    a8 = torch.zeros(s, k, dtype=torch.float8_e4m3fn)
    b8 = torch.zeros(meta8.num_experts, n, k, dtype=torch.float8_e4m3fn)
    sa8 = torch.ones(s, k // 128)
    sb8 = torch.ones(meta8.num_experts, k // 128, n // 128)
    c8 = torch.empty(s, n, dtype=torch.bfloat16)
    cases["fp8_grouped"] = lambda: GF.grouped_mm(tune, a8, sa8, b8, sb8, sb8.stride(), c8,
                                                 meta8, n=n, k=k)
    # the FP8 dh' GEMM with the activation backward in its epilogue (gated)
    pre8 = torch.zeros(s, 2 * n, dtype=torch.bfloat16)
    cases["fp8_dh_fused"] = lambda: GF.grouped_mm_act_bwd(
        tune, a8, sa8, b8, sb8, sb8.stride(), pre8, torch.zeros(s), meta8,
        torch.empty_like(pre8), torch.empty(s, n, dtype=torch.bfloat16), n=n, k=k, gated=True,
        act=0)
    # the 16-bit row-grouped GEMMs (grouped_mm_direct): GEMM2 (B K-major), dx (B N-major),
    # the split form's dh' (A gathered, B N-major), GEMM1 + activation (A gathered, B K-major,
    # gated: two accumulators); widths that are multiples of 8 but not of 16 or of the tile
    from moe_plugin.kernels.codes import Epilogue
    metab = _Meta([100, 0, 37, 300], top_k=2)
    sb_ = metab.sorted_slot.numel()
    for shape, (d, f) in (("aligned", (256, 512)), ("odd", (192, 200))):
        def w(rows, cols):
            return torch.zeros(metab.num_experts, rows, cols, dtype=torch.bfloat16)
        ordered = torch.zeros(sb_, f, dtype=torch.bfloat16)
        ordered2 = torch.zeros(sb_, 2 * f, dtype=torch.bfloat16)
        tokens = torch.zeros(sb_ // 2 + 1, d, dtype=torch.bfloat16)
        y = torch.zeros(sb_, d, dtype=torch.bfloat16)
        wd = w(d, f)        # W_down [E, D, F]
        dpre = torch.zeros(sb_, 2 * f, dtype=torch.bfloat16)
        wu = w(2 * f, d)    # W_up [E, 2F, D]
        # GEMM2 (k = F), dx (k = 2F), the split form's dh' (A gathered): as the defaults launch
        # them (the plain epilogue by TMA stores of four column parts), with the whole tile
        # staged for its TMA stores (TMA_STORE True, 3 ring slots; dx, dh') and
        # with the consumers on whole 128 x 128 tiles in turn (PINGPONG)
        tmas = dataclasses.replace(tune, gluon_bf16_config={**tune.gluon_bf16_config,
                                                            "TMA_STORE": True, "STAGES": 3})
        pp = dataclasses.replace(tune, gluon_bf16_config={
            **tune.gluon_bf16_config, **tuning.GLUON_BF16_PINGPONG})
        # ... and launched as clusters of two CTAs (CLUSTER): along the columns, A multicast
        # (GEMM2, dx), along the rows, B multicast (dh' with its gathered A)
        cl = dataclasses.replace(tune, gluon_bf16_config={
            **tune.gluon_bf16_config, **tuning.GLUON_BF16_CLUSTER})
        clpp = dataclasses.replace(tune, gluon_bf16_config={
            **tune.gluon_bf16_config, **tuning.GLUON_BF16_PINGPONG, **tuning.GLUON_BF16_CLUSTER})
        # ... and with the plain epilogue by registers (TMA_STORE 0)
        regs = dataclasses.replace(tune, gluon_bf16_config={**tune.gluon_bf16_config,
                                                            **tuning.GLUON_BF16_REG_STORE})
        # ... and with 256 x 128 tiles (each consumer 128 rows)
        tall = dataclasses.replace(tune, gluon_bf16_config={**tune.gluon_bf16_config,
                                                            **tuning.GLUON_BF16_TALL})
        # ... and with each tile's stores under the next tile's first MMA (DEFER)
        defer = dataclasses.replace(tune, gluon_bf16_config={**tune.gluon_bf16_config,
                                                             **tuning.GLUON_BF16_DEFER})
        for suffix, t, kinds in (("", tune, "down dx dh"), ("_tmastore", tmas, "dx dh"),
                                 ("_regs", regs, "down dx dh"), ("_tall", tall, "down dx dh"),
                                 ("_defer", defer, "down dx dh"),
                                 ("_pingpong", pp, "down dx dh"), ("_cluster", cl, "down dx dh"),
                                 ("_pingpong_cluster", clpp, "down")):
            if "down" in kinds and f % 64 == 0:
                cases[f"bf16_down{suffix}_{shape}"] = (
                    lambda t=t, wd=wd, ordered=ordered, y=y, d=d, f=f: GF.grouped_mm_direct(
                        t, ordered, wd, (wd.stride(0), wd.stride(2), wd.stride(1)), y, metab,
                        n=d, k=f, gather=False))
            if "dx" in kinds and (2 * f) % 64 == 0:
                cases[f"bf16_dx{suffix}_{shape}"] = (
                    lambda t=t, wu=wu, dpre=dpre, y=y, d=d, f=f: GF.grouped_mm_direct(
                        t, dpre, wu, wu.stride(), y, metab, n=d, k=2 * f, gather=False))
            if "dh" not in kinds:
                continue
            cases[f"bf16_dh{suffix}_{shape}"] = (
                lambda t=t, wd=wd, tokens=tokens, ordered=ordered, d=d, f=f:
                GF.grouped_mm_direct(t, tokens, wd, wd.stride(), ordered, metab, n=f, k=d,
                                     gather=True))
        # one GEMM's own configuration (``gluon_bf16_kind_configs``): GEMM2 ping-pong, dx not
        kindpp = dataclasses.replace(tune, gluon_bf16_kind_configs={
            "down": tuning.GLUON_BF16_PINGPONG})
        if f % 64 == 0:
            cases[f"bf16_down_kindpp_{shape}"] = (
                lambda wd=wd, ordered=ordered, y=y, d=d, f=f: GF.grouped_mm_direct(
                    kindpp, ordered, wd, (wd.stride(0), wd.stride(2), wd.stride(1)), y, metab,
                    n=d, k=f, gather=False, kind="down"))
            cases[f"bf16_dx_kindpp_{shape}"] = (
                lambda wu=wu, dpre=dpre, y=y, d=d, f=f: GF.grouped_mm_direct(
                    kindpp, dpre, wu, wu.stride(), y, metab, n=d, k=2 * f, gather=False,
                    kind="dx"))
        for gated in (True, False):  # dh' with the activation backward in its epilogue
            prea = ordered2 if gated else ordered
            wts = torch.zeros(sb_, dtype=torch.float32)
            cases[f"bf16_dh_fused_{'gated' if gated else 'plain'}_{shape}"] = (
                lambda wd=wd, tokens=tokens, prea=prea, wts=wts, d=d, f=f, gated=gated:
                GF.grouped_mm_act_bwd(
                    tune, tokens, None, wd, None, (0, 0, 0), prea, wts, metab,
                    torch.empty_like(prea), torch.empty(sb_, f, dtype=torch.bfloat16), n=f, k=d,
                    gated=gated, act=0 if gated else 3, gather=True))
        # ... not GEMM1 gated (two accumulators): its launch keeps the consumers on halves
        cases[f"bf16_up_gated_pingpong_{shape}"] = (
            lambda wu=wu, tokens=tokens, ordered=ordered, d=d, f=f: GF.grouped_mm_direct(
                pp, tokens, wu, (wu.stride(0), wu.stride(2), wu.stride(1)), ordered, metab,
                n=f, k=d, gather=True, epi=Epilogue.ACT_FWD, gated=True, act=0, store_h=True))
        wplain = w(f, d)
        cases[f"bf16_up_plain_pingpong_{shape}"] = (
            lambda wplain=wplain, tokens=tokens, ordered=ordered, d=d, f=f:
            GF.grouped_mm_direct(
                dataclasses.replace(pp, gluon_bf16_up_config={}), tokens, wplain,
                (wplain.stride(0), wplain.stride(2), wplain.stride(1)), ordered, metab, n=f,
                k=d, gather=True, epi=Epilogue.ACT_FWD, gated=False, act=3, store_h=True))
        # GEMM1 gated or not
        for kind, gated in (("gated", True), ("plain", False)):
            wup = wu if gated else w(f, d)
            for store_pre, store_h in ((True, True), (False, True), (True, False)):
                name = f"bf16_up_{kind}_{shape}" + "_pre" * store_pre + "_h" * store_h
                pre = (ordered2 if gated else ordered.clone()) if store_pre else None
                h = ordered if store_h else None
                cases[name] = (
                    lambda wup=wup, tokens=tokens, pre=pre, h=h, d=d, f=f, gated=gated,
                    store_pre=store_pre, store_h=store_h: GF.grouped_mm_direct(
                        tune, tokens, wup, (wup.stride(0), wup.stride(2), wup.stride(1)), h,
                        metab, n=f, k=d, gather=True, epi=Epilogue.ACT_FWD, pre=pre,
                        gated=gated, act=0, store_pre=store_pre, store_h=store_h))
        # GEMM1 as clusters of two CTAs along the rows (CLUSTER), W_up's tiles multicast
        for kind, gated in (("gated", True), ("plain", False)):
            wup = wu if gated else w(f, d)
            pre = ordered2 if gated else ordered.clone()
            cases[f"bf16_up_{kind}_cluster_{shape}"] = (
                lambda wup=wup, tokens=tokens, pre=pre, ordered=ordered, d=d, f=f, gated=gated:
                GF.grouped_mm_direct(
                    cl, tokens, wup, (wup.stride(0), wup.stride(2), wup.stride(1)), ordered,
                    metab, n=f, k=d, gather=True, epi=Epilogue.ACT_FWD, pre=pre, gated=gated,
                    act=0, store_pre=True, store_h=True))
    # the router's split-form backward GEMMs (Triton kernels; their tiles and stages from the
    # active tuning, run on GPUs only: a default that outgrows shared memory fails here)
    from moe_plugin.kernels import routing
    pieces = torch.zeros(256, 3 * 128, dtype=torch.bfloat16)
    w_gate = torch.zeros(128, 512, dtype=torch.bfloat16)
    x_router = torch.zeros(256, 512, dtype=torch.bfloat16)
    def pieces_dx(p, w):
        def case():
            with tuning.override(gluon_programs=132):  # (persistent: the SMs counted)
                return routing.pieces_dx(p, w, x_router)
        return case
    # E 128: one k-step, W resident; E 8: a k-step of 16 (the MMA's least); E 256: a k loop,
    # its stages fitted to shared memory
    cases["router_pieces_dx"] = pieces_dx(pieces, w_gate)
    cases["router_pieces_dx_small_e"] = pieces_dx(pieces[:, :24], w_gate[:8])
    cases["router_pieces_dx_e256"] = pieces_dx(torch.zeros(256, 3 * 256, dtype=torch.bfloat16),
                                               torch.zeros(256, 512, dtype=torch.bfloat16))
    cases["router_pieces_dw"] = lambda: routing.pieces_dw(pieces, x_router, 3, torch.bfloat16)
    # the experts' dx reduction with the router's product (pieces_dx's kernel, the gathered
    # rows in place of C)
    from moe_plugin.kernels.permute import PermuteMeta
    k_r = 8
    meta_r = PermuteMeta(torch.zeros(128, dtype=torch.int32), torch.zeros(129, dtype=torch.int32),
                         torch.zeros(256 * k_r, dtype=torch.int32),
                         torch.zeros(256 * k_r, dtype=torch.int32), 128, k_r)
    y_r = torch.zeros(256 * k_r, 512, dtype=torch.bfloat16)
    def gather_reduce(p, w):
        def case():
            with tuning.override(gluon_programs=132):
                return routing.pieces_gather_reduce(y_r, meta_r, p, w, torch.bfloat16)
        return case
    cases["router_pieces_gather_reduce"] = gather_reduce(pieces, w_gate)
    cases["router_pieces_gather_reduce_small_e"] = gather_reduce(pieces[:, :24], w_gate[:8])
    # k 2: 64-row tiles (the gathered rows a tile over k)
    meta_k2 = PermuteMeta(meta_r.counts, meta_r.offsets, meta_r.sorted_slot[:512],
                          meta_r.slot_pos[:512], 128, 2)

    def gather_reduce_k2():
        with tuning.override(gluon_programs=132):
            return routing.pieces_gather_reduce(y_r[:512], meta_k2, pieces, w_gate,
                                                torch.bfloat16)
    cases["router_pieces_gather_reduce_k2"] = gather_reduce_k2
    # the routing forward (top-k by one max of packed int64 ranks a pick): plain softmax with
    # the aux statistics, and group-limited sigmoid with a bias (the aux top-k apart)
    logits = torch.zeros(256, 128, dtype=torch.float32)
    cases["router_route_fwd"] = lambda: routing.route_forward(
        logits, 8, score_func="softmax", renormalize=True, expert_bias=None, num_groups=None,
        group_topk=None, scaling_factor=1.0, need_aux=True, need_lse=True)
    cases["router_route_fwd_groups"] = lambda: routing.route_forward(
        logits, 8, score_func="sigmoid", renormalize=True,
        expert_bias=torch.zeros(128, dtype=torch.float32), num_groups=8, group_topk=4,
        scaling_factor=2.5, need_aux=True, need_lse=False)
    # the routing backward (the k picks one at a time on [rows, experts] tiles)
    ids = torch.zeros(256, 8, dtype=torch.int32)
    cases["router_route_bwd"] = lambda: routing.route_backward(
        logits, ids, torch.zeros(256, 8), torch.zeros(128), torch.zeros(256),
        score_func="softmax", renormalize=True, scaling_factor=1.0)
    return cases


def main():
    from moe_plugin.kernels import gluon_gemm as GF
    if not GF.api_compiles():
        print(json.dumps({"unsupported": f"Triton {GF._triton_version()}"}))
        return
    if sys.argv[1:2] == ["--launch-check"]:  # in a process of its own: see recording()
        for name, fn in _cases().items():
            if name in sys.argv[2:]:
                print(json.dumps({"launch_check": name, **launch_check(fn)}), flush=True)
        print(json.dumps({"key_check": key_check()}), flush=True)
        return
    only = set(sys.argv[1:])
    for name, fn in _cases().items():
        if only and name not in only:
            continue
        try:
            md, consts = compile_launch(fn)
            print(json.dumps({"case": name, "kernel": md.name, "shared": md.shared,
                              "spills": getattr(md, "n_spills", None),
                              "launch": {k: consts[k] for k in REPORTED if k in consts}}),
                  flush=True)
        except Exception as ex:  # a compile error: reported, the next case runs
            print(json.dumps({"case": name, "error": f"{type(ex).__name__}: {ex}"[-2000:]}),
                  flush=True)


if __name__ == "__main__":
    main()
