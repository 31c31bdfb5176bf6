"""docs/posthoc.md's Python blocks run as written (fresh namespace, empty folder)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "posthoc.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def test_the_doc_has_python_blocks() -> None:
    assert BLOCKS


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_block_runs(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__doc_block__"}
    exec(compile(code, str(DOC), "exec"), namespace)
    if "ema_007" in namespace:  # the usage block: the reconstructed average is what the model now holds
        import torch

        model, ema = namespace["model"], namespace["ema_007"]
        assert isinstance(model, torch.nn.Module) and isinstance(ema, dict)
        assert all(torch.equal(t, ema[n]) for n, t in model.state_dict().items())


FIGURE_NUMBERS = DOC.parent / "posthoc_sweep.json"


def quoted(summary: dict[str, object]) -> list[str]:
    """The numbers of docs/posthoc_sweep.json the page quotes, formatted as it writes them."""
    rows = {r["sigma_rel"]: r for r in summary["sweep"]}  # type: ignore[attr-defined]
    best, raw = summary["best"], summary["raw_final"]
    accuracies = [r["accuracy"] for r in rows.values()]
    tracked = {r["sigma_rel"]: r for r in summary["tracked"]}  # type: ignore[attr-defined]
    seconds, wall = summary["seconds"], summary["wall_seconds"]
    return [
        f"from {rows[0.02]['loss']:.3f} at sigma_rel 0.02",
        f"through {rows[0.05]['loss']:.3f} and {rows[0.1]['loss']:.3f} at the tracked 0.05 and 0.10",
        f"to {best['loss']:.3f} at {best['sigma_rel']:g}, the best ({100 * best['accuracy']:.2f}% accuracy)",  # type: ignore[index]
        f"({100 / summary['validation_samples']:.2f} points) between {100 * min(accuracies):.2f}% and {100 * max(accuracies):.2f}%",  # type: ignore[operator]
        f"against {100 * raw['accuracy']:.2f}% for the raw weights",  # type: ignore[index]
        f"off by {100 * tracked[0.05]['holdout_error']:.2g}% (0.05) and {100 * tracked[0.1]['holdout_error']:.2g}% (0.10)",
        f"Rebuilding and evaluating the {len(rows)} averages took {seconds['sweep']:.1f} s",  # type: ignore[index]
        f"({wall['posthoc_demo']:.1f} s against {wall['demo']:.1f} s wall",  # type: ignore[index]
    ]


def test_the_page_quotes_the_figures_numbers() -> None:
    """docs/posthoc_sweep.png and .json come from docs/_figures/posthoc_sweep.py; the text must match them."""
    text = " ".join(DOC.read_text().split())
    summary = json.loads(FIGURE_NUMBERS.read_text())
    missing = [q for q in quoted(summary) if q not in text]
    assert not missing, f"docs/posthoc.md does not quote docs/posthoc_sweep.json: {missing}"


KERNEL_NUMBERS = DOC.parent / "posthoc_kernels.json"


def test_the_page_quotes_the_kernel_benchmark() -> None:
    """docs/posthoc_kernels.json comes from benchmarks/posthoc_kernels.py; the closing note must match it."""
    text = " ".join(DOC.read_text().split())
    numbers = json.loads(KERNEL_NUMBERS.read_text())
    errors, sweep, sizes = numbers["fit_errors"], numbers["sweep"], numbers["bytes"]

    def pct(spec: str) -> str:
        return f"`{spec}` {100 * errors[spec]:.2g}%"

    quoted_kernels = ["cosine:0.1", "cosine:0.2", "cosine:0.3", "linear:0.2", "uniform:0.2", "1-sqrt:0.2"]
    quoted_kernels += ["power:0.07", "ema:50", "bema", "bema:1,1,0.5,0.2"]
    quotes = [pct(s) for s in quoted_kernels]
    quotes += [
        f"{numbers['t']} updates, {numbers['snapshots']} snapshots",
        f"cost {sizes['raw'] / numbers['snapshots'] / 1024:.1f} KiB per snapshot (the model's {sweep['model_bytes']} bytes",
        f"the {sizes['averages'] / numbers['snapshots'] / 1024:.1f} KiB of the three averages",
        f"A sweep of {sweep['candidates']} candidates",
        f"took {sweep['seconds']:.1f} s",
        f"by {(sweep['vmhwm'] - sweep['rss_before']) / 2**20:.1f} MiB over the {sweep['rss_before'] / 2**20:.1f} MiB",
        f"The best was `{sweep['best']}`",
        f"(validation loss {sweep['best_loss']:.4f})",
    ]
    assert errors["raw"] == 0.0 and sizes["raw"] == numbers["snapshots"] * sweep["model_bytes"]
    missing = [q for q in quotes if q not in text]
    assert not missing, f"docs/posthoc.md does not quote docs/posthoc_kernels.json: {missing}"


@pytest.mark.slow
def test_a_rerun_on_the_figures_processor_gives_its_numbers(tmp_path: Path) -> None:
    """`emakit demo --posthoc` at its defaults reproduces docs/posthoc_sweep.json's results (not its timings) on
    the processor and torch the file records."""
    import subprocess
    import sys

    from emakit.demo.figure import machine

    summary = json.loads(FIGURE_NUMBERS.read_text())
    recorded = {k: summary["machine"][k] for k in ("cpu", "torch")}
    if machine() != recorded:
        pytest.skip(f"the figure was made on {recorded}, this is {machine()}")
    command = [sys.executable, "-m", "emakit", "demo", "--posthoc", "--no-plot", "--out", str(tmp_path / "run")]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    rerun = json.loads((tmp_path / "run" / "posthoc.json").read_text())
    for key in ("sweep", "tracked", "best", "raw_final", "reconstruction_check"):
        assert rerun[key] == summary[key], key
