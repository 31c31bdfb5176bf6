"""Launching 2 CPU ranks under torchrun for tests/zero: the environment of a DeepSpeed launch (its CPU
communication op built once), the launch itself, and how a worker ends.

(Not a conftest.py: the tests import ``conftest`` by that name, which a second one here would shadow.)
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn


@functools.cache
def deepspeed_env() -> dict[str, str]:
    """The environment for a DeepSpeed launch on CPU ranks, with DeepSpeed's shared-memory op already built.

    DeepSpeed JIT-compiles that op (about a minute) the first time a process group starts on a machine and
    caches it under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); building it here, once
    per test session, keeps the compile out of the launches' timeouts and stops two ranks racing to build it.
    """
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    build = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
    result = subprocess.run([sys.executable, "-c", build], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return env


def torchrun(*args: str, env: dict[str, str], cwd: Path | None = None, timeout: int = 600, what: str = "") -> str:
    """Run ``python -m torch.distributed.run --standalone --nproc_per_node=2 *args``; its standard output, once
    it finished (:func:`conftest.assert_script_finished`; else the test fails with the end of both outputs). Prints the wall time, labelled ``what``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    from conftest import assert_script_finished  # here: the workers import this module without tests/ on the path

    assert_script_finished(result)  # a guide's script may meet gloo's teardown abort; workers exit hard
    print(f"{what or args[0]} 2-rank launch: {time.perf_counter() - start:.1f} s")
    return result.stdout


def finish(record: Any, path: Path) -> NoReturn:
    """End a worker: its results to ``path``, a final barrier, then a hard exit (a teardown abort, about one run
    in 15 here, must not fail the test)."""
    import torch
    import torch.distributed as dist

    torch.save(record, path)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)
