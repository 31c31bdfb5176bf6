"""``overlap=True`` on CPU keeps a worker thread; a process that forks while it is inside a kernel (a DataLoader
starting its workers) could hand the child torch's locks taken mid-kernel. Every fork waits for it first."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from conftest import make_data, make_model
from emakit import EMA
from emakit import EMA as TrainerEMA
from emakit.engine.overlap import ThreadOverlap
from emakit.trainer import Trainer

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def test_a_fork_waits_for_the_pending_work_and_leaves_its_error_for_wait() -> None:
    overlap = ThreadOverlap()
    done = threading.Event()
    started = threading.Event()

    def work() -> None:
        started.set()
        time.sleep(0.3)
        done.set()
        raise RuntimeError("failed on the worker")

    overlap.launch(work)
    started.wait()
    pid = os.fork()
    if pid == 0:  # the child: nothing to do
        os._exit(0)
    finished_at_fork = done.is_set()
    os.waitpid(pid, 0)
    assert finished_at_fork
    with pytest.raises(RuntimeError, match="failed on the worker"):
        overlap.wait()
    overlap.wait()  # raised once


def loader() -> DataLoader:
    return DataLoader(
        make_data(n=64), batch_size=8, num_workers=2, multiprocessing_context=multiprocessing.get_context("fork")
    )


@pytest.mark.timeout(120)
def test_hand_written_loop_with_loader_workers_matches_the_plain_run() -> None:
    def run(overlap: bool) -> dict[str, torch.Tensor]:
        model = make_model(0)
        ema = EMA(half_life="3ba", overlap=overlap)
        ema.attach(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):  # the loader forks its workers again every epoch, right after an update
            for x, y in loader():
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                ema.step()
        return {k: v.clone() for k, v in ema.ema_tensors.items()}

    overlapped, plain = run(True), run(False)
    for name, value in plain.items():
        assert torch.equal(overlapped[name], value), name


@pytest.mark.timeout(120)
def test_trainer_with_loader_workers_matches_the_plain_run() -> None:
    def run(overlap: bool) -> dict[str, torch.Tensor]:
        ema = TrainerEMA(half_life="3ba", overlap=overlap)
        Trainer(make_model(0), loader(), "3ep", algorithms=[ema], progress_bar=False).fit()
        return {k: v.clone() for k, v in ema.ema_tensors.items()}

    overlapped, plain = run(True), run(False)
    for name, value in plain.items():
        assert torch.equal(overlapped[name], value), name
