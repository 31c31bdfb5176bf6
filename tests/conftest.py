"""Shared fixtures: tiny models and datasets that train in milliseconds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_leaked_launch_environment() -> Iterator[None]:
    """Frameworks run in-process (Lightning's DDP strategy) set RANK, WORLD_SIZE, MASTER_PORT, ... in
    os.environ and leave them there; a later test's subprocess would then think torchrun launched it. A default
    process group a test leaves behind is destroyed for the same reason."""
    saved = {name: os.environ.get(name) for name in _LAUNCH_VARIABLES}
    grouped = torch.distributed.is_available() and torch.distributed.is_initialized()
    yield
    if not grouped and torch.distributed.is_available() and torch.distributed.is_initialized():
        # an in-process framework left its (one-rank) default process group: a later test could not make its own
        torch.distributed.destroy_process_group()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


class TinyNet(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear: parameters, float buffers and an integer buffer."""

    def __init__(self, d_in: int = 4, hidden: int = 8, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def make_data(n: int = 64, d_in: int = 4, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(x, y)


def make_loader(n: int = 64, batch_size: int = 8, seed: int = 0, shuffle: bool = False) -> DataLoader:
    return DataLoader(make_data(n, seed=seed), batch_size=batch_size, shuffle=shuffle)


def make_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


@pytest.fixture
def tiny_model() -> TinyNet:
    return make_model()


@pytest.fixture
def loader() -> DataLoader:
    return make_loader()


#: What gloo prints when a rank aborts while its process tears down: about one run in 15 on CPU, plain DDP too.
TEARDOWN_ABORT = "terminate called without an active exception"


def assert_script_finished(result: subprocess.CompletedProcess[str]) -> None:
    """Fail unless a torchrun launch of a user-facing script (a guide's, an example) exited 0, or every rank that
    failed was aborted by gloo's teardown (SIGABRT with ``TEARDOWN_ABORT`` printed, the others stopped by the
    launcher). Our own test workers exit hard after a final barrier instead; a user's script ends normally, so
    its callers check every output it writes after this: a script that aborted before its end still fails."""
    if result.returncode == 0:
        return
    tail = result.stdout[-3000:] + result.stderr[-6000:]
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", result.stderr)
    assert TEARDOWN_ABORT in result.stderr and "-6" in codes and set(codes) <= {"-6", "-15"}, tail


def exit_hard() -> None:
    """End a two-rank test worker once every rank has written its results: a final barrier, then leave without
    tearing the process group down, where gloo aborts about one run in 15 here (workers import this module by
    putting tests/ on their path)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
