"""``emakit bench``: what one EMA update costs, next to the memory-bound limit and the libraries users pick instead.

An EMA update reads the weights and reads and writes the average, so its floor is one fused kernel over one
flat buffer of the same size: the *limit* row, a single ``lerp_``. Every other row is a ratio to it, measured
in the same process with the same thread count, rounds interleaved so that background load hits all rows
alike. Three model shapes: a ResNet-50-like conv net (~25M parameters, ~160 parameter tensors), a
ViT-B-like transformer (~86M, ~150 tensors) and 4,000 tensors of 256 floats, where per-tensor overhead
dominates. Peers (timm, torch's AveragedModel, ema-pytorch, torch_ema, diffusers, Composer) are used if
importable and listed as skipped otherwise. Further sections: the update's share of a training step, the
cost of a non-finite check, an fp32 EMA of a bf16 model, and (with CUDA) GB/s for a 1B-parameter model.

Run ``emakit bench`` or ``python benchmarks/update_cost.py``; ``--quick`` shrinks everything to a smoke test.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import math
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import emakit
from emakit.algorithms.ema import EMA
from emakit.flatten import flatten_model_
from emakit.functional import compute_ema, is_averaged

__all__ = ["SHAPES", "Table", "build_model", "main"]

SHAPES = ("resnet", "vit", "many")
SMOOTHING = 0.999
_TARGET_SAMPLE_S = 0.01  # repeat fast calls within a sample to last about this long (a cold first call amortised)

Update = Callable[[], object]


# ------------------------------------------------------------------ models (built from torch modules, no downloads)
class _Bottleneck(nn.Module):
    def __init__(self, in_ch: int, mid: int, stride: int) -> None:
        super().__init__()
        out = mid * 4
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.down: nn.Module | None = None
        if stride != 1 or in_ch != out:
            self.down = nn.Sequential(nn.Conv2d(in_ch, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNetLike(nn.Module):
    """ResNet-50's layout (bottlenecks 3-4-6-3): 25.6M parameters in 161 tensors plus 159 BatchNorm buffers."""

    def __init__(self, width: int = 64, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks: list[nn.Module] = []
        in_ch = width
        for stage, depth in enumerate((3, 4, 6, 3)):
            mid = width * 2**stage
            for i in range(depth):
                blocks.append(_Bottleneck(in_ch, mid, 2 if i == 0 and stage > 0 else 1))
                in_ch = mid * 4
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class ViTLike(nn.Module):
    """ViT-B/16's layout: patch embedding, 12 pre-norm encoder layers of width 768: 86.6M parameters, 152 tensors."""

    def __init__(self, dim: int = 768, depth: int = 12, heads: int = 12, image: int = 224, patch: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1) + self.pos
        return self.head(self.norm(self.encoder(tokens))[:, 0])


class ManyTensors(nn.Module):
    """``count`` parameter tensors of ``size`` floats: per-tensor overhead dominates its update."""

    def __init__(self, count: int = 4000, size: int = 256) -> None:
        super().__init__()
        self.tensors = nn.ParameterList(nn.Parameter(torch.randn(size)) for _ in range(count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum((p.sum() for p in self.tensors), x.sum())


def demo_cnn() -> nn.Module:
    """The demo's CNN for 8x8 single-channel digits (about 10k parameters, two BatchNorm layers)."""
    from emakit.demo.model import DigitsCNN

    return DigitsCNN(in_channels=1, num_classes=10)


def build_model(shape: str, quick: bool = False) -> nn.Module:
    """The benchmark model for ``shape`` (one of :data:`SHAPES`); ``quick`` gives a small stand-in."""
    if shape == "resnet":
        return ResNetLike(width=8 if quick else 64)
    if shape == "vit":
        return ViTLike(dim=64, depth=2, heads=4) if quick else ViTLike()
    if shape == "many":
        return ManyTensors(count=400 if quick else 4000)
    raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")


# ------------------------------------------------------------------ timing
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _once(fn: Update, inner: int, finish: Update | None = None) -> float:
    _sync()
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    if finish is not None:
        finish()
    _sync()
    return (time.perf_counter() - start) / inner


def time_interleaved(
    fns: dict[str, Update], repeats: int, warmup: int = 1, finish: dict[str, Update] | None = None
) -> dict[str, float]:
    """Median seconds per call of each function, sampled in rounds of one sample each, in shuffled order.

    ``finish[name]``, if given, runs at the end of each of that function's samples, inside the timing (to
    wait for work the function left running).
    """
    finish = finish or {}
    inner: dict[str, int] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        estimate = min(_once(fn, 1, finish.get(name)) for _ in range(3))
        inner[name] = max(1, min(1000, int(_TARGET_SAMPLE_S / max(estimate, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)  # no row always runs just after the same other row (cache contents, clock ramps)
        for name in order:
            samples[name].append(_once(fns[name], inner[name], finish.get(name)))
    return {name: statistics.median(values) for name, values in samples.items()}


# ------------------------------------------------------------------ tables
@dataclass
class Table:
    """A titled table of rows; rendered as aligned text (parsed by the smoke test) or markdown."""

    title: str
    headers: tuple[str, ...]
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def render(self, markdown: bool = False) -> str:
        cells = [[_cell(v) for v in row] for row in self.rows]
        if markdown:
            lines = [f"**{self.title}**", "", "| " + " | ".join(self.headers) + " |"]
            lines.append("|" + "|".join(["---"] + ["---:"] * (len(self.headers) - 1)) + "|")
            lines += ["| " + " | ".join(row) + " |" for row in cells]
            lines += [""] + [f"- {note}" for note in self.notes]
            return "\n".join(lines) + "\n"
        widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(self.headers)]
        widths[0] = max(widths[0], 40)
        fmt = "  ".join([f"{{:<{widths[0]}}}"] + [f"{{:>{w}}}" for w in widths[1:]])
        lines = [f"== {self.title}", fmt.format(*self.headers), "-" * (sum(widths) + 2 * (len(widths) - 1))]
        lines += [fmt.format(*row) for row in cells]
        lines += [f"   note: {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3f}" if value < 100 else f"{value:.1f}"
    return str(value)


# ------------------------------------------------------------------ the update methods
def _tracked(model: nn.Module) -> list[torch.Tensor]:
    """What emakit's EMA tracks: trainable parameters and all buffers."""
    return [p for p in model.parameters() if p.requires_grad] + list(model.buffers())


def _started_ema(model: nn.Module, **kwargs: Any) -> EMA:
    ema = EMA(smoothing=SMOOTHING, **kwargs)
    ema.attach(model)
    ema._initialise(0)  # start now, as the Trainer would at the first batch end
    return ema


def _per_parameter(model: nn.Module) -> Update:
    """The form many training scripts (and Composer) use: one expression with temporaries per tensor."""
    pairs = [(copy.deepcopy(t.detach()), t.detach()) for t in _tracked(model)]
    s = SMOOTHING

    @torch.no_grad()
    def update() -> None:
        for e, p in pairs:
            if is_averaged(e):
                e.copy_(e * s + p * (1.0 - s))
            else:
                e.copy_(p)

    return update


def _peer_updates(model: nn.Module) -> tuple[dict[str, Update], list[str]]:
    """Each importable peer's update over ``model``, and a line per skipped peer."""
    found: dict[str, Update] = {}
    skipped: list[str] = []
    for label, make in _PEERS:
        try:
            found[label] = make(model)
        except Exception as exc:  # an optional peer that does not import or run here is skipped, not fatal
            skipped.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:90] if str(exc) else ''}")
    return found, skipped


def _averaged_model(model: nn.Module) -> Update:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(SMOOTHING), use_buffers=True)
    avg.update_parameters(model)  # the first call copies
    return lambda: avg.update_parameters(model)


def _timm(model: nn.Module) -> Update:
    model_ema: Any
    try:
        model_ema = importlib.import_module("timm.utils.model_ema")
    except Exception:  # timm's package import needs torchvision; its EMA module itself needs only torch
        spec = importlib.util.find_spec("timm")
        if spec is None or not spec.submodule_search_locations:
            raise
        path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "model_ema.py"
        file_spec = importlib.util.spec_from_file_location("_emakit_bench_timm_model_ema", path)
        assert file_spec is not None and file_spec.loader is not None
        model_ema = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(model_ema)
    ema = model_ema.ModelEmaV3(model, decay=SMOOTHING, foreach=True)
    return lambda: ema.update(model)


def _ema_pytorch(model: nn.Module) -> Update:
    from ema_pytorch import EMA as PeerEMA

    ema = PeerEMA(
        model, beta=SMOOTHING, update_after_step=0, update_every=1, use_foreach=True, include_online_model=False
    )
    ema.update()  # the first call copies
    return ema.update


def _torch_ema(model: nn.Module) -> Update:
    from torch_ema import ExponentialMovingAverage

    ema = ExponentialMovingAverage([p for p in model.parameters() if p.requires_grad], decay=SMOOTHING)
    return ema.update


def _diffusers(model: nn.Module) -> Update:
    from diffusers.training_utils import EMAModel

    ema = EMAModel(model.parameters(), decay=SMOOTHING, foreach=True)
    return lambda: ema.step(model.parameters())


def _composer(model: nn.Module) -> Update:
    from composer.algorithms.ema.ema import compute_ema as composer_compute_ema

    ema_model = copy.deepcopy(model)
    return lambda: composer_compute_ema(model, ema_model, smoothing=SMOOTHING)


_PEERS: list[tuple[str, Callable[[nn.Module], Update]]] = [
    ("peer: torch AveragedModel + get_ema_multi_avg_fn", _averaged_model),
    ("peer: timm ModelEmaV3 (foreach)", _timm),
    ("peer: ema-pytorch EMA (use_foreach)", _ema_pytorch),
    ("peer: torch_ema ExponentialMovingAverage", _torch_ema),
    ("peer: diffusers EMAModel (foreach)", _diffusers),
    ("peer: Composer compute_ema", _composer),
]


def _elements(model: nn.Module) -> int:
    return sum(t.numel() for t in _tracked(model) if is_averaged(t))


def _describe(model: nn.Module) -> str:
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = list(model.buffers())
    return f"{sum(p.numel() for p in params) / 1e6:.1f}M parameters in {len(params)} tensors" + (
        f" + {len(buffers)} buffers" if buffers else ""
    )


def bench_shape(shape: str, args: argparse.Namespace) -> list[Table]:
    """The update-cost table for one shape, then its non-finite-check table."""
    torch.manual_seed(0)
    model = build_model(shape, args.quick)
    flat_model = copy.deepcopy(model)
    n = _elements(model)
    limit_ema, limit_src = torch.zeros(n), torch.randn(n)
    weight = 1.0 - SMOOTHING

    ema_flat = _started_ema(flat_model, flatten_model=True)
    ema_plain = _started_ema(model)
    ema_model_flat = copy.deepcopy(flat_model)
    flatten_model_(ema_model_flat)
    ema_model_plain = copy.deepcopy(model)
    fns: dict[str, Update] = {
        "limit: one flat lerp_ over the same elements": lambda: limit_ema.lerp_(limit_src, weight),
        "emakit EMA.update, flatten_model=True": ema_flat.update,
        "emakit EMA.update (model as is)": ema_plain.update,
        "emakit compute_ema, both models flattened": lambda: compute_ema(flat_model, ema_model_flat, SMOOTHING),
        "emakit compute_ema (models as they are)": lambda: compute_ema(model, ema_model_plain, SMOOTHING),
        "per-parameter copy_(e*s + p*(1-s))": _per_parameter(model),
    }
    skipped: list[str] = []
    if not args.no_peers:
        peers, skipped = _peer_updates(model)
        fns.update(peers)
    medians = time_interleaved(fns, args.repeats)
    limit = medians["limit: one flat lerp_ over the same elements"]
    table = Table(
        f"update cost, {shape}: {_describe(model)} ({n / 1e6:.2f}M averaged floats, fp32)",
        ("method", "median ms", "x limit"),
    )
    for name, seconds in medians.items():
        table.rows.append((name, seconds * 1e3, seconds / limit))
    table.notes += [f"skipped {line}" for line in skipped]

    floating = [t for t in _tracked(flat_model) if t.is_floating_point()]
    flat_buffers = list({t.untyped_storage().data_ptr(): t for t in floating}.values())
    spans = [t.detach().as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0) for t in flat_buffers]

    def foreach_norm_check() -> bool:  # what EMA(skip_nonfinite=True) runs before each update
        norms = torch._foreach_norm(floating, float("inf"))
        return bool(torch.stack([x.float() for x in norms]).isfinite().all())

    def isfinite_check() -> bool:
        return all(bool(s.isfinite().all()) for s in spans)

    def aminmax_check() -> bool:  # one read pass, no temporary; NaN propagates into min and max
        return all(bool(torch.stack(torch.aminmax(s)).isfinite().all()) for s in spans)

    checks = time_interleaved(
        {
            "update (EMA.update, flatten_model=True)": ema_flat.update,
            "non-finite check: foreach_norm(inf) per tensor": foreach_norm_check,
            "non-finite check: isfinite().all() per flat buffer": isfinite_check,
            "non-finite check: aminmax per flat buffer": aminmax_check,
        },
        args.repeats,
    )
    update = checks.pop("update (EMA.update, flatten_model=True)")
    check_table = Table(f"non-finite check on the training weights, {shape}", ("check", "median ms", "x update"))
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
        "EMA update as a share of a training step (forward + backward + optimizer step), update_interval 1",
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
            ema = _started_ema(model, flatten_model=flatten)
            repeats = max(3, args.repeats // 2) if input_shape[-1] > 100 else args.repeats
            medians = time_interleaved({"step": step, "update": ema.update}, repeats)
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
        f"EMA update overlapped with the next step ({how}), update_interval 1, flatten_model=True",
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
            emas.append(None if overlap is None else _started_ema(model, flatten_model=True, overlap=overlap))
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
        )
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
    n = _elements(model)
    limit_ema, limit_src = torch.zeros(n), torch.randn(n)
    bf16_src = limit_src.bfloat16()
    weight = 1.0 - SMOOTHING
    ema_flat = _started_ema(flat_model, flatten_model=True)
    ema_plain = _started_ema(model)
    targets = [t.detach().float() for t in _tracked(model) if is_averaged(t)]
    sources = [t.detach() for t in _tracked(model) if is_averaged(t)]

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
    medians = time_interleaved(fns, args.repeats)
    limit = medians["limit: one flat fp32 lerp_ over the same elements"]
    table = Table(
        f"fp32 EMA of a bf16 model, resnet: {n / 1e6:.2f}M averaged elements", ("method", "median ms", "x limit")
    )
    for name, seconds in medians.items():
        table.rows.append((name, seconds * 1e3, seconds / limit))
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
    ema = _started_ema(model, flatten_model=True)
    n = count * size
    big_a = torch.empty(n, dtype=torch.float32, device=device)
    big_b = torch.empty_like(big_a)
    medians = time_interleaved({"update": ema.update, "copy": lambda: big_a.copy_(big_b)}, args.repeats)
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


# ------------------------------------------------------------------ main
def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (
        f"emakit {emakit.__version__}, torch {torch.__version__}, Python {platform.python_version()}, {cpu}{gpu}, "
        f"{torch.get_num_threads()} torch threads"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emakit bench",
        description="Time one EMA update for emakit, the memory-bound limit and installed peer libraries.",
    )
    parser.add_argument("--quick", action="store_true", help="small models and few repeats: a smoke test in seconds")
    parser.add_argument(
        "--shapes",
        default=",".join(SHAPES),
        help=f"comma-separated subset of {','.join(SHAPES)} (default: all)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per row (default 15, 3 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's current setting)")
    parser.add_argument("--no-peers", action="store_true", help="skip the peer libraries")
    parser.add_argument("--no-step", action="store_true", help="skip the training-step share")
    parser.add_argument("--no-mixed", action="store_true", help="skip the fp32-EMA-of-bf16 table")
    parser.add_argument("--no-overlap", action="store_true", help="skip the overlapped-update table")
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    return parser


def _parse_shapes(text: str, parser: argparse.ArgumentParser) -> list[str]:
    shapes = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not shapes:
        parser.error(f"--shapes: expected a comma-separated subset of {','.join(SHAPES)}, got {text!r}")
    return shapes


def run(args: argparse.Namespace) -> Iterator[Table | str]:
    """The benchmark's tables, in order, as they are measured."""
    for shape in args.shapes:
        yield from bench_shape(shape, args)
    if not args.no_step:
        yield bench_step_share(args)
    if not args.no_mixed and "resnet" in args.shapes:
        yield bench_mixed(args)
    if not args.no_overlap:
        yield bench_overlap(args)
    yield bench_cuda(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark with command-line arguments ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = _parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    args.shapes = _parse_shapes(args.shapes, parser)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 15
    if args.repeats < 1:
        parser.error(f"--repeats: must be at least 1, got {args.repeats}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads: must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    print(_machine(), flush=True)
    print(f"smoothing {SMOOTHING}; median of {args.repeats} interleaved rounds per row\n", flush=True)
    for item in run(args):
        print(item.render(args.markdown) if isinstance(item, Table) else item + "\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
