"""``emakit demo``: train a small CNN with emakit's Trainer and EMA and show raw vs EMA validation curves.

The names below are imported on first use (PEP 562), so that ``emakit demo --help`` reads the defaults
from :mod:`emakit.demo.config` without loading torch. ``emakit.demo.run``, ``.data`` and ``.model`` load
torch; scikit-learn, matplotlib and safetensors load only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emakit._lazy import lazy_names

if TYPE_CHECKING:
    from emakit.demo.config import DemoConfig, OptionError
    from emakit.demo.data import DemoData, load_data
    from emakit.demo.model import build_model
    from emakit.demo.run import DemoResult, RawVsEmaRecorder, noise, prepare, run_demo, summarize

__all__ = [
    "DemoConfig",
    "DemoData",
    "DemoResult",
    "OptionError",
    "RawVsEmaRecorder",
    "build_model",
    "load_data",
    "noise",
    "prepare",
    "run_demo",
    "summarize",
]

_LAZY: dict[str, str] = {
    "DemoConfig": "emakit.demo.config",
    "OptionError": "emakit.demo.config",
    "DemoData": "emakit.demo.data",
    "load_data": "emakit.demo.data",
    "build_model": "emakit.demo.model",
    "DemoResult": "emakit.demo.run",
    "RawVsEmaRecorder": "emakit.demo.run",
    "noise": "emakit.demo.run",
    "prepare": "emakit.demo.run",
    "run_demo": "emakit.demo.run",
    "summarize": "emakit.demo.run",
}


__getattr__, __dir__ = lazy_names(__name__, __all__, _LAZY)
