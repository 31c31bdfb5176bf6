"""emakit._compat against the torch that is installed: each answer checked on torch's own behaviour.

The version matrix (.ci/matrix.sh) runs this file on the oldest and the newest supported torch, so both sides of
every difference are exercised somewhere.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import emakit._compat as compat
from emakit.distributed import shard_model


@given(
    st.integers(0, 99), st.integers(0, 99), st.integers(0, 99), st.sampled_from(["", "+cpu", "+cu124", "a0+git1f2e"])
)
def test_release_is_the_major_and_minor_of_any_torch_version_string(
    major: int, minor: int, patch: int, tail: str
) -> None:
    assert compat._release(f"{major}.{minor}.{patch}{tail}") == (major, minor)


def test_torch_version_is_the_installed_release() -> None:
    major, minor = torch.__version__.split(".")[:2]
    assert (int(major), int(minor)) == compat.TORCH_VERSION


def test_per_tensor_lerp_weights_are_reported_as_torch_accepts_them() -> None:
    dst = [torch.zeros(3), torch.zeros(2)]
    src = [torch.ones(3), torch.ones(2)]
    if compat.FOREACH_LERP_PER_TENSOR:
        torch._foreach_lerp_(dst, src, [0.25, 0.5])
        assert torch.equal(dst[0], torch.full((3,), 0.25)) and torch.equal(dst[1], torch.full((2,), 0.5))
    else:
        with pytest.raises((TypeError, RuntimeError)):
            torch._foreach_lerp_(dst, src, [0.25, 0.5])


def test_nothing_distributed_is_imported_until_asked_and_then_found() -> None:
    # A fresh interpreter: importing emakit loads neither DTensor nor FSDP2, and the lookups do not load them.
    code = (
        "import sys, emakit, emakit._compat as c\n"
        "assert c.dtensor_type() is None and c.fsdp_module_type() is None\n"
        "homes = ('torch.distributed.tensor', 'torch.distributed._tensor', 'torch.distributed._composable.fsdp')\n"
        "assert not any(getattr(sys.modules.get(h), 'DTensor', None) for h in homes[:2]), 'DTensor was imported'\n"
        "cls = c.dtensor_class()\n"
        "assert cls.__name__ == 'DTensor' and c.dtensor_type() is cls\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.skipif(compat.TORCH_VERSION < compat.FSDP2_TORCH, reason="emakit shards with FSDP2 from FSDP2_TORCH on")
def test_fully_shard_is_torchs_public_fsdp2() -> None:
    from torch.distributed.fsdp import FSDPModule, fully_shard

    assert compat.fully_shard_function() is fully_shard
    assert compat.fsdp_module_type() is FSDPModule


@pytest.mark.skipif(compat.TORCH_VERSION >= compat.FSDP2_TORCH, reason="this torch has FSDP2 for emakit")
def test_fsdp2_is_refused_on_older_torch_naming_the_version_needed() -> None:
    with pytest.raises(RuntimeError, match=rf"needs torch >= 2\.\d+, .*this is torch {re.escape(torch.__version__)}\."):
        compat.fully_shard_function()


def test_shard_model_refuses_fsdp2_before_the_supported_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    # The same refusal reached through the user-facing function, whatever torch runs this test.
    monkeypatch.setattr(compat, "TORCH_VERSION", (2, 4))
    with pytest.raises(RuntimeError, match=r"parallelism='fsdp' \(FSDP2's fully_shard\) needs torch >= "):
        shard_model(nn.Linear(2, 2))
