"""``emakit posthoc``, called as ``main([...])``: results equal the library's, bad input exits 2 with one line."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from emakit.engine.blend import blend_averages_
from emakit.posthoc.cli import main
from emakit.posthoc.profiles import PowerProfile
from emakit.posthoc.reconstruction import reconstruct
from emakit.posthoc.snapshots import write_snapshot

PROFILES = [PowerProfile.from_sigma_rel(0.05), PowerProfile.from_sigma_rel(0.10)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Snapshots of two averages of a random walk of weights (200 updates, a snapshot every 20)."""
    out = tmp_path_factory.mktemp("cli_snapshots")
    g = torch.Generator().manual_seed(0)
    weights = {"w": torch.zeros(16, 8), "b": torch.zeros(8), "count": torch.tensor(0)}
    averages = [{n: torch.empty_like(t) for n, t in weights.items()} for _ in PROFILES]
    for t in range(1, 201):
        weights["w"] += torch.randn(16, 8, generator=g)
        weights["b"] += torch.randn(8, generator=g)
        weights["count"] += 1
        names = list(weights)
        blend_averages_(
            [[a[n] for n in names] for a in averages], [weights[n] for n in names], [1 - p.beta(t) for p in PROFILES]
        )
        if t % 20 == 0:
            write_snapshot(out, t // 20 - 1, averages, PROFILES, t=t, step=3 * t, update_interval=3)
    return out


def test_writes_what_reconstruct_returns(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ema.safetensors"
    assert main([str(folder), "--sigma-rel", "0.07", "--out", str(out)]) == 0
    expected = reconstruct(folder, sigma_rel=0.07)
    got = load_file(out)
    assert set(got) == set(expected) and all(torch.equal(got[n], expected[n]) for n in got)
    assert got["count"].item() == 200
    printed = capsys.readouterr().out
    assert "power(sigma_rel=0.07" in printed and "t=200 (step 600)" in printed and "from 10 snapshots x 2" in printed


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_a_torch_suffix_gets_a_torch_save_file(folder: Path, tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"ema{suffix}"
    assert main([str(folder), "--sigma-rel", "0.07", "--out", str(out)]) == 0
    assert zipfile.is_zipfile(out)  # torch.save's format, not safetensors bytes under a .pt name
    with pytest.raises(Exception):  # noqa: B017 (safetensors' own error type is not public)
        load_file(out)
    expected = reconstruct(folder, sigma_rel=0.07)
    got = torch.load(out, weights_only=True)
    assert list(got) == list(expected) and all(torch.equal(got[n], expected[n]) for n in got)


@pytest.mark.parametrize("name", ["ema.bin", "ema", "ema.safetensors.tmp"])
def test_other_suffixes_are_refused(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    out = tmp_path / name
    assert main([str(folder), "--sigma-rel", "0.07", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"emakit posthoc: error: --out: {str(out)!r} ") and err.count("\n") == 1, err
    assert "'.safetensors'" in err and "'.pt'" in err
    assert not out.exists()


def test_half_life_at_an_earlier_time_in_half_precision(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "ema.safetensors"
    assert main([str(folder), "--half-life", "12", "--at", "160", "--out", str(out), "--dtype", "float16"]) == 0
    expected = reconstruct(folder, half_life=12, t=160, dtype=torch.float16)
    got = load_file(out)
    assert got["w"].dtype == torch.float16 and torch.equal(got["w"], expected["w"])
    assert got["count"].item() == 160


def test_list(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(folder), "--list"]) == 0
    printed = capsys.readouterr().out
    assert "10 snapshots" in printed and "update_interval 3" in printed
    assert "snapshot-000009.safetensors" in printed and "power(sigma_rel=0.1" in printed


def test_a_poor_fit_is_reported(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A half-life of 1 update is far sharper than the narrowest tracked profile (0.05 x 200 = 10 updates).
    assert main([str(folder), "--half-life", "1", "--out", str(tmp_path / "x.safetensors")]) == 0
    assert "warning: the snapshots represent this target poorly" in capsys.readouterr().err


OUT = "{out}"  # replaced by a file in the test's tmp_path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--sigma-rel", "0.5", "--out", OUT],
            r"--sigma-rel: must be a number in \(0, 1/sqrt\(12\) = 0.2887\], got '0.5'",
        ),
        (["--sigma-rel", "abc", "--out", OUT], r"--sigma-rel: must be a number in"),
        (["--half-life", "0", "--out", OUT], r"--half-life: must be a positive number of EMA updates, got '0'"),
        (["--sigma-rel", "0.07", "--half-life", "3", "--out", OUT], r"not allowed with argument"),
        (["--out", OUT], r"give the target: --sigma-rel S, --half-life N, --window W or --kernel NAME:VALUE"),
        (["--sigma-rel", "0.07"], r"--out FILE is needed"),
        (["--sigma-rel", "0.07", "--at", "0", "--out", OUT], r"--at: must be an integer >= 1 \(EMA updates\), got '0'"),
        (["--sigma-rel", "0.07", "--at", "201", "--out", OUT], r"t=201 is after the last snapshot, .*snapshot-000009"),
        (["--sigma-rel", "0.07", "--dtype", "int8", "--out", OUT], r"--dtype: invalid choice: 'int8'"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    out = tmp_path / "x.safetensors"
    assert main([str(folder), *(str(out) if a == OUT else a for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("emakit posthoc: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not out.exists()


def test_folder_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "x.safetensors")
    assert main([str(tmp_path / "missing"), "--sigma-rel", "0.07", "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(tmp_path), "--sigma-rel", "0.07", "--out", out]) == 2
    assert "holds no snapshots" in capsys.readouterr().err
    assert main([str(tmp_path), "--sigma-rel", "0.07", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_help_exits_0_without_importing_torch() -> None:
    code = "import sys; from emakit.posthoc.cli import main; r = main(['--help']); print('torch' in sys.modules, r)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--sigma-rel" in result.stdout and result.stdout.strip().endswith("False 0")


# ---------------------------------------------------------------------------------------------- gaps (#21)
def with_gap(folder: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "gap"
    shutil.copytree(folder, copy)
    for index in (3, 4, 7):
        (copy / f"snapshot-{index:06d}.safetensors").unlink()
    return copy


def test_list_names_the_missing_snapshots(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(with_gap(folder, tmp_path)), "--list"]) == 0
    assert "missing: snapshots 3-4, 7 (deleted or lost?)" in capsys.readouterr().out
    assert main([str(folder), "--list"]) == 0
    assert "missing" not in capsys.readouterr().out


def test_a_gap_is_warned_by_the_cli_and_reconstruct(folder: Path, tmp_path: Path, capsys) -> None:
    gap = with_gap(folder, tmp_path)
    assert main([str(gap), "--sigma-rel", "0.07", "--out", str(tmp_path / "x.safetensors")]) == 0
    assert re.search(r"warning: snapshot folder '.*gap' lacks snapshots 3-4, 7 of its series", capsys.readouterr().err)
    with pytest.warns(UserWarning, match=r"lacks snapshots 3-4, 7 of its series \(deleted or lost\?\)"):
        reconstruct(gap, sigma_rel=0.07)


def test_reconstruct_warns_about_a_poor_fit_like_the_cli(folder: Path) -> None:
    from emakit.posthoc import POOR_FIT
    from emakit.posthoc.reconstruction import plan_reconstruction

    assert plan_reconstruction(folder, half_life=1).fit_error > POOR_FIT
    with pytest.warns(UserWarning, match=r"represent this target poorly \(profile fit error [\d.]+%, above 5%\)"):
        reconstruct(folder, half_life=1)
    assert plan_reconstruction(folder, sigma_rel=0.07).fit_error <= POOR_FIT
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reconstruct(folder, sigma_rel=0.07)


# ---------------------------------------------------------------------------------------------- kernels, refusals
def test_the_kernel_option_writes_what_reconstruct_returns(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged.safetensors"
    assert main([str(folder), "--kernel", "cosine:0.3", "--out", str(out)]) == 0
    expected = reconstruct(folder, kernel="cosine:0.3")
    got = load_file(out)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert re.search(r"reconstructed cosine:0.3 at t=200 .* profile fit error [\d.]+%", capsys.readouterr().out)


def test_list_kernels_names_each_kernel(capsys: pytest.CaptureFixture[str]) -> None:
    from emakit.posthoc.targets import KERNELS

    assert main(["--list-kernels"]) == 0
    printed = capsys.readouterr().out
    assert all(f"{name}:{param}" in printed for name, (param, _) in KERNELS.items() if param)
    assert "bema:RHO,GAMMA,KAPPA,ETA" in printed and "\n  raw " in printed


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_an_out_inside_the_snapshot_folder_is_refused(
    folder: Path, force: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    snapshot = folder / "snapshot-000001.safetensors"
    before = snapshot.read_bytes()
    assert main([str(folder), "--sigma-rel", "0.07", "--out", str(snapshot), *force]) == 2
    assert "--out: " in (err := capsys.readouterr().err) and "is inside the snapshot folder" in err
    assert snapshot.read_bytes() == before
    assert main([str(folder), "--sigma-rel", "0.07", "--out", str(folder / "new.safetensors"), *force]) == 2
    assert not (folder / "new.safetensors").exists()
    assert main([str(folder), "--list"]) == 0


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_an_existing_out_is_replaced_only_with_force(
    folder: Path, tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / f"mine{suffix}"
    out.write_bytes(b"a user's file")
    assert main([str(folder), "--sigma-rel", "0.07", "--out", str(out)]) == 2
    assert f"--out: {str(out)!r} exists; pass --force to replace it" in capsys.readouterr().err
    assert out.read_bytes() == b"a user's file"
    assert main([str(folder), "--sigma-rel", "0.07", "--out", str(out), "--force"]) == 0
    assert out.read_bytes() != b"a user's file"


def test_reconstruct_refuses_to_replace_a_file_unless_told(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"a user's file")
    with pytest.raises(FileExistsError, match=r"out='.*mine.safetensors' exists: pass overwrite=True"):
        reconstruct(folder, sigma_rel=0.07, out=out)
    assert out.read_bytes() == b"a user's file"
    assert torch.equal(reconstruct(folder, sigma_rel=0.07, out=out, overwrite=True)["w"], load_file(out)["w"])
    with pytest.raises(ValueError, match=r"is inside the snapshot folder"):
        reconstruct(folder, sigma_rel=0.07, out=folder / "snapshot-000001.safetensors", overwrite=True)


@pytest.mark.parametrize("window", [["--window", "0.05", "--at", "190"], ["--window", "185:195"]])
def test_a_window_no_snapshot_covers_is_refused(
    folder: Path, tmp_path: Path, window: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "swa.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's RuntimeWarning must not escape
        assert main([str(folder), *window, "--out", str(out)]) == 2
    printed = capsys.readouterr()
    assert re.search(
        r"cannot represent window\(last 10 updates\) at t=\d+: the latest one at or before t \(t=180\)", printed.err
    )
    assert "nan" not in (printed.out + printed.err).lower()
    assert not out.exists()
    with pytest.raises(ValueError, match=r"cannot represent window\(last 10 updates\) at t=190"):
        reconstruct(folder, window=0.05, t=190)


def test_a_window_starting_with_a_dash_is_reported_by_its_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["s", "--window", "-10:20", "--out", "x.safetensors"]) == 2
    assert "--window: must be a fraction in (0, 1] or T0:T1 with 0 <= T0 < T1, got '-10:20'" in capsys.readouterr().err
    assert main(["s", "--at", "-5", "--sigma-rel", "0.1", "--out", "x.safetensors"]) == 2
    assert "--at: must be an integer >= 1 (EMA updates), got '-5'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "target"),
    [
        ({"window": (75, 95)}, r"window\(last 20 updates\) at t=95"),
        ({"half_life": 1, "t": 199}, r"half_life\(1 updates\) at t=199"),
    ],
)
def test_a_target_fitted_no_better_than_nothing_is_refused(
    folder: Path, kwargs: dict[str, object], target: str
) -> None:
    # Only a sliver of each target lies in the snapshots at or before its t: rescaled to sum to 1, the best
    # combination is further from the target than the zero profile.
    from emakit.posthoc.reconstruction import plan_reconstruction

    with pytest.raises(
        ValueError,
        match=rf"cannot represent {target}: the best combination of those at or before it has a profile fit error of \d+%, no closer than nothing",
    ):
        plan_reconstruction(folder, **kwargs)  # type: ignore[arg-type]
