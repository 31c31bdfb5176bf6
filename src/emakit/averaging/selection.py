"""Which tensors the EMA keeps: the parameter selection (``params``) and the buffer policy (``buffers``).

Both are checked once, in the averager's constructor (:func:`parse_selection`), and applied to a model by
:func:`decide`, which the tracked set (:class:`~emakit.averaging.tracked.TrackedModel`) calls at attach, to
refuse a choice that names nothing in the model, and when the average starts, which fixes the set for the rest
of the run (and for every resume of it).

- ``params``: ``"trainable"`` (default) selects the parameters that require grad *when the average
  starts*; ``"all"`` every parameter, frozen ones included; a list of glob patterns (:mod:`fnmatch`, on the
  canonical name) the parameters any of them matches; a callable ``(name, tensor) -> bool`` those it
  accepts, asked when the average starts.
- ``buffers``: what happens to floating buffers (BatchNorm's running mean and variance): ``"average"``
  (default) blends them like parameters, ``"copy"`` keeps the model's value at each update, ``"share"``
  keeps nothing (the EMA model uses the training model's own buffer). A mapping ``{pattern: policy}``
  chooses per buffer: the first pattern that matches a buffer's canonical name decides, and a buffer no
  pattern matches is averaged (``"*"`` as the last key sets another default). Integer and bool buffers
  (``num_batches_tracked``) are always copied.

A tensor the EMA does not keep costs no memory: the eval swap leaves it in place, ``ema_model`` shares it
with the training model, and checkpoints and exports hold the training model's value for it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
from torch import nn

from emakit.engine.naming import is_averaged, named_tensors

__all__ = [
    "BUFFER_POLICIES",
    "PARAM_CHOICES",
    "BufferPolicy",
    "Decision",
    "ParamSelection",
    "Selection",
    "decide",
    "parse_selection",
]

PARAM_CHOICES = ("trainable", "all")
BUFFER_POLICIES = ("average", "copy", "share")

#: What ``params`` accepts: a choice of :data:`PARAM_CHOICES`, glob patterns, or a predicate on (name, tensor).
ParamSelection: TypeAlias = str | Sequence[str] | Callable[[str, torch.Tensor], bool]
#: What ``buffers`` accepts: one policy of :data:`BUFFER_POLICIES`, or ``{glob pattern: policy}``.
BufferPolicy: TypeAlias = str | Mapping[str, str]


@dataclass(frozen=True)
class Selection:
    """``params`` and ``buffers`` after checking: ``patterns`` for glob lists, ``rules`` in the order given."""

    params: str | tuple[str, ...] | Callable[[str, torch.Tensor], bool]
    rules: tuple[tuple[str, str], ...]
    default: str


@dataclass(frozen=True)
class Decision:
    """The tensors the EMA keeps, in the model's order, and the floating buffers among them that it copies."""

    names: list[str]
    copied: list[str]


def parse_selection(params: Any, buffers: Any) -> Selection:
    """Check ``params`` and ``buffers`` (see the module docstring); raise naming the argument otherwise."""
    accepted = "'trainable', 'all', a list of glob patterns on parameter names, or a callable (name, tensor) -> bool"
    checked: str | tuple[str, ...] | Callable[[str, torch.Tensor], bool]
    if isinstance(params, str):
        if params not in PARAM_CHOICES:
            raise ValueError(f"params must be {accepted}, got {params!r} (a pattern goes in a list: [{params!r}])")
        checked = params
    elif callable(params):
        checked = params
    elif isinstance(params, Sequence) and not isinstance(params, (bytes, bytearray)):
        patterns = tuple(params)
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise ValueError(f"params must be {accepted}, got {params!r}")
        checked = patterns
    else:
        raise TypeError(f"params must be {accepted}, got {type(params).__name__}")
    policies = ", ".join(map(repr, BUFFER_POLICIES))
    if isinstance(buffers, str):
        if buffers not in BUFFER_POLICIES:
            raise ValueError(f"buffers must be one of {policies} or a dict {{pattern: policy}}, got {buffers!r}")
        return Selection(checked, (), buffers)
    if not isinstance(buffers, Mapping) or not buffers:
        raise ValueError(f"buffers must be one of {policies} or a non-empty dict {{pattern: policy}}, got {buffers!r}")
    for pattern, policy in buffers.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"buffers: every pattern must be a non-empty string, got {pattern!r}")
        if policy not in BUFFER_POLICIES:
            raise ValueError(f"buffers: the policy for {pattern!r} must be one of {policies}, got {policy!r}")
    return Selection(checked, tuple(buffers.items()), "average")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def decide(selection: Selection, model: nn.Module, *, at_start: bool) -> Decision:
    """The tensors of ``model`` the EMA keeps under ``selection``, by canonical name, in the model's order.

    ``at_start`` says the average starts now: a ``"trainable"`` selection that finds no parameter requiring
    grad is then an error (at attach, parameters frozen now may be unfrozen before the start). Patterns that
    match nothing, and a selection of no parameter, are errors at any time.
    """
    tensors = named_tensors(model)
    params = named_tensors(model, include_buffers=False)
    chosen = selection.params
    if chosen == "all":
        kept = set(params)
    elif chosen == "trainable":
        kept = {n for n, p in params.items() if p.requires_grad}
        if at_start and params and not kept:
            raise ValueError(
                "params='trainable' selects the parameters that require grad when the EMA starts, and none does: "
                "unfreeze them before ema_start, or choose them by name (params=[patterns])"
            )
    elif isinstance(chosen, tuple):
        for pattern in chosen:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in params):
                raise ValueError(
                    f"params: the pattern {pattern!r} matches no parameter of the model "
                    f"(names are canonical, e.g. {next(iter(params), '<none>')!r})"
                )
        kept = {n for n in params if _matches(n, chosen)}
    else:
        kept = set()
        for n, p in params.items():
            answer = chosen(n, p)  # type: ignore[operator]
            if not isinstance(answer, (bool, torch.Tensor)) and answer is not None:
                raise TypeError(f"params: the callable must return a bool, got {answer!r} for {n!r}")
            if answer:
                kept.add(n)
        if not kept:
            raise ValueError("params: the callable accepts no parameter of the model")
    buffers = {n: t for n, t in tensors.items() if n not in params}
    for pattern, _ in selection.rules:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in buffers):
            raise ValueError(
                f"buffers: the pattern {pattern!r} matches no buffer of the model "
                f"(its buffers: {sorted(buffers)[:8]}{' ...' if len(buffers) > 8 else ''})"
            )
    copied: list[str] = []
    for name, tensor in buffers.items():
        if not is_averaged(tensor):
            kept.add(name)  # integer and bool buffers: always copied, by their dtype
            continue
        policy = next((p for pattern, p in selection.rules if fnmatch.fnmatchcase(name, pattern)), selection.default)
        if policy != "share":
            kept.add(name)
        if policy == "copy":
            copied.append(name)
    return Decision([n for n in tensors if n in kept], copied)
