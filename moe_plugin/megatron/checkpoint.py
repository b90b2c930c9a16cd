"""Checkpoints that move between stock Megatron-Core MoE models and moe_plugin's, and between
expert-parallel sizes: model weights, the state of Megatron's distributed optimizer, the
``OptimizerParamScheduler``, the iteration and whatever else the caller keeps (e.g. the data
position), through Megatron's ``dist_checkpointing``.

    from moe_plugin.megatron.checkpoint import save_checkpoint, load_checkpoint

    save_checkpoint("ckpt", iteration, model, optimizer, scheduler, consumed_train_samples=n)
    common = load_checkpoint("ckpt", model, optimizer, scheduler)   # latest iteration
    iteration, n = common["iteration"], common["consumed_train_samples"]

``model`` is the (DDP- / Float16Module-wrapped) ``GPTModel``, stock or plugin; ``optimizer``
what ``get_megatron_optimizer(OptimizerConfig(..., use_distributed_optimizer=True), [model])``
returns; ``scheduler`` an ``OptimizerParamScheduler`` (a fresh one when loading: Megatron's
``load_state_dict`` advances it by the saved step count). The directory has Megatron-LM's layout
(``iter_0000010/``, ``latest_checkpointed_iteration.txt``) and its top-level keys (``model``,
``optimizer``, ``opt_param_scheduler``, ``iteration``, ``checkpoint_version``).

How the optimizer state maps between stacked and per-expert experts
-----------------------------------------------------------------
Megatron's distributed optimizer is saved in its ``fully_reshardable`` format: each model
parameter's fp32 main copy (``param``), ``exp_avg`` and ``exp_avg_sq`` are gathered into tensors
of the parameter's shape and checkpointed under ``optimizer.state.<name>.<the parameter's
sharded key>``, sharded exactly like the parameter in ``model.sharded_state_dict()``. Stock's
``SequentialMLP`` gives expert ``e``'s ``linear_fc1.weight`` [2F, D] the key
``...mlp.experts.experts.linear_fc1.weight``, a tensor of global shape [layers, E, 2F, D]
(``linear_fc2``: [layers, E, D, F]), at offset e on the expert axis; moe_plugin's experts give
their stacked ``w_up`` [E/P, 2F, D] the same key and global shape, at offset r·E/P on the expert
axis (``w_down``, and the biases with ``add_bias_linear``, likewise). The optimizer builds its
state's entries from those, so each of exp_avg / exp_avg_sq / main param of expert e lands on
the same place of the same global tensor whichever implementation and EP size wrote it; the
checkpoint reader re-slices saved boxes into the requested ones.

What does not carry over by key alone is the optimizer's non-tensor state: with EP = 1 every
parameter is in one ``DistributedOptimizer``; with EP > 1 the experts (``allreduce=False``) have
their own, and ``get_megatron_optimizer`` returns a ``ChainedOptimizer`` of two, whose state
dict is a dict of two (Megatron itself cannot resume EP = 1 into EP = 2 for that reason).
``load_checkpoint`` rebuilds the loading optimizer's state dict from the saved parameter groups
(``lr``, ``weight_decay``, Adam's ``step``, ...), matched by Megatron's group identity
(``wd_mult``, ``lr_mult``, ``is_expert_parallel``, ``is_decoupled_lr``): a group that exists
only on one side of an EP change (the experts' group) takes the hyper-parameters of the group
that held the same parameters on the other side (same identity but ``is_expert_parallel``);
if that group is ambiguous or differs from its counterpart, it raises.

Only the ``fully_reshardable`` format can do this: Megatron-LM's default ``dp_reshardable``
follows the optimizer's internal buffers (same model code and parallel layout only), and
``fully_sharded_model_space`` raises in megatron-core 0.16.1 and 0.19.2; ``load_checkpoint``
refuses other formats, naming them. Three defects of Megatron's distributed optimizer over
torch's AdamW (no TransformerEngine / apex) are worked around here: see ``_init_adam_state``
and ``_load_param_state``. RNG states are not saved.
"""
from __future__ import annotations

import os

import torch

__all__ = ["SHARDING_TYPE", "TRACKER_FILE", "checkpoint_dir_for", "latest_iteration",
           "load_checkpoint", "save_checkpoint", "sharded_state_dict_metadata",
           "sub_optimizers"]

SHARDING_TYPE = "fully_reshardable"  # the distributed optimizer's resharding format
TRACKER_FILE = "latest_checkpointed_iteration.txt"  # Megatron-LM's name
CHECKPOINT_VERSION = 3.0  # Megatron-LM's current checkpoint version
_GROUP_IDENTITY = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


def sharded_state_dict_metadata() -> dict:
    """The ``metadata`` both ``model.sharded_state_dict`` and ``optimizer.sharded_state_dict``
    get (a new dict per call: Megatron adds process groups to it): the distributed optimizer's
    ``fully_reshardable`` format, no ``chained_{i}.`` key prefix, stock's tensor layout."""
    return {"distrib_optim_sharding_type": SHARDING_TYPE, "chained_optim_avoid_prefix": True,
            "singleton_local_shards": False}


def checkpoint_dir_for(root: str, iteration: int) -> str:
    """``root/iter_{iteration:07d}`` (Megatron-LM's layout)."""
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> int:
    """The iteration in ``root``'s tracker file (``latest_checkpointed_iteration.txt``)."""
    tracker = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(tracker):
        raise FileNotFoundError(f"checkpoint_dir: no {TRACKER_FILE} in {root!r} (not a "
                                f"checkpoint directory written by save_checkpoint / Megatron-LM)")
    with open(tracker) as fh:
        text = fh.read().strip()
    if not text.isdigit():
        raise ValueError(f"checkpoint_dir: {tracker} holds {text!r}, expected an iteration "
                         f"number")
    return int(text)


def _unwrap(model):
    """The module under Megatron's DDP / Float16Module wrappers (their ``sharded_state_dict``
    is the wrapped module's, and Megatron's DDP has none)."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module
    wrappers = (DistributedDataParallel, Float16Module, torch.nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def sub_optimizers(optimizer) -> list:
    """The ``DistributedOptimizer``s in ``optimizer`` (one, or a ``ChainedOptimizer``'s)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import ChainedOptimizer
    subs = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) \
        else [optimizer]
    bad = [type(s).__name__ for s in subs if not isinstance(s, DistributedOptimizer)]
    if bad or not subs:
        raise TypeError(f"optimizer: expected Megatron's distributed optimizer "
                        f"(get_megatron_optimizer with OptimizerConfig(use_distributed_optimizer"
                        f"=True)), got {type(optimizer).__name__} holding {bad or 'nothing'}")
    return subs


def _init_adam_state(sub) -> None:
    """Gives a never-stepped distributed optimizer over torch's Adam/AdamW its (zero) state.

    Without TransformerEngine or apex, Megatron's distributed optimizer runs torch's AdamW and
    its ``state_dict()`` reads Adam's step count from the per-parameter state, asserting that
    there is exactly one (distrib_optimizer.py:640-642 of 0.16.1): before the first ``step()``
    there is none, so neither ``sharded_state_dict`` nor loading a checkpoint
    (``sharded_state_dict(is_loading=True)`` calls ``state_dict()`` first) works. This creates
    the state a fresh Adam has, what Megatron's own ``init_state_fn`` does (zero ``exp_avg`` /
    ``exp_avg_sq``), with ``step`` 0 -- no parameter is touched, and loading overwrites all of
    it."""
    inner = sub.optimizer
    if len(inner.state) or not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        return
    init = getattr(sub, "init_state_fn", None)
    if init is None:
        return
    init(inner, sub.config)
    for group in inner.param_groups:
        for p in group["params"]:
            state = inner.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)


def _per_sub(state, n: int) -> list:
    """An optimizer state dict split per sub-optimizer: a ``ChainedOptimizer`` of n > 1 keeps
    one entry per optimizer (keys 0..n-1), a single optimizer's is the dict itself."""
    return [state] if n == 1 else [state[i] for i in range(n)]


def _saved_subs(saved) -> list:
    """The saved optimizer's common state, per sub-optimizer (see ``_per_sub``)."""
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint: unexpected optimizer state of type "
                         f"{type(saved).__name__}")
    if "param_state_sharding_type" in saved or "optimizer" in saved:
        return [saved]
    keys = sorted(k for k in saved if isinstance(k, int))
    if not keys or keys != list(range(len(keys))):
        raise ValueError(f"checkpoint: unexpected optimizer state keys {sorted(map(str, saved))}")
    return [saved[k] for k in keys]


def _identity(group: dict) -> tuple:
    out = []
    for key in _GROUP_IDENTITY:
        if key in group:
            out.append(group[key])
        elif f"pre_{key}" in group:  # NeMo's names
            out.append(group[f"pre_{key}"])
        else:
            raise ValueError(f"checkpoint: an optimizer parameter group lacks {key!r} "
                             f"(not written by Megatron-Core's get_megatron_optimizer?)")
    return tuple(out)


def _hyper(group: dict) -> dict:
    """A group's values apart from its parameters and its expert-parallel flag."""
    return {k: v for k, v in group.items() if k not in ("params", "is_expert_parallel")}


def _param_groups_for(sub, saved_groups: list) -> list:
    """The saved parameter groups, plus for each group of ``sub`` whose identity the checkpoint
    lacks, the saved group of the same identity but ``is_expert_parallel`` (the same parameters,
    in the other optimizer of an EP change), with the flag set as ``sub`` has it."""
    by_id = {}
    for g in saved_groups:
        by_id.setdefault(_identity(g), g)
    out = list(by_id.values())
    flag = _GROUP_IDENTITY.index("is_expert_parallel")
    for group in sub.optimizer.param_groups:
        ident = _identity(group)
        if ident in by_id:
            continue
        twin = (*ident[:flag], not ident[flag], *ident[flag + 1:])
        if twin not in by_id:
            raise ValueError(
                f"checkpoint: no optimizer parameter group for "
                f"{dict(zip(_GROUP_IDENTITY, ident))}; the checkpoint has "
                f"{[dict(zip(_GROUP_IDENTITY, i)) for i in by_id]}")
        out.append({**by_id[twin], "is_expert_parallel": ident[flag]})
    return out


def _check_counterparts(saved_groups: list) -> None:
    """Saved groups of one identity agree; and groups that differ only in
    ``is_expert_parallel`` (an EP > 1 run's expert optimizer and its dense one) agree too, as
    a run without that split takes them as one."""
    flag = _GROUP_IDENTITY.index("is_expert_parallel")
    by_id = {}
    for g in saved_groups:
        ident = _identity(g)
        for other in (ident, (*ident[:flag], not ident[flag], *ident[flag + 1:])):
            if other in by_id and _hyper(by_id[other]) != _hyper(g):
                diff = sorted(k for k in set(_hyper(g)) | set(_hyper(by_id[other]))
                              if _hyper(g).get(k) != _hyper(by_id[other]).get(k))
                raise ValueError(f"checkpoint: optimizer parameter groups "
                                 f"{dict(zip(_GROUP_IDENTITY, ident))} and "
                                 f"{dict(zip(_GROUP_IDENTITY, other))} differ in {diff}: "
                                 f"they cannot be merged or split for another "
                                 f"expert-parallel size")
        by_id.setdefault(ident, g)


def _load_param_state(sub, param_state) -> None:
    """``sub.load_parameter_state_from_fully_reshardable(param_state)``, with torch Adam's
    per-parameter ``step`` kept out of its way and made each parameter's own again.

    Two defects of Megatron-Core's distributed optimizer over torch's Adam (no TransformerEngine
    / apex), 0.16.1 and 0.19.2 alike:

    * torch's Adam keeps ``step`` in each parameter's state next to ``exp_avg`` /
      ``exp_avg_sq``; ``_set_main_param_and_optimizer_states`` copies every key of that state
      from the loaded tensors, but the ``fully_reshardable`` format keeps the step in the
      parameter groups, not per parameter (its loader skips ``step``): loading fails with
      ``KeyError: 'step'``. ``load_state_dict`` has set each ``step`` from the groups already,
      so it is set aside while the tensors load.
    * ``load_state_dict`` gives every parameter the same step tensor object, which torch's
      ``load_state_dict`` keeps; each ``step()`` then adds 1 to it once per parameter, and
      Adam's bias correction goes wrong from the first step after a resume. Each parameter
      gets its own copy back."""
    steps = {p: st.pop("step") for p, st in sub.optimizer.state.items() if "step" in st}
    try:
        sub.load_parameter_state_from_fully_reshardable(param_state)
    finally:
        for p, step in steps.items():
            sub.optimizer.state[p]["step"] = step.clone() if torch.is_tensor(step) else step


def save_checkpoint(root: str, iteration: int, model, optimizer=None, opt_param_scheduler=None,
                    **common) -> str:
    """Saves ``model`` (and ``optimizer``, ``opt_param_scheduler``) to
    ``root/iter_{iteration:07d}`` with ``dist_checkpointing`` and points ``root``'s tracker file
    at it. ``common``: further values, the same on every rank (e.g. ``consumed_train_samples``),
    saved once and returned by ``load_checkpoint``. Collective: every rank calls it. Returns
    the iteration's directory."""
    from megatron.core import dist_checkpointing
    if not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration: expected an int >= 0, got {iteration!r}")
    clash = sorted(set(common) & {"model", "optimizer", "opt_param_scheduler", "iteration",
                                  "checkpoint_version"})
    if clash:
        raise ValueError(f"common: {clash} are the checkpoint's own keys")
    path = checkpoint_dir_for(root, iteration)
    rank = torch.distributed.get_rank()
    if rank == 0:
        os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    model_sd = _unwrap(model).sharded_state_dict(metadata=sharded_state_dict_metadata())
    state = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
             "model": model_sd, **common}
    if optimizer is not None:
        for sub in sub_optimizers(optimizer):
            _init_adam_state(sub)
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, metadata=sharded_state_dict_metadata())
    if opt_param_scheduler is not None:
        state["opt_param_scheduler"] = opt_param_scheduler.state_dict()
    dist_checkpointing.save(state, path, content_metadata=sharded_state_dict_metadata())
    torch.distributed.barrier()
    if rank == 0:
        with open(os.path.join(root, TRACKER_FILE), "w") as fh:
            fh.write(str(iteration))
    torch.distributed.barrier()
    return path


def load_checkpoint(root: str, model, optimizer=None, opt_param_scheduler=None, *,
                    iteration: int | None = None, strict: bool = True) -> dict:
    """Loads ``root``'s latest checkpoint (or ``iteration``'s) into ``model`` and, when given,
    ``optimizer`` (a distributed optimizer) and ``opt_param_scheduler``. The checkpoint may
    come from a stock or a plugin model, at any expert-parallel size (see the module
    docstring). Collective. Returns the saved common values: ``iteration`` and those given to
    ``save_checkpoint`` as ``common``."""
    from megatron.core import dist_checkpointing
    if iteration is None:
        iteration = latest_iteration(root)
    elif not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration: expected None or an int >= 0, got {iteration!r}")
    path = checkpoint_dir_for(root, iteration)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint_dir: {path!r} does not exist")
    common = dist_checkpointing.load_common_state_dict(path)
    model_sd = _unwrap(model).sharded_state_dict(metadata=sharded_state_dict_metadata())
    request = {"model": model_sd}
    if optimizer is not None:
        subs = sub_optimizers(optimizer)
        if "optimizer" not in common:
            raise ValueError(f"optimizer: {path} holds no optimizer state (saved without one)")
        saved = _saved_subs(common["optimizer"])
        kinds = {s.get("param_state_sharding_type") for s in saved}
        if kinds != {SHARDING_TYPE}:
            raise ValueError(f"checkpoint: the distributed optimizer state in {path} is in "
                             f"format {sorted(map(str, kinds))}; only {SHARDING_TYPE!r} "
                             f"(metadata distrib_optim_sharding_type) can change expert "
                             f"parallelism or move between stock and plugin experts")
        saved_groups = [g for s in saved for g in s["optimizer"]["param_groups"]]
        _check_counterparts(saved_groups)
        for sub in subs:
            _init_adam_state(sub)
        request["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=sharded_state_dict_metadata())
    if opt_param_scheduler is not None and "opt_param_scheduler" not in common:
        raise ValueError(f"opt_param_scheduler: {path} holds no scheduler state")
    state = dist_checkpointing.load(request, path)
    model.load_state_dict(state["model"], strict=strict)
    if optimizer is not None:
        loaded = _per_sub(state["optimizer"], len(subs))
        extra = {k: v for k, v in saved[0].items()
                 if k not in ("optimizer", "param_state", "param_state_sharding_type")}
        inner = {k: v for k, v in saved[0]["optimizer"].items() if k != "param_groups"}
        for sub, got in zip(subs, loaded):
            # parameter groups (lr, weight decay, Adam's step) and the state's allocation ...
            sub.load_state_dict({**extra, "optimizer": {
                **inner, "param_groups": _param_groups_for(sub, saved_groups)}})
            # ... then each parameter's main copy, exp_avg and exp_avg_sq
            _load_param_state(sub, got["param_state"])
    if opt_param_scheduler is not None:
        opt_param_scheduler.load_state_dict(common["opt_param_scheduler"])
    return {k: v for k, v in common.items()
            if k not in ("model", "optimizer", "opt_param_scheduler", "checkpoint_version",
                         "content_metadata")}
