"""Optimizer state without memory: each optimizer allocates its own state on meta-device
parameters, so the plan is what the code does, not a formula that could drift from it."""

from __future__ import annotations

import copy

import torch

from optim import state_nbytes

from ..optimizers import VALUE_DEPENDENT_STATE, build_optimizer, takes_loss

PLAN_LR = 1e-4  # no optimizer here sizes its state by the learning rate


def _bnb_init_state(opt) -> None:
    # bitsandbytes kernels cannot run on meta tensors, but the allocation is a method of
    # its own: do what its step() does before the first update, and stop there.
    if not opt.initialized:
        opt.check_overrides()
        opt.to_gpu()
        opt.initialized = True
    for gindex, group in enumerate(opt.param_groups):
        for pindex, p in enumerate(group["params"]):
            if p.requires_grad and len(opt.state[p]) == 0:
                opt.init_state(group, p, gindex, pindex)


def _meta_step(opt) -> None:
    # torch optimizers and transformers' Adafactor allocate their state inside step();
    # with meta parameters and meta gradients a step is shapes only. Meta kernels run op
    # by op in Python, and SDXL's ~1,600 LoRA tensors come in a few dozen shapes, so only
    # the first parameter of each (shape, dtype) in a group is stepped; the others get a
    # state laid out like it (same keys, shapes, dtypes and devices).
    params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    if any(p.device.type != "meta" for p in params):
        raise ValueError("planning by a step needs meta-device parameters; this would update real weights")
    saved = [group["params"] for group in opt.param_groups]
    followers = []
    for group in opt.param_groups:
        reps = {}
        for p in group["params"]:
            if not p.requires_grad:
                continue
            key = (tuple(p.shape), p.dtype)
            if key in reps:
                followers.append((p, reps[key]))
            else:
                reps[key] = p
        group["params"] = list(reps.values())
        if "foreach" in group:  # foreach kernels do not accept meta tensors everywhere
            group["foreach"] = False
        if group.get("fused"):
            group["fused"] = False
    stepped = [p for group in opt.param_groups for p in group["params"]]
    for p in stepped:
        p.grad = torch.zeros_like(p)
    try:
        opt.step()
    finally:
        for group, params_ in zip(opt.param_groups, saved):
            group["params"] = params_
        for p in stepped:
            p.grad = None
    for p, rep in followers:
        opt.state[p] = {k: torch.empty_like(v) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                        for k, v in opt.state[rep].items()}


def _stand_in_step(opt, zero_start) -> None:
    # Prodigy reads values while it allocates (.item(), and a 0-dim p0 for a parameter that
    # is all zero), which meta tensors cannot give. The first parameter of each (shape,
    # dtype, starts at zero) in a group is replaced by a real CPU tensor of that shape
    # (zeros, or ones), stepped with a zero gradient (its state is allocated, nothing is
    # updated: Prodigy returns before the update when every gradient is zero), and every
    # parameter of the key gets a meta state laid out like that stand-in's.
    zero = {id(p) for p in zero_start}
    saved = [group["params"] for group in opt.param_groups]
    layouts, members = {}, []
    for group in opt.param_groups:
        stand_ins = {}
        for p in group["params"]:
            if not p.requires_grad:
                continue
            key = (tuple(p.shape), p.dtype, id(p) in zero)
            if key not in stand_ins:
                fill = torch.zeros if key[2] else torch.ones
                stand_ins[key] = torch.nn.Parameter(fill(p.shape, dtype=p.dtype))
                stand_ins[key].grad = torch.zeros_like(stand_ins[key])
            members.append((p, stand_ins[key]))
        group["params"] = list(stand_ins.values())
    try:
        opt.step()
        for _, stand_in in members:
            layouts.setdefault(id(stand_in), dict(opt.state[stand_in]))
    finally:
        for group, params_ in zip(opt.param_groups, saved):
            group["params"] = params_
        opt.state.clear()
    for p, stand_in in members:
        opt.state[p] = {k: torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                        for k, v in layouts[id(stand_in)].items()}


def init_optimizer_state(opt, include_shadow: bool | None = None, name: str | None = None,
                         zero_start=()) -> None:
    """Make ``opt`` allocate the state its first steps would, without updating anything.
    On meta-device parameters nothing is allocated. ``zero_start``: the parameters a
    fresh adapter starts at zero (for an optimizer whose state depends on values)."""
    if name in VALUE_DEPENDENT_STATE:
        _stand_in_step(opt, zero_start)
    elif takes_loss(opt) and hasattr(opt, "init_state"):
        opt.init_state(include_shadow=include_shadow)
    elif type(opt).__module__.startswith("bitsandbytes") and hasattr(opt, "init_state"):
        _bnb_init_state(opt)
    else:
        _meta_step(opt)


def planned_state_bytes(name: str, params, shadow: bool = False, args: dict | None = None, zero_start=()) -> int:
    """State bytes of optimizer ``name`` for ``params`` (meta-device parameters), of which
    ``zero_start`` start at zero."""
    opt = build_optimizer(name, params, PLAN_LR, shadow=shadow, args=args)
    init_optimizer_state(opt, name=name, zero_start=zero_start)
    n = state_nbytes(opt)
    del opt
    return n
