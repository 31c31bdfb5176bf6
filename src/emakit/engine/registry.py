"""torch's module registration hooks as one counter, so that kept update plans notice a replaced tensor."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["registration_count"]

#: Read as ``registry._registrations`` (an attribute of this module, kept current by the hooks).
_registrations = 0
_watching = False


def _counter(table: str) -> Callable[[nn.Module, str, object], None]:
    def count(module: nn.Module, name: str, value: object) -> None:
        # ``self.step += 1`` on a buffer re-registers the same tensor: nothing moved.
        if module.__dict__.get(table, {}).get(name) is not value:
            global _registrations
            _registrations += 1

    return count


def registration_count() -> int:
    """How many parameters, buffers and submodules any module has registered or replaced so far.

    The first call installs torch's global registration hooks (a dict lookup and a counter increment per
    registration), so cached update plans notice ``module.weight = nn.Parameter(...)``,
    ``load_state_dict(assign=True)`` or a replaced submodule anywhere and re-pair their tensors.
    Re-registering the same object (``self.counter += 1`` on a buffer) does not count.
    """
    global _watching
    if not _watching:
        from torch.nn.modules import module as module_mod

        module_mod.register_module_parameter_registration_hook(_counter("_parameters"))
        module_mod.register_module_buffer_registration_hook(_counter("_buffers"))
        module_mod.register_module_module_registration_hook(_counter("_modules"))
        _watching = True
    return _registrations
