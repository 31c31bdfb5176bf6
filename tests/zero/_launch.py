"""The environment of a DeepSpeed launch on 2 CPU ranks, with DeepSpeed's CPU communication op built once.

(Not a conftest.py: the tests import ``conftest`` by that name, which a second one here would shadow.)
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys


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
