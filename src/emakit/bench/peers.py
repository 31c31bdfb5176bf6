"""The libraries users pick instead of emakit, each driven the way its documentation shows.

Each peer is imported once per run; one that is not installed (or does not import beside this torch) is
listed once as skipped. Two need help here, and the run says so:

- timm's package import needs torchvision, whose wheels pin their own torch; its EMA module itself needs only
  torch, so it is loaded from its file when the package does not import.
- Composer's package imports torchvision and MosaicML's platform client (``mcli``) at import time, though its
  ``compute_ema`` uses neither; when they are not installed it is imported with empty stand-ins for them,
  which are removed again afterwards.
"""

from __future__ import annotations

import copy
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from emakit.bench.timing import Update

__all__ = ["SMOOTHING", "Peer", "load_peers"]

SMOOTHING = 0.999

#: Builds a peer's update over a model (its EMA copy made inside) and returns the call to time.
Peer = Callable[[nn.Module], Update]


def _averaged_model() -> tuple[Peer, str]:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    def make(model: nn.Module) -> Update:
        avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(SMOOTHING), use_buffers=True)
        avg.update_parameters(model)  # the first call copies
        return lambda: avg.update_parameters(model)

    return make, "torch"


def _timm() -> tuple[Peer, str]:
    model_ema: Any
    how = ""
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
        how = ", ModelEmaV3 loaded from its module file (the package import needs torchvision)"

    def make(model: nn.Module) -> Update:
        ema = model_ema.ModelEmaV3(model, decay=SMOOTHING, foreach=True)
        return lambda: ema.update(model)

    return make, _version("timm") + how


def _ema_pytorch() -> tuple[Peer, str]:
    from ema_pytorch import EMA as PeerEMA

    def make(model: nn.Module) -> Update:
        ema = PeerEMA(
            model, beta=SMOOTHING, update_after_step=0, update_every=1, use_foreach=True, include_online_model=False
        )
        ema.update()  # the first call copies
        return ema.update

    return make, _version("ema-pytorch")


def _torch_ema() -> tuple[Peer, str]:
    from torch_ema import ExponentialMovingAverage

    def make(model: nn.Module) -> Update:
        ema = ExponentialMovingAverage([p for p in model.parameters() if p.requires_grad], decay=SMOOTHING)
        return ema.update

    return make, _version("torch-ema")


def _diffusers() -> tuple[Peer, str]:
    from diffusers.training_utils import EMAModel

    def make(model: nn.Module) -> Update:
        ema = EMAModel(model.parameters(), decay=SMOOTHING, foreach=True)
        return lambda: ema.step(model.parameters())

    return make, _version("diffusers")


def _composer() -> tuple[Peer, str]:
    stand_ins = [name for name in ("torchvision", "mcli") if importlib.util.find_spec(name) is None]
    module = _import_with_stand_ins("composer.algorithms.ema.ema", stand_ins)
    compute_ema = module.compute_ema

    def make(model: nn.Module) -> Update:
        ema_model = copy.deepcopy(model)
        return lambda: compute_ema(model, ema_model, smoothing=SMOOTHING)

    how = f", imported with empty stand-ins for {' and '.join(stand_ins)} (not installed)" if stand_ins else ""
    return make, _version("mosaicml") + how


class _StandIn(types.ModuleType):
    """An empty module: every attribute is a new empty class, enough for ``from x import Y`` at import time."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__path__: list[str] = []  # a package, so that its submodules import too

    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {})
        setattr(self, name, value)
        return value


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: Sequence[str]) -> None:
        self.roots = set(roots)

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name.partition(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _StandIn(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _import_with_stand_ins(name: str, roots: Sequence[str]) -> types.ModuleType:
    """Import ``name`` while the packages ``roots`` are empty stand-ins; remove the stand-ins afterwards, so
    that nothing else in this process mistakes them for the real packages."""
    if not roots:
        return importlib.import_module(name)
    finder = _StandInFinder(roots)
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module(name)
    finally:
        sys.meta_path.remove(finder)
        for key in [k for k, m in sys.modules.items() if isinstance(m, _StandIn)]:
            del sys.modules[key]


def _version(distribution: str) -> str:
    try:
        return f"{distribution} {importlib.metadata.version(distribution)}"
    except importlib.metadata.PackageNotFoundError:
        return distribution


#: (row label, loader); the loader imports the peer and returns its update factory and a line saying what ran.
PEERS: list[tuple[str, Callable[[], tuple[Peer, str]]]] = [
    ("peer: torch AveragedModel + get_ema_multi_avg_fn", _averaged_model),
    ("peer: timm ModelEmaV3 (foreach)", _timm),
    ("peer: ema-pytorch EMA (use_foreach)", _ema_pytorch),
    ("peer: torch_ema ExponentialMovingAverage", _torch_ema),
    ("peer: diffusers EMAModel (foreach)", _diffusers),
    ("peer: Composer compute_ema", _composer),
]


def load_peers() -> tuple[dict[str, Peer], list[str]]:
    """Import every peer once: the importable ones by row label, and one line per peer (used or skipped)."""
    found: dict[str, Peer] = {}
    lines: list[str] = []
    for label, load in PEERS:
        short = label.removeprefix("peer: ")
        try:
            found[label], how = load()
        except Exception as exc:  # an optional peer that does not import here is skipped, not fatal
            reason = str(exc).splitlines()[0][:90] if str(exc) else ""
            lines.append(f"skipped {short}: {type(exc).__name__}: {reason}")
        else:
            lines.append(f"{short}: {how}")
    return found, lines
