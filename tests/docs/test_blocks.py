"""Every code block of the README and of the documentation site (docs/**/*.md) runs as written.

Python blocks (```` ```python ````, ```` ```py ````, ```` ```python3 ````) run verbatim, in a fresh namespace
and an empty folder; they are found anew at every run, so a page or a block added later is tested without
touching this file. A block is not given anything: no ``model``, no data; what it uses, it defines.

- A block that only defines functions is run, and then each of its top-level functions is called by the
  entry for it in ``CALLS``; a block that defines a function with no entry fails.
- A block that cannot run here says why on the line just above its fence, ``<!-- not run: <reason> -->``
  (invisible on the site and on GitHub). The reason must not be empty. Blocks of other languages (shell
  commands: installs, ``torchrun`` launches, ``emakit bench``) must all carry one; fences without a language
  or marked ``text`` are displays (diagrams, formulas), not code.
- Pages or sections whose Python blocks a dedicated test runs, with checks of its own, are listed in
  ``RUN_ELSEWHERE``; each listed test must exist and name the page.
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
from docs._blocks import PYTHON_FENCES, Block, code_blocks

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
#: Fence languages that are displays, not code.
DISPLAYS = ("", "text")

#: (page relative to the root, its section's title or None for the whole page) -> the test that runs its blocks.
RUN_ELSEWHERE: dict[tuple[str, str | None], str] = {
    ("docs/posthoc.md", None): "tests/posthoc/test_docs.py",
    ("docs/guides/lightning.md", "Lightning"): "tests/integrations/test_lightning.py",
    (
        "docs/guides/lightning.md",
        "Sharded models: `ModelParallelStrategy` (FSDP2, tensor parallel)",
    ): "tests/integrations/test_lightning_fsdp.py",
    ("docs/guides/transformers.md", "Hugging Face Transformers"): "tests/integrations/test_transformers.py",
    ("docs/guides/transformers.md", "LoRA adapters (PEFT)"): "tests/integrations/test_peft.py",
    ("docs/guides/accelerate.md", "Accelerate"): "tests/integrations/test_accelerate.py",
}


def _all_blocks(languages: tuple[str, ...] | None = None) -> list[Block]:
    blocks = []
    for page in PAGES:
        found = code_blocks(page, languages) if languages is not None else _every_block(page)
        blocks.extend(found)
    return blocks


def _every_block(page: Path) -> list[Block]:
    import re

    text = page.read_text()
    languages = {(m.group(1).strip().split() or [""])[0].lower() for m in re.finditer(r"^```([^\n`]*)\n", text, re.M)}
    return code_blocks(page, tuple(languages | set(PYTHON_FENCES)))


def _section(block: Block) -> str | None:
    """The title of the ``## `` section holding ``block``; before the first one, the page's ``# `` title."""
    lines = block.path.read_text().split("\n")[: block.line]
    titles = [line.lstrip("#").strip() for line in lines if line.startswith(("# ", "## "))]
    return titles[-1] if titles else None


def _run_elsewhere(block: Block) -> str | None:
    page = block.path.relative_to(ROOT).as_posix()
    return RUN_ELSEWHERE.get((page, None)) or RUN_ELSEWHERE.get((page, _section(block)))


BLOCKS = _all_blocks(PYTHON_FENCES)
OTHER_BLOCKS = [block for block in _all_blocks() if block.language not in PYTHON_FENCES]


def _block_id(block: Block) -> str:
    return f"{block.path.relative_to(ROOT).as_posix()}:{block.line}"


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


#: Top-level function a block defines -> what calls it (and checks what the page says of it).
def _call_diffusers_decay(decay: Callable[..., float]) -> None:
    """diffusers' schedule at a few steps, by hand: s = step - 1, min((1 + s) / (10 + s), d)."""
    assert decay(1, 0.9999) == 0.0  # the first step copies
    assert decay(2, 0.9999) == 2 / 11
    assert decay(91, 0.9999) == 91 / 100
    assert decay(10**6, 0.9999) == 0.9999
    assert decay(3, 0.9999, update_after_step=2) == 0.0
    assert decay(2, 0.9, min_decay=0.5) == 0.5


def _call_ema_pytorch_decay(decay: Callable[..., float | None]) -> None:
    """ema-pytorch's defaults by hand: copy on call 1 and on calls 11..101 of every 10th, then 1 - (1 + s)^(-2/3)."""
    assert decay(1, beta=0.9999) == 0.0
    assert decay(2, beta=0.9999) is None
    assert decay(11, beta=0.9999) == 0.0 and decay(101, beta=0.9999) == 0.0
    assert decay(111, beta=0.9999) == 1 - 11 ** (-2 / 3)
    assert decay(10**9 + 1, beta=0.9999, update_after_step=0, update_every=1) == 0.9999


CALLS: dict[str, Callable[[Callable[..., Any]], None]] = {
    "training_loop": _call_training_loop,
    "diffusers_decay": _call_diffusers_decay,
    "ema_pytorch_decay": _call_ema_pytorch_decay,
}


# ---------------------------------------------------------------------------------------------- tests


def test_the_pages_have_the_blocks_this_file_knows() -> None:
    codes = [block.code for block in BLOCKS]
    assert any("def training_loop" in code for code in codes)
    assert any("\nmodel = ema.ema_model" in code for code in codes)
    assert len({block.path for block in BLOCKS}) >= 10, "README and the site's pages"
    assert any(block.path == README for block in BLOCKS)


def test_blocks_run_elsewhere_are_run_there() -> None:
    for (page, section), test in RUN_ELSEWHERE.items():
        blocks = [b for b in BLOCKS if b.path == ROOT / page and (section is None or _section(b) == section)]
        assert blocks, f"{page} {section!r} has no python block: remove it from RUN_ELSEWHERE"
        assert page in (ROOT / test).read_text(), f"{test} does not read {page}"


def test_blocks_that_do_not_run_say_why() -> None:
    for block in BLOCKS + OTHER_BLOCKS:
        if block.not_run is not None:
            assert block.not_run, f"{_block_id(block)}: '<!-- not run: -->' needs a reason"
    unmarked = [_block_id(b) for b in OTHER_BLOCKS if b.language not in DISPLAYS and b.not_run is None]
    assert not unmarked, f"code that is not run needs a '<!-- not run: why -->' line above it: {unmarked}"


@pytest.mark.parametrize("block", BLOCKS, ids=[_block_id(block) for block in BLOCKS])
def test_block_runs_as_written(block: Block) -> None:
    if block.not_run is not None:
        pytest.skip(f"not run: {block.not_run}")
    elsewhere = _run_elsewhere(block)
    if elsewhere is not None:
        pytest.skip(f"run by {elsewhere}")
    namespace = _run(block)
    for name, function in _defined_functions(block, namespace).items():
        assert name in CALLS, f"{block.name} defines {name}(); add a call for it to CALLS in {Path(__file__).name}"
        CALLS[name](function)
    if "\nmodel = ema.ema_model" in block.code:  # a Trainer example: `model` is now the average
        from emakit import EMA

        ema, model = namespace["ema"], namespace["model"]
        assert isinstance(ema, EMA) and model is ema.ema_model
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        trained = dict(namespace["trainer"].state.model.named_parameters())
        assert any(not torch.equal(p, trained[name]) for name, p in model.named_parameters())  # an average
