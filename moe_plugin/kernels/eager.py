"""The package's custom ops, called without PyTorch's dispatcher where nothing traces them.

The training stages (``expert_stages``) and the router's kernels (``routing``) are registered
as ``torch.library`` custom ops, so that ``torch.compile`` / export treat them as opaque nodes
with fake implementations. In eager mode the dispatcher adds host time to every call, most for
an op that mutates an argument: PyTorch's in-place-or-view kernel for Python custom ops calls
``torch._library.utils.fill_defaults``, which rebuilds the schema's argument list once per
argument (~100-190 µs a call on a 2-core CPU for the backward stage ops' 15 and 22 arguments,
against ~5 µs for the function itself; a non-mutating op ~20 µs; ``benchmarks/NOTES.md``,
session 32). ``custom_op`` registers the op as ``torch.library.custom_op`` does and returns an
``EagerOp``: calling it runs the function directly where ``direct`` holds (bumping the version
counters of the mutated arguments, as that kernel does), else the registered op.
"""
import inspect

import torch

from . import tuning

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def direct(args) -> bool:
    """Whether a call may skip the dispatcher: ``tuning.eager_ops`` on, grad mode off (as
    inside an autograd Function's forward and backward; a ``create_graph`` backward keeps the
    op), not compiling or exporting, no dispatch mode (fake, functional, proxy tensors: what
    tracing uses), no ``torch.func`` transform (``vmap``'s batched tensors look plain) and the
    tensor arguments plain tensors or parameters."""
    return (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and tuning.current().eager_ops
            and torch._C._len_torch_dispatch_stack() == 0
            and torch._C._functorch.peek_interpreter_stack() is None
            and all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor)))


class EagerOp:
    """A registered custom op (``op``: ``torch.ops.<namespace>.<name>``) and its function
    (``fn``). A call runs ``fn`` directly where ``direct``, else the op; ``register_fake``
    registers the op's fake implementation."""

    def __init__(self, name: str, fn, mutates_args):
        self.op_def = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        self.fn = fn
        params = inspect.signature(fn).parameters
        self.names = list(params)
        self.defaults = [p.default for p in params.values()]
        self.mutated = tuple(self.names.index(p) for p in mutates_args)
        namespace, op_name = name.split("::")
        self.op = getattr(getattr(torch.ops, namespace), op_name)
        self.register_fake = self.op_def.register_fake

    def _positional(self, args, kwargs):
        """``args`` and ``kwargs`` as one positional tuple over all parameters."""
        rest = []
        for name, default in zip(self.names[len(args):], self.defaults[len(args):]):
            if name in kwargs:
                rest.append(kwargs.pop(name))
            elif default is inspect.Parameter.empty:
                raise TypeError(f"{self.fn.__name__}: missing argument {name!r}")
            else:
                rest.append(default)
        if kwargs:
            raise TypeError(f"{self.fn.__name__}: unexpected arguments {sorted(kwargs)}")
        return (*args, *rest)

    def __call__(self, *args, **kwargs):
        if kwargs:
            args = self._positional(args, dict(kwargs))
        if not direct(args):
            return self.op(*args)
        out = self.fn(*args)
        for i in self.mutated:
            torch.autograd.graph.increment_version(args[i])
        return out


def custom_op(name: str, mutates_args=()):
    """``torch.library.custom_op(name, mutates_args=...)`` as a decorator returning an
    ``EagerOp``."""
    return lambda fn: EagerOp(name, fn, tuple(mutates_args))
