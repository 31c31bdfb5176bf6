"""Every Python block of README.md runs as written: verbatim, in a fresh namespace, in an empty folder.

Blocks are the fences ```` ```python ````, ```` ```py ```` and ```` ```python3 ````, found anew at every run, so
a section added to the README is tested without touching this file. A block is not given anything: no
``model``, no data; what it uses, it defines.

Two kinds of block need more than ``exec``:

- A block that only defines functions (the functional ``training_loop``) is run, and then each of its
  top-level functions is called by the entry for it in ``CALLS`` with a tiny model and loader. A block that
  defines a function with no entry fails, so every function the README shows is run at least once.
- A block that needs several processes says so on its first line, a comment naming ``torchrun``
  (``# train.py; run it with: torchrun ...``). Those blocks are skipped here, and ``SKIPPED`` lists each of
  them by that first line with the test that runs it; a marked block missing from the list (or a listed
  block no longer in the README) fails ``test_skipped_blocks_are_listed``.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from conftest import make_loader, make_model
from docs._blocks import Block, code_blocks

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BLOCKS = code_blocks(README)

#: First line of each block skipped here -> why, and where it runs instead.
SKIPPED: dict[str, str] = {
    "# train.py; run it with: torchrun --standalone --nproc_per_node=2 train.py": (
        "two processes under torchrun: tests/distributed/test_two_ranks.py runs it"
    ),
}


def _needs_torchrun(block: Block) -> bool:
    return block.first_line.startswith("#") and "torchrun" in block.first_line


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An empty working folder, and torch's global RNG and thread count as they were afterwards."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    with torch.random.fork_rng():
        yield
    torch.set_num_threads(threads)


def _run(block: Block) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(block.code, block.name, "exec"), namespace)
    return namespace


def _defined_functions(block: Block, namespace: dict[str, Any]) -> dict[str, types.FunctionType]:
    return {
        name: value
        for name, value in namespace.items()
        if isinstance(value, types.FunctionType) and value.__code__.co_filename == block.name
    }


# ---------------------------------------------------------------------------------------------- calls


def _naive_ema_training(model: nn.Module, loader: DataLoader, smoothing: float) -> dict[str, torch.Tensor]:
    """The reference: the same Adam training, with the average of the parameters kept by hand."""
    opt = torch.optim.Adam(model.parameters())
    average = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.train()
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for name, p in model.named_parameters():
                average[name] = smoothing * average[name] + (1 - smoothing) * p
    return average


def _call_training_loop(training_loop: Callable[..., Any]) -> None:
    model, reference_model, loader = make_model(0), make_model(0), make_loader()
    ema_model = training_loop(model, loader)
    assert isinstance(ema_model, nn.Module) and ema_model is not model
    assert not ema_model.training, "the README says the EMA model is in eval mode"
    assert not any(p.requires_grad for p in ema_model.parameters()), "the README says the EMA model is frozen"
    assert model.training and all(p.requires_grad for p in model.parameters())  # the trained model is untouched
    expected = _naive_ema_training(reference_model, loader, smoothing=0.99)
    for name, p in ema_model.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    moved = [name for name, p in ema_model.named_parameters() if not torch.equal(p, make_model(0).state_dict()[name])]
    assert moved, "the average never moved from the initial weights"


#: Top-level function a README block defines -> what calls it (and checks what the README says of it).
CALLS: dict[str, Callable[[Callable[..., Any]], None]] = {
    "training_loop": _call_training_loop,
}


# ---------------------------------------------------------------------------------------------- tests


def test_readme_has_the_blocks_this_file_knows() -> None:
    codes = [block.code for block in BLOCKS]
    assert any("def training_loop" in code for code in codes)
    assert any("model = ema.ema_model" in code for code in codes)
    assert set(SKIPPED) <= {block.first_line for block in BLOCKS}


def test_skipped_blocks_are_listed() -> None:
    marked = {block.first_line for block in BLOCKS if _needs_torchrun(block)}
    assert marked == set(SKIPPED)


@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_block_runs_as_written(block: Block) -> None:
    if _needs_torchrun(block):
        pytest.skip(f"{block.name}: {SKIPPED.get(block.first_line, 'needs torchrun, and is not in SKIPPED')}")
    namespace = _run(block)
    for name, function in _defined_functions(block, namespace).items():
        assert name in CALLS, f"{block.name} defines {name}(); add a call for it to CALLS in {Path(__file__).name}"
        CALLS[name](function)
    if "model = ema.ema_model" in block.code:  # the Trainer example: `model` is now the average
        from emakit import EMA

        ema, model = namespace["ema"], namespace["model"]
        assert isinstance(ema, EMA) and model is ema.ema_model
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        trained = dict(namespace["trainer"].state.model.named_parameters())
        assert any(not torch.equal(p, trained[name]) for name, p in model.named_parameters())  # an average
