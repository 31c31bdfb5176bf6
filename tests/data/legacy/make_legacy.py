"""Writes the checkpoints in this folder; it is run on emakit at commit 61bdd8f (before the one-averager layout),
so that tests/averaging/test_legacy_checkpoints.py proves states written by that code still resume.

Each case saves a state mid-run and, beside it, the average the old code reached after continuing the same run
(``*-expected.pt``). The any-loop cases also keep the training weights after every step (``*-weights.pt``), so
the test can replay the run without training: the bits of training arithmetic differ between CPUs, the replayed
averaging does not. Run it from the repository root with the old code on the path:
``PYTHONPATH=<checkout of 61bdd8f>/src python tests/data/legacy/make_legacy.py`` (it overwrites only its own files;
``--any-loop`` writes the any-loop cases alone).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))
from conftest import make_loader, make_model  # noqa: E402
from emakit import EMA as TrainerEMA  # noqa: E402
from emakit import SWA as TrainerSWA  # noqa: E402
from emakit.averaging import EMA, SWA  # noqa: E402
from emakit.trainer import Trainer  # noqa: E402


def loop_steps(model: torch.nn.Module, averager: object, start: int, stop: int, record: list | None = None) -> None:
    """Deterministic SGD steps ``start..stop-1`` on fixed batches, the averager stepped after each (the weights
    after each step appended to ``record``)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(start, stop):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(8, 4, generator=g)
        loss = model(x).pow(2).mean()
        loss.backward()
        with torch.no_grad():  # a fresh SGD per call holds no state, so stepping by hand is the same
            for p in model.parameters():
                p -= 0.1 * p.grad
                p.grad = None
        if record is not None:
            record.append({k: v.clone() for k, v in model.state_dict().items()})
        averager.step()  # type: ignore[attr-defined]
        if (i + 1) % 4 == 0:
            averager.epoch_end()  # type: ignore[attr-defined]
    del opt


def any_loop(name: str, make: object) -> None:
    model = make_model(0)
    averager = make()  # type: ignore[operator]
    averager.attach(model, max_duration="40ba")
    record: list = []
    loop_steps(model, averager, 0, 14, record)
    torch.save({"model": model.state_dict(), "averager": averager.state_dict()}, HERE / f"{name}.pt")
    loop_steps(model, averager, 14, 30, record)
    torch.save({k: v.clone() for k, v in averager.ema_tensors.items()}, HERE / f"{name}-expected.pt")
    torch.save(record, HERE / f"{name}-weights.pt")


def trainer_case(name: str, make: object) -> None:
    def trainer(**kwargs: object) -> tuple[Trainer, object]:
        algorithm = make()  # type: ignore[operator]
        t = Trainer(make_model(), make_loader(shuffle=True), "6ep", algorithms=[algorithm], progress_bar=False,
                    seed=1, **kwargs)  # type: ignore[arg-type]  # fmt: skip
        return t, algorithm

    folder = HERE / f"{name}-run"
    cut, _ = trainer(save_folder=folder, save_interval="1ep")
    cut.fit()
    whole, algorithm = trainer()
    whole.fit()
    expected = {"average": {k: v.clone() for k, v in algorithm.ema_tensors.items()},  # type: ignore[attr-defined]
                "model": {k: v.clone() for k, v in whole.state.model.state_dict().items()}}  # fmt: skip
    torch.save(expected, HERE / f"{name}-expected.pt")
    keep = folder / "ep3-ba24.pt"
    keep.rename(HERE / f"{name}-ep3.pt")
    for leftover in sorted(folder.iterdir(), reverse=True):
        leftover.unlink()
    folder.rmdir()


if __name__ == "__main__":
    any_loop("ema-loop", lambda: EMA(half_life="3ba", ema_start="2ba"))
    any_loop("ema-several", lambda: EMA(half_life=["3ba", "9ba"]))
    any_loop("ema-sigma-rel", lambda: EMA(sigma_rel=[0.05, 0.1]))
    any_loop("ema-warmup", lambda: EMA(half_life="20ba", warmup=True))
    any_loop("swa-loop", lambda: SWA(swa_start="5ba", swa_end="25ba", update_interval="2ba"))
    if "--any-loop" in sys.argv:
        sys.exit(0)
    trainer_case("trainer-ema", lambda: TrainerEMA(half_life="5ba"))
    trainer_case("trainer-swa", lambda: TrainerSWA(swa_start="2ep", swa_end="5ep", swa_lr=0.02, anneal_time="3ba"))
