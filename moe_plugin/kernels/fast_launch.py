"""Launching a compiled Gluon kernel again without Triton's per-call argument binding.

``JITFunction.run`` (Triton 3.6 to 3.9) binds every call's arguments to the signature,
specialises each one, builds and hashes the cache key of the kernel, compares every global the
kernel reads with its value at compile time (a ``constexpr.__ne__`` each: 15 for the
row-grouped kernel) and only then launches. ``FastLaunch`` wraps a ``@gluon.jit`` function and
keeps, per device, options and argument specialisation, the ``CompiledKernel`` that
``JITFunction.run`` chose the first time:

* the key is built with the binder's own rules: each non-constexpr argument specialised by
  Triton's ``native_specialize_impl`` with the parameter's flags (annotation, ``is_const``,
  ``do_not_specialize``, ``do_not_specialize_on_alignment``), constexpr arguments by value, the
  launch options and the ``debug`` / ``instrumentation_mode`` knobs as ``run`` adds them; a
  tensor descriptor by what its specialisation string holds (element type, block shape and
  shared layout, the layout object kept alive by the cache entry), without rendering it;
* a key seen before launches that kernel with the arguments in signature order, as ``run``
  does, without launch metadata or launch hooks (``run`` passes Triton's empty hook chains
  and the metadata they would read); a new key, a launch hook (a profiler's), a pre-run hook
  or a global read by the kernel that is not the object checked before goes through
  ``JITFunction.run`` (which compiles, launches, and raises if a global changed), and its
  kernel is kept for the key.

Equal keys mean equal specialisations, so the launch is the one ``JITFunction.run`` would make
(``tests/test_gluon_compile.py`` compares the launcher calls of both paths).
"""
from __future__ import annotations

import operator

import torch

# Only the Gluon launchers call ``launcher``, and they run only under a Triton whose Gluon the
# kernels compile under (``gluon_gemm.GLUON_TRITON_COMPILES``), each of which the compile check
# runs the fast-launch launch checks under (``tests/test_gluon_compile.py``); a Triton without
# the internals used here takes the plain path.
try:
    from triton import knobs
    from triton._C.libtriton import native_specialize_impl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as _GluonDesc
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction
    _OK = True
except Exception:  # pragma: no cover - a Triton without them: always the plain path
    _OK = False

_MISSING = object()
_MAX_KEYS = 1024


class FastLaunch:
    """``fast[grid](*args, **kwargs)`` launches ``jit_fn`` as ``jit_fn[grid](...)`` would
    (module doc); ``fast.fn`` is the wrapped function."""

    def __init__(self, jit_fn):
        self.fn = jit_fn
        self._kernels = {}     # key -> (CompiledKernel, the layouts its key refers to)
        self._globals = {}     # (name, id(dict)) -> the object found equal to the compiled value
        self._plan = None

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    # -- the plan: the binder's per-parameter rules, built once ------------------------------

    def _build_plan(self):
        fn = self.fn
        names = [p.name for p in fn.params]
        consts, rules = [], []  # constexpr positions; (position, rule) of the others
        for i, p in enumerate(fn.params):
            if p.is_constexpr:
                consts.append(i)
                continue
            ann = p.annotation_type
            fixed = (bool(ann) and isinstance(ann, str)
                     and (ann == "u1" or ann[:2] in ("fp", "bf")))
            rules.append((i, ann, fixed or p.do_not_specialize, p.is_const,
                          not p.do_not_specialize_on_alignment))
        defaults = {p.name: p.default for p in fn.params}
        # the constexpr values as one tuple, taken in C (itemgetter of one index gives the value)
        take = operator.itemgetter(*consts) if len(consts) > 1 else (
            (lambda v, i=consts[0]: (v[i],)) if consts else (lambda v: ()))
        self._plan = (names, set(names), rules, defaults, take)

    # -- launching ---------------------------------------------------------------------------

    def launch(self, grid, args, kwargs):
        fn = self.fn
        if (not _OK or callable(grid) or fn.pre_run_hooks
                or _hooked(knobs.runtime.launch_enter_hook)
                or _hooked(knobs.runtime.launch_exit_hook)):
            return fn.run(*args, grid=grid, warmup=False, **kwargs)
        device = driver.active.get_current_device()
        values = self.values(args, kwargs)
        key, layouts = self.key(device, values, kwargs)
        entry = self._kernels.get(key) if key is not None else None
        if entry is None or not self._globals_unchanged():
            kernel = fn.run(*args, grid=grid, warmup=False, **kwargs)
            if key is not None and kernel is not None and not hasattr(kernel, "result"):
                if len(self._kernels) >= _MAX_KEYS:  # layouts made per call would grow it
                    self._kernels.clear()
                self._kernels[key] = (kernel, layouts)
            # run compared every global with its compiled value: the objects it accepted
            for (name, dict_id), (_, gdict) in fn.used_global_vals.items():
                self._globals[(name, dict_id)] = gdict.get(name, _MISSING)
            return kernel
        kernel = entry[0]
        stream = driver.active.get_current_stream(device)
        kernel.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                   stream, kernel.function, kernel.packed_metadata, None, None, None, *values)
        return kernel

    def values(self, args, kwargs) -> list:
        """The call's arguments in signature order, defaults filled in (the binder's
        ``params``)."""
        if self._plan is None:
            self._build_plan()
        names, defaults = self._plan[0], self._plan[3]
        values = list(args)
        for name in names[len(args):]:
            v = kwargs.get(name, _MISSING)
            values.append(defaults[name] if v is _MISSING else v)
        return values

    def key(self, device, values, kwargs):
        """``(key, layouts)``: what ``JITFunction.run``'s cache key depends on (module doc), and
        the shared layouts it refers to by identity; key None before the function's first
        launch on ``device``."""
        fn = self.fn
        caches = fn.device_caches.get(device)  # a defaultdict: get() does not create it
        if caches is None:
            return None, None
        backend = caches[3]
        nameset, rules, take = self._plan[1], self._plan[2], self._plan[4]
        options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in nameset))
        # constexprs by value and type (Triton's key tells 1 from True)
        consts = take(values)
        key = [device, options, kwargs.get("debug", fn.debug) or knobs.runtime.debug,
               knobs.compilation.instrumentation_mode, consts, tuple(map(type, consts))]
        layouts = []
        for i, ann, fixed, is_const, align in rules:
            v = values[i]
            if fixed and ann:
                key.append(ann)
            elif isinstance(v, _GluonDesc):
                # "tensordesc<dtype[block], repr(layout)>": the layout by identity (kept alive
                # by the entry), which only ever splits a key Triton would share
                key.append((_GluonDesc, v.base.dtype, tuple(v.block_shape), id(v.layout)))
                layouts.append(v.layout)
            else:
                spec = native_specialize_impl(backend, v, is_const, not fixed, align)
                key.append((ann, spec[1]) if ann else spec)
        return tuple(key), layouts

    def _globals_unchanged(self) -> bool:
        """Every global the kernel reads is the object found equal to its compile-time value
        (a new object is compared by ``JITFunction.run`` on the slow path)."""
        seen = self._globals
        for (name, dict_id), (_, gdict) in self.fn.used_global_vals.items():
            obj = seen.get((name, dict_id), _MISSING)
            if obj is _MISSING or gdict.get(name, _MISSING) is not obj:
                return False
        return True


def _hooked(hook) -> bool:
    """A launch hook is set (Triton 3.6's knobs hold a chain of them, empty by default)."""
    return hook is not None and getattr(hook, "calls", True) != []


_WRAPPED: dict = {}


def launcher(jit_fn, enabled: bool):
    """What to index with the grid to launch ``jit_fn``: its ``FastLaunch`` (one per function)
    where it applies (``enabled``, a compiled ``JITFunction`` of a Triton with the internals
    used here, not while ``torch.compile`` traces), else the function itself."""
    if (not enabled or not _OK or not isinstance(jit_fn, JITFunction)
            or torch.compiler.is_compiling()):
        return jit_fn
    fast = _WRAPPED.get(jit_fn)
    if fast is None:
        fast = _WRAPPED[jit_fn] = FastLaunch(jit_fn)
    return fast
