"""Follow one argument of the Lightning ``EMACallback`` through emakit at run time, event by event.

A profiler records every emakit function that receives the argument, or a value that a function receiving it
returned (its attributes and items too), in call order: construction, a 5-step fit that starts the average at
step 2, a checkpoint, and a resumed fit. ``python tests/architecture/argument_route.py half_life`` (or
``params``) prints the modules visited per event, time.py's unit queries left out, and how often the route
returns to a module it had left; ``--src DIR`` follows another checkout's ``src`` (an older emakit, say).
tests/architecture/test_argument_route.py checks what it finds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

SMALL = 64  # containers searched for the argument (and taken apart when returned) up to this length


@dataclass
class Route:
    """The calls that carried the argument: (event, module relative to src, function), in order."""

    src: str
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    event: str = "construct"
    _carried: set[int] = field(default_factory=set)
    _kept: list[Any] = field(default_factory=list)  # keeps every carried value alive, so no id is reused
    _frames: set[int] = field(default_factory=set)

    def carry(self, value: Any) -> None:
        if not isinstance(value, (int, bool, type(None))):
            self._carried.add(id(value))
            self._kept.append(value)

    def _holds(self, value: Any) -> bool:
        if id(value) in self._carried:
            return True
        if isinstance(value, (list, tuple)) and len(value) < SMALL:
            return any(id(v) in self._carried for v in value)
        if isinstance(value, dict) and len(value) < SMALL:
            return any(id(v) in self._carried for v in value.values())
        return False

    def profile(self, frame: FrameType, what: str, result: Any) -> None:
        code = frame.f_code
        if not code.co_filename.startswith(self.src):
            return
        if what == "call":
            if code.co_filename.endswith(os.path.join("integrations", "lightning.py")) and code.co_name.startswith(
                "on_"
            ):
                self.event = code.co_name
            count = code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & 4) + bool(code.co_flags & 8)
            if any(self._holds(frame.f_locals.get(name)) for name in code.co_varnames[:count]):
                self._frames.add(id(frame))
                self.calls.append((self.event, os.path.relpath(code.co_filename, self.src), code.co_qualname))
        elif what == "return" and id(frame) in self._frames:
            self._frames.discard(id(frame))
            self._carry_result(result)

    def _carry_result(self, result: Any) -> None:
        import torch

        if result is None or isinstance(result, (int, bool, torch.nn.Module)):
            return
        self.carry(result)
        parts = list(result) if isinstance(result, (list, tuple)) and len(result) < SMALL else []
        if hasattr(result, "__dict__") and not isinstance(result, type):
            parts += [v for v in vars(result).values() if not isinstance(v, (torch.nn.Module, torch.Tensor))]
        for part in parts:
            self.carry(part)
            if isinstance(part, (list, tuple)) and len(part) < SMALL:
                for item in part:
                    self.carry(item)


def follow(argument: str, src: Path) -> Route:
    """Run the callback's construction, a fit, a checkpoint and a resumed fit, following ``argument``."""
    sys.path.insert(0, str(src))
    warnings.filterwarnings("ignore")
    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from emakit.integrations.lightning import EMACallback

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Linear(4, 8), nn.Linear(8, 2)

        def training_step(self, batch: Any, index: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.head(torch.relu(self.body(x))), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(x, (x[:, 0] > 0).long())
    route = Route(str(src.resolve()) + os.sep)
    value: Any = "4ba" if argument == "half_life" else ["body.*", "head.weight"]
    route.carry(value)
    kwargs = {argument: value, "ema_start": "2ba"}
    folder = tempfile.mkdtemp()

    def fit(steps: int, checkpoint: str | None = None) -> pl.Trainer:
        route.event = "construct"
        sys.setprofile(route.profile)
        try:
            callback = EMACallback(**kwargs)
            trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                                 enable_model_summary=False, enable_checkpointing=False, default_root_dir=folder,
                                 callbacks=[callback])  # fmt: skip
            torch.manual_seed(0)
            trainer.fit(Net(), DataLoader(data, batch_size=8), ckpt_path=checkpoint)
        finally:
            sys.setprofile(None)
        return trainer

    path = os.path.join(folder, "mid.ckpt")
    fit(5).save_checkpoint(path)
    route.calls.append(("resume", "", ""))
    fit(7, path)
    return route


def stays(modules: list[str]) -> list[str]:
    """Consecutive calls in one module folded into one stay."""
    return [m for i, m in enumerate(modules) if i == 0 or modules[i - 1] != m]


def returns(modules: list[str]) -> int:
    """How often a route of stays comes back to a module it had left."""
    return sum(m in modules[:i] for i, m in enumerate(modules))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("argument", choices=["half_life", "params"])
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[2] / "src")
    args = parser.parse_args()
    route = follow(args.argument, args.src)
    part = "first fit"
    events: dict[str, list[str]] = {}
    for event, module, _ in route.calls:
        if event == "resume":
            part = "resumed fit"
            continue
        if module != "emakit/time.py":
            events.setdefault(f"{part}: {event}", []).append(module.removeprefix("emakit/"))
    for name, modules in events.items():
        route_stays = stays(modules)
        print(f"{name} ({len(modules)} calls, {returns(route_stays)} returns): {' -> '.join(route_stays)}")


if __name__ == "__main__":
    main()
