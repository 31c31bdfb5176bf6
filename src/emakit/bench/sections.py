"""What the benchmark measures, section by section; each returns its tables.

- update cost per shape: one update by every method, as a multiple of the memory-bound *limit* (one flat
  ``lerp_`` over the same number of elements) and of the multi-tensor *floor* (one bare
  ``torch._foreach_lerp_`` over lists built beforehand, the least any update of separate tensors costs);
- the non-finite check that ``skip_nonfinite`` runs, against the update;
- the update's share of a training step; overlapping it with the next step; an fp32 EMA of a bf16 model;
  and, with CUDA, GB/s for a 1B-parameter model.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from emakit.averaging import EMA
from emakit.bench.peers import SMOOTHING, Peer
from emakit.bench.report import Table
from emakit.bench.shapes import averaged_elements, build_model, demo_cnn, describe, tracked
from emakit.bench.timing import Update, time_interleaved
from emakit.engine.flatten import flatten_model_
from emakit.engine.naming import is_averaged
from emakit.functional import compute_ema

__all__ = [
    "LIMIT",
    "bench_cuda",
    "bench_mixed",
    "bench_overlap",
    "bench_shape",
    "bench_step_share",
    "floor_update",
    "started_ema",
]

LIMIT = "limit: one flat lerp_ over the same elements"
FLOOR = "floor: foreach lerp_ over pre-built lists, no_grad"
QUICK = " [--quick: smoke-test sizes, figures not representative]"


def _time(fns: dict[str, Update], args: argparse.Namespace, repeats: int | None = None) -> dict[str, float]:
    """Medians by :func:`time_interleaved` with the run's rounds, sample length and clock."""
    return time_interleaved(fns, repeats or args.repeats, target_s=args.target_s, clock=args.clock)


def started_ema(model: nn.Module, **kwargs: Any) -> EMA:
    """An EMA of ``model`` that has started (as it does at the first optimizer step): ``update`` blends."""
    ema = EMA(smoothing=SMOOTHING, **kwargs)
    ema.attach(model)
    ema.step()  # ema_start '0.0dur': the first step starts the average
    return ema


def floor_update(model: nn.Module) -> Update:
    """The multi-tensor floor for ``model``: one ``_foreach_lerp_`` (and one ``_foreach_copy_`` for integer
    buffers) from the model's tensors into a deep copy's, over lists built once, under ``no_grad``: what
    ``compute_ema`` does with no Python work at all."""
    sources = tracked(model)
    targets = tracked(copy.deepcopy(model))
    blend = [(e, p) for e, p in zip(targets, sources, strict=True) if is_averaged(p)]
    copied = [(e, p) for e, p in zip(targets, sources, strict=True) if not is_averaged(p)]
    blend_e, blend_p = [e for e, _ in blend], [p for _, p in blend]
    copy_e, copy_p = [e for e, _ in copied], [p for _, p in copied]
    weight = 1.0 - SMOOTHING

    def update() -> None:
        with torch.no_grad():
            torch._foreach_lerp_(blend_e, blend_p, weight)
            if copy_e:
                torch._foreach_copy_(copy_e, copy_p)

    return update


def _per_parameter(model: nn.Module) -> Update:
    """The form many training scripts use: one expression with temporaries per tensor."""
    pairs = [(copy.deepcopy(t.detach()), t.detach()) for t in tracked(model)]
    s = SMOOTHING

    @torch.no_grad()
    def update() -> None:
        for e, p in pairs:
            if is_averaged(e):
                e.copy_(e * s + p * (1.0 - s))
            else:
                e.copy_(p)

    return update


def bench_shape(shape: str, args: argparse.Namespace, peers: dict[str, Peer]) -> list[Table]:
    """The update-cost table for one shape, then its non-finite-check table."""
    torch.manual_seed(0)
    model = build_model(shape, args.quick)
    flat_model = copy.deepcopy(model)
    n = averaged_elements(model)
    limit_ema, limit_src = torch.zeros(n), torch.randn(n)
    weight = 1.0 - SMOOTHING

    ema_flat = started_ema(flat_model, flatten_model=True)
    ema_plain = started_ema(model)
    ema_model_flat = copy.deepcopy(flat_model)
    flatten_model_(ema_model_flat)
    ema_model_plain = copy.deepcopy(model)
    fns: dict[str, Update] = {
        LIMIT: lambda: limit_ema.lerp_(limit_src, weight),
        FLOOR: floor_update(model),
        "emakit compute_ema (models as they are)": lambda: compute_ema(model, ema_model_plain, SMOOTHING),
        "emakit EMA.update (model as is)": ema_plain.update,
        "emakit compute_ema, both models flattened": lambda: compute_ema(flat_model, ema_model_flat, SMOOTHING),
        "emakit EMA.update, flatten_model=True": ema_flat.update,
        "per-parameter copy_(e*s + p*(1-s))": _per_parameter(model),
    }
    failed: list[str] = []
    for label, make in peers.items():
        try:
            fns[label] = make(model)
        except Exception as exc:  # a peer that imports but cannot handle this model is noted, not fatal
            failed.append(f"{label.removeprefix('peer: ')} failed on this model: {type(exc).__name__}: {exc}"[:160])
    medians = _time(fns, args)
    limit, floor = medians[LIMIT], medians[FLOOR]
    table = Table(
        f"update cost, {shape}: {describe(model)} ({n / 1e6:.2f}M averaged floats, fp32)"
        + (QUICK if args.quick else ""),
        ("method", "median ms", "x limit", "x floor"),
    )
    for name, seconds in medians.items():
        table.rows.append((name, seconds * 1e3, seconds / limit, seconds / floor))
    table.notes += failed

    floating = [t for t in tracked(flat_model) if t.is_floating_point()]
    flat_buffers = list({t.untyped_storage().data_ptr(): t for t in floating}.values())
    spans = [t.detach().as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0) for t in flat_buffers]

    def foreach_norm_check() -> bool:  # what EMA(skip_nonfinite=True) runs before each update
        norms = torch._foreach_norm(floating, float("inf"))
        return bool(torch.stack([x.float() for x in norms]).isfinite().all())

    def isfinite_check() -> bool:
        return all(bool(s.isfinite().all()) for s in spans)

    def aminmax_check() -> bool:  # one read pass, no temporary; NaN propagates into min and max
        return all(bool(torch.stack(torch.aminmax(s)).isfinite().all()) for s in spans)

    checks = _time(
        {
            "update (EMA.update, flatten_model=True)": ema_flat.update,
            "non-finite check: foreach_norm(inf) per tensor": foreach_norm_check,
            "non-finite check: isfinite().all() per flat buffer": isfinite_check,
            "non-finite check: aminmax per flat buffer": aminmax_check,
        },
        args,
    )
    update = checks.pop("update (EMA.update, flatten_model=True)")
    check_table = Table(
        f"non-finite check on the training weights, {shape}" + (QUICK if args.quick else ""),
        ("check", "median ms", "x update"),
    )
    for name, seconds in checks.items():
        check_table.rows.append((name, seconds * 1e3, seconds / update))
    return [table, check_table]


# ------------------------------------------------------------------ share of a training step
def _resnet_case(quick: bool, batch: int) -> tuple[str, Callable[[], nn.Module], tuple[int, ...], int]:
    """(label, model factory, input shape, classes) for timing training steps of the ResNet-like model."""
    side, size = (32, 2) if quick else (224, batch)
    return f"resnet50-like, {size} x 3x{side}x{side}", lambda: build_model("resnet", quick), (size, 3, side, side), 1000


def _step_fn(model: nn.Module, batch: torch.Tensor, labels: torch.Tensor, momentum: float = 0.0) -> Update:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=momentum)
    model.train()

    def step() -> None:
        loss = nn.functional.cross_entropy(model(batch), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_step_share(args: argparse.Namespace) -> Table:
    """The EMA update's share of forward + backward + optimizer step, at update_interval 1."""
    table = Table(
        "EMA update as a share of a training step (forward + backward + optimizer step), update_interval 1"
        + (QUICK if args.quick else ""),
        ("model and EMA", "step ms", "update ms", "share %"),
    )
    cases: list[tuple[str, Callable[[], nn.Module], tuple[int, ...], int, float]] = [
        ("demo CNN, 16 x 1x8x8, SGD", demo_cnn, (16, 1, 8, 8), 10, 0.0),
    ]
    if "resnet" in args.shapes:
        label, make, input_shape, classes = _resnet_case(args.quick, batch=8)
        cases.append((f"{label}, SGD momentum", make, input_shape, classes, 0.9))
    for label, make, input_shape, classes, momentum in cases:
        torch.manual_seed(0)
        batch = torch.randn(*input_shape)
        labels = torch.randint(0, classes, (input_shape[0],))
        for flatten in (False, True):
            model = make()
            step = _step_fn(model, batch, labels, momentum)
            step()  # optimizer state exists before the EMA starts, as in training
            ema = started_ema(model, flatten_model=flatten)
            repeats = max(3, args.repeats // 2) if input_shape[-1] > 100 else args.repeats
            medians = _time({"step": step, "update": ema.update}, args, repeats)
            share = medians["update"] / (medians["step"] + medians["update"])
            name = f"{label}; EMA({'flatten_model=True' if flatten else 'default'})"
            table.rows.append((name, medians["step"] * 1e3, medians["update"] * 1e3, 100 * share))
    return table


# ------------------------------------------------------------------ overlapping the update with the next step
def _then(first: Update, second: Update) -> Update:
    def both() -> None:
        first()
        second()

    return both


def _mlp(width: int = 2048, depth: int = 8) -> nn.Module:
    """Big weights, little arithmetic per weight at small batches: the update is a visible part of a step."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def bench_overlap(args: argparse.Namespace) -> Table:
    """What the update still adds to a training step with ``EMA(overlap=True)``, against the update in the step."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    how = "CUDA side stream" if device.type == "cuda" else "worker thread"
    table = Table(
        f"EMA update overlapped with the next step ({how}), update_interval 1, flatten_model=True"
        + (QUICK if args.quick else ""),
        ("model", "step ms", "update ms", "step+update ms", "step+overlapped ms", "exposed ms"),
    )
    width, depth, mlp_batch = (256, 2, 4) if args.quick else (2048, 8, 32)
    cases: list[tuple[str, Callable[[], nn.Module], tuple[int, ...], int]] = [
        ("demo CNN, 16 x 1x8x8", demo_cnn, (16, 1, 8, 8), 10),
        (f"MLP {depth} x {width}x{width}, batch {mlp_batch}", lambda: _mlp(width, depth), (mlp_batch, width), 10),
    ]
    if "resnet" in args.shapes and (device.type == "cuda" or args.quick):  # on CPU its step is seconds of noise
        cases.append(_resnet_case(args.quick, batch=64))
    for label, make, input_shape, classes in cases:
        batch = torch.randn(*input_shape, device=device)
        labels = torch.randint(0, classes, (input_shape[0],), device=device)
        steps, emas = [], []
        for overlap in (None, False, True):  # no EMA, the update in the step, the update overlapped
            torch.manual_seed(0)
            model = make().to(device)
            steps.append(_step_fn(model, batch, labels))
            steps[-1]()
            emas.append(None if overlap is None else started_ema(model, flatten_model=True, overlap=overlap))
        sync_ema, overlap_ema = emas[1], emas[2]
        assert sync_ema is not None and overlap_ema is not None
        medians = time_interleaved(
            {
                "step": steps[0],
                "update": sync_ema.update,
                "sync": _then(steps[1], sync_ema.update),
                "overlap": _then(steps[2], overlap_ema.update),
            },
            args.repeats,
            finish={"overlap": overlap_ema.wait},
            target_s=args.target_s,
        )  # always the wall clock: the overlapped part runs on another thread
        ms = {name: seconds * 1e3 for name, seconds in medians.items()}
        table.rows.append((label, ms["step"], ms["update"], ms["sync"], ms["overlap"], ms["overlap"] - ms["step"]))
    table.notes.append(
        "exposed = (step+overlapped) - step, a difference of medians: noisy when the update is a small part of a step"
    )
    return table


# ------------------------------------------------------------------ fp32 EMA of a bf16 model
def bench_mixed(args: argparse.Namespace) -> Table:
    """An fp32 EMA of a bf16 ResNet-like model: the chunked cast + lerp against the alternatives."""
    torch.manual_seed(0)
    model = build_model("resnet", args.quick).to(torch.bfloat16)
    flat_model = copy.deepcopy(model)
    n = averaged_elements(model)
    limit_ema, limit_src = torch.zeros(n), torch.randn(n)
    bf16_src = limit_src.bfloat16()
    weight = 1.0 - SMOOTHING
    ema_flat = started_ema(flat_model, flatten_model=True)
    ema_plain = started_ema(model)
    targets = [t.detach().float() for t in tracked(model) if is_averaged(t)]
    sources = [t.detach() for t in tracked(model) if is_averaged(t)]

    def mul_add() -> None:
        torch._foreach_mul_(targets, SMOOTHING)
        torch._foreach_add_(targets, sources, alpha=weight)

    fns: dict[str, Update] = {
        "limit: one flat fp32 lerp_ over the same elements": lambda: limit_ema.lerp_(limit_src, weight),
        "emakit EMA.update, flatten_model=True (chunked cast + lerp)": ema_flat.update,
        "emakit EMA.update (model as is; batched cast + foreach lerp)": ema_plain.update,
        "foreach mul_ + add_ (mixed dtypes, the previous path)": mul_add,
        "flat: full cast to fp32, then lerp_": lambda: limit_ema.lerp_(bf16_src.float(), weight),
    }
    medians = _time(fns, args)
    limit = medians["limit: one flat fp32 lerp_ over the same elements"]
    table = Table(
        f"fp32 EMA of a bf16 model, resnet: {n / 1e6:.2f}M averaged elements" + (QUICK if args.quick else ""),
        ("method", "median ms", "x limit"),
    )
    for name, seconds in medians.items():
        table.rows.append((name, seconds * 1e3, seconds / limit))
    return table


# ------------------------------------------------------------------ several averages (post-hoc EMA)
def bench_averages(args: argparse.Namespace) -> Table:
    """k averages in one update (``EMA(sigma_rel=[...])``) on the ResNet-like model, as given and flattened,
    against the memory-traffic limit (1 + 2k)/3 flat ``lerp_``s (one read of the weights, a read and a write
    per average), the multi-tensor floor (k bare ``_foreach_lerp_`` over pre-built lists) and k separate
    single-average EMAs of the same model (as given or flattened, like the row)."""
    torch.manual_seed(0)
    model = build_model("resnet", args.quick)
    as_given = copy.deepcopy(model)  # stays unflattened: the default path
    n = averaged_elements(model)
    limit_ema, limit_src = torch.zeros(n), torch.randn(n)
    weight = 1.0 - SMOOTHING
    fns: dict[str, Update] = {"limit": lambda: limit_ema.lerp_(limit_src, weight)}
    separate: dict[str, str] = {}  # row -> the row of k separate EMAs of the same layout
    for k in (2, 4):
        sigma_rels = [0.05 + 0.05 * j for j in range(k)]
        floors = [floor_update(as_given) for _ in range(k)]
        floor_row = f"k={k}: floor, {k} foreach lerp_ over pre-built lists"
        fns[floor_row] = lambda floors=floors: [f() for f in floors]  # type: ignore[misc]
        separate[floor_row] = f"k={k}: {k} separate EMAs, model not flattened"
        for layout, target, flatten in (("model not flattened", as_given, False), ("flattened", model, True)):
            together = EMA(sigma_rel=sigma_rels, flatten_model=flatten)
            together.attach(target)
            together.step()
            apart = []
            for sigma_rel in sigma_rels:
                single = EMA(sigma_rel=sigma_rel, flatten_model=flatten)
                single.attach(target)
                single.step()
                apart.append(single)
            one, several = f"k={k}: one EMA, one pass, {layout}", f"k={k}: {k} separate EMAs, {layout}"
            fns[one] = together.update
            fns[several] = lambda apart=apart: [ema.update() for ema in apart]  # type: ignore[misc]
            separate[one] = separate[several] = several
    medians = _time(fns, args)
    limit = medians.pop("limit")
    table = Table(
        f"several averages in one update, resnet: {n / 1e6:.2f}M averaged elements" + (QUICK if args.quick else ""),
        ("method", "median ms", "x limit (1+2k)/3", "x floor", "x k separate"),
    )
    for name, seconds in medians.items():
        k = int(name.split(":")[0].removeprefix("k="))
        floor = medians[f"k={k}: floor, {k} foreach lerp_ over pre-built lists"]
        x_limit = seconds / limit / ((1 + 2 * k) / 3)
        table.rows.append((name, seconds * 1e3, x_limit, seconds / floor, seconds / medians[separate[name]]))
    table.notes.append(
        "x k separate: against k single-average EMAs of the model in the row's layout (the floor: as given)"
    )
    return table


# ------------------------------------------------------------------ CUDA
def bench_cuda(args: argparse.Namespace) -> Table | str:
    """GB/s of the fp32 EMA update of a bf16 model of >= 1B parameters, against a device-to-device copy."""
    if not torch.cuda.is_available():
        return "CUDA: not available here; skipped the GB/s of a 1B-parameter bf16 model with fp32 EMA."
    device = torch.device("cuda")
    count, size = (64, 1 << 20) if args.quick else (1024, 1 << 20)  # 1024 tensors of 1M = 1.07B parameters
    torch.manual_seed(0)
    model = nn.Module()
    model.tensors = nn.ParameterList(
        nn.Parameter(torch.randn(size, device=device, dtype=torch.bfloat16)) for _ in range(count)
    )
    ema = started_ema(model, flatten_model=True)
    n = count * size
    big_a = torch.empty(n, dtype=torch.float32, device=device)
    big_b = torch.empty_like(big_a)
    medians = time_interleaved({"update": ema.update, "copy": lambda: big_a.copy_(big_b)}, args.repeats)  # wall clock
    moved = n * (2 + 4 + 4)  # read bf16 weights, read and write fp32 averages
    copy_rate = 2 * n * 4 / medians["copy"]
    rate = moved / medians["update"]
    name = torch.cuda.get_device_name(device)
    table = Table(f"CUDA ({name}): fp32 EMA of a {n / 1e9:.2f}B-parameter bf16 model", ("what", "ms", "GB/s"))
    table.rows.append(("device-to-device fp32 copy_ (achievable bandwidth)", medians["copy"] * 1e3, copy_rate / 1e9))
    table.rows.append(("EMA.update, flatten_model=True", medians["update"] * 1e3, rate / 1e9))
    table.notes.append(
        f"update at {100 * rate / copy_rate:.0f}% of the measured copy bandwidth (10 bytes per parameter)"
    )
    return table
