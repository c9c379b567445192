"""What every integration's GranQ quantizer module shares, written once: its saved settings, its
enable flags and the module name in its errors.

:class:`QuantizerStateMixin` (any quantizer ``nn.Module``)
    * ``_extra_state`` = :func:`granq_ao.saved_settings.settings_tensor` of :meth:`saved_configs`
      (``[bits, symmetric, granularity, axis, quant_min, quant_max]``, one row per config);
    * ``_load_from_state_dict`` refuses a state_dict saved from other settings (the message names
      the module's key), otherwise runs the host class's loader and forgives a missing
      ``_extra_state`` (:func:`granq_ao.saved_settings.load_checking_settings`);
    * :meth:`labelled` re-raises a ``TypeError``/``ValueError`` (``NonFiniteInputError`` included)
      as the same type with the module's place in the running model in front.

:func:`config_property` a read-only property forwarding to the object holding the options.

:class:`EnableFlagsMixin` (a ``FakeQuantizeBase`` of torch.ao or torchao)
    Python mirrors of the ``fake_quant_enabled`` / ``observer_enabled`` buffers, so ``forward``
    never reads a device tensor; kept in step by ``enable_fake_quant`` / ``enable_observer`` and
    refreshed after ``load_state_dict``.

Hook points, overridden by a host class where it differs (each is a plain method):

* :meth:`saved_configs` the config (or configs, ``None`` = float) whose settings are saved;
* :meth:`_load_host_state` the host class's own ``_load_from_state_dict`` (default: the next
  class in the MRO; a host whose loader must be bypassed calls ``nn.Module``'s instead);
* :meth:`_after_state_loaded` runs after a load that was not refused (default: nothing);
* :attr:`keep_state_if_absent` (class attribute) a state_dict with no key of this module leaves
  its state as it is (a float checkpoint loaded into a prepared model) instead of reporting the
  keys missing;
* :meth:`error_label` the module's name in error messages (default:
  :func:`granq_ao.diagnostics.module_label`, looked up on the call stack).

Torch-only core: every integration may use it.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from .diagnostics import module_label
from .saved_settings import Settings, load_checking_settings, settings_tensor

__all__ = ["QuantizerStateMixin", "EnableFlagsMixin", "config_property"]


def config_property(field: str, holder: str = "config") -> property:
    """A read-only property ``self.<holder>.<field>``: a quantizer's options read from the one
    object that holds them (replace that object to change them)."""
    return property(lambda self: getattr(getattr(self, holder), field),
                    doc=f"``{holder}.{field}`` (read-only; replace ``{holder}`` to change it).")


class QuantizerStateMixin:
    """Saved settings (extra state, checked on load) and labelled errors; list it before the
    host ``nn.Module`` class in the bases. See the module docstring for the hook points."""

    #: a state_dict holding no key of this module leaves its state as it is (see the module docstring)
    keep_state_if_absent: ClassVar[bool] = False

    def saved_configs(self) -> Settings:
        """The :class:`~granq_ao.config.GranQConfig` (or a tuple of them, ``None`` = float) whose
        settings travel with the state_dict. Default: ``self.config``."""
        return self.config

    # -- the saved settings
    def get_extra_state(self) -> torch.Tensor:
        return settings_tensor(self.saved_configs())

    def set_extra_state(self, state: Any) -> None:
        pass  # checked in _load_from_state_dict, where a mismatch is reported with the module's name

    def _load_host_state(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs) -> None:
        """The host class's own loading (hook: default the next class in the MRO)."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _after_state_loaded(self) -> None:
        """Runs after a load that was not refused (hook: default nothing)."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        def load() -> None:
            self._load_host_state(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                  error_msgs)
        if load_checking_settings(load, self.saved_configs(), state_dict, prefix, missing_keys, error_msgs,
                                  prefix.rstrip(".") or type(self).__name__,
                                  keep_state_if_absent=self.keep_state_if_absent):
            self._after_state_loaded()

    # -- the module's name in its errors
    def error_label(self) -> str:
        """``ClassName 'path.in.model' (in Owner)`` (hook: error paths only, may be slow)."""
        return module_label(self)

    def labelled(self, error: Exception, what: str = "") -> Exception:
        """``error`` again, same type, its message prefixed with :meth:`error_label` (and
        `` (what)``): ``raise self.labelled(error) from None`` in an ``except`` clause."""
        where = self.error_label() + (f" ({what})" if what else "")
        return type(error)(f"{where}: {error}")


class EnableFlagsMixin(QuantizerStateMixin):
    """:class:`QuantizerStateMixin` plus Python mirrors of a ``FakeQuantizeBase``'s
    ``fake_quant_enabled`` / ``observer_enabled`` buffers (read by ``forward`` without a device
    read; writing the buffers by hand is not seen: use the ``enable_*`` methods or
    ``load_state_dict``). List it before the host ``FakeQuantizeBase`` in the bases and call
    :meth:`_init_enable_flags` after the host's ``__init__``."""

    def _init_enable_flags(self) -> None:
        self._fake_quant_on = bool(self.fake_quant_enabled[0])
        self._observer_on = bool(self.observer_enabled[0])

    @property
    def fake_quant_on(self) -> bool:
        """Whether ``forward`` quantizes (the Python mirror of ``fake_quant_enabled``)."""
        return self._fake_quant_on

    def enable_fake_quant(self, enabled: bool = True) -> None:
        super().enable_fake_quant(enabled)
        self._fake_quant_on = bool(enabled)

    def enable_observer(self, enabled: bool = True) -> None:
        super().enable_observer(enabled)
        self._observer_on = bool(enabled)

    def _after_state_loaded(self) -> None:
        super()._after_state_loaded()
        self._init_enable_flags()
