"""`emakit --help`, `--version`, `emakit demo --help` and argument errors answer without importing torch.

Each case runs in a fresh interpreter (torch, once imported by the test session, cannot be un-imported),
calls ``emakit.cli.main`` and reports whether ``torch`` reached ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from emakit._version import __version__

# argv -> the exit status main() must give
CASES: list[tuple[list[str], int]] = [
    (["--help"], 0),
    (["--version"], 0),
    (["demo", "--help"], 0),
    ([], 2),
    (["nope"], 2),
    (["--nope"], 2),
    (["demo", "--bogus"], 2),
    (["demo", "--epochs", "0"], 2),
    (["demo", "--lr", "-1"], 2),
    (["demo", "--half-life", "abc"], 2),
    (["demo", "--half-life", "20"], 2),
    (["demo", "--half-life", "-5ba"], 2),
    (["demo", "--update-interval", "3sp"], 2),
    (["demo", "--ema-start", "-1ba"], 2),
    (["demo", "--name", "a/b"], 2),
]

PROGRAM = """
import contextlib, io, json, sys
from emakit.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    results.append({"argv": argv, "code": code, "out": out.getvalue(), "err": err.getvalue(),
                    "torch": "torch" in sys.modules})
print(json.dumps(results))
"""


@pytest.mark.slow
def test_help_version_and_argument_errors_do_not_import_torch() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", PROGRAM, json.dumps([argv for argv, _ in CASES])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    for (argv, code), got in zip(CASES, results, strict=True):
        assert got["code"] == code, (argv, got)
        assert not got["torch"], f"emakit {' '.join(argv)} imported torch"
        if code == 2 and argv:
            assert got["err"].count("\n") == 1 and ": error: " in got["err"], (argv, got["err"])
    by_argv = {" ".join(r["argv"]): r for r in results}
    assert by_argv["--version"]["out"] == f"emakit {__version__}\n"
    assert "{demo,bench" in by_argv["--help"]["out"]  # more delegated subcommands may follow
    assert "--half-life" in by_argv["demo --help"]["out"] and "(default: 20ba" in by_argv["demo --help"]["out"]
    assert by_argv["demo --half-life abc"]["err"] == (
        "emakit demo: error: --half-life: 'abc' is not a time: expected <number><unit> with unit one of "
        "'ba' (batches), 'ep' (epochs)\n"
    )
    assert by_argv["demo --half-life -5ba"]["err"] == (
        "emakit demo: error: --half-life: must be greater than 0, got '-5ba'\n"
    )
    assert (
        by_argv["demo --ema-start -1ba"]["err"] == "emakit demo: error: --ema-start: cannot be negative, got '-1ba'\n"
    )


@pytest.mark.slow
def test_python_m_emakit_help_imports_no_torch() -> None:
    """The real entry point (``python -m emakit``, through ``__main__``), with Python's own import log."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "emakit", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: emakit" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "emakit.cli" in imported  # the log is what we think it is
    assert not {name for name in imported if name == "torch" or name.startswith("torch.")}


def test_lazy_package_namespace() -> None:
    """``import emakit`` resolves its public names on first use; ``dir`` and ``__all__`` list them all."""
    import emakit

    expected = {"BEMA", "EMA", "SWA", "CheckpointSaver", "Event", "Time", "TimeUnit", "Timestamp", "Trainer", "__version__",
                "compute_ema", "export_ema_weights"}  # fmt: skip
    assert set(emakit.__all__) == expected
    assert expected <= set(dir(emakit))
    from emakit import EMA, Trainer, compute_ema, export_ema_weights
    from emakit import EMA as EMA_
    from emakit.functional import compute_ema as compute_ema_

    assert EMA is EMA_ and compute_ema is compute_ema_
    assert Trainer.__name__ == "Trainer" and callable(export_ema_weights)
    for name in expected:
        assert getattr(emakit, name) is not None
    assert emakit.__version__ == __version__
    with pytest.raises(AttributeError, match="module 'emakit' has no attribute 'nope'"):
        _ = emakit.nope  # type: ignore[attr-defined]
    with pytest.raises(ImportError):
        from emakit import nope  # type: ignore[attr-defined]  # noqa: F401
