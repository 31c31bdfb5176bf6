"""``emakit demo``: train a small CNN with emakit's Trainer and EMA and show raw vs EMA validation curves.

Importing this package loads torch but not scikit-learn, matplotlib or safetensors; those load when used.
"""

from emakit.demo.data import DemoData, load_data
from emakit.demo.model import build_model
from emakit.demo.run import DemoConfig, DemoResult, OptionError, RawVsEmaRecorder, noise, prepare, run_demo, summarize

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
