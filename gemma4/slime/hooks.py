"""Route slime's model-name dispatch to the Gemma 4 entry points, in the current process.

slime has no registry for third-party models' weight converters, loaders or loss-mask types; it dispatches
on the model name inside its own functions. :func:`install` (called by our model provider, i.e. in every
training actor) therefore patches, in the slime modules loaded in this process:

* every ``convert_to_hf`` function (slime's Megatron -> HF dispatcher, ``slime.backends.megatron_utils.
  megatron_to_hf``) -> a wrapper sending Gemma 4 model names to
  :func:`gemma4.slime.weight_sync.convert_gemma4_to_hf` and everything else to the original;
* every ``_LOADERS`` dict -> gains :data:`gemma4.slime.loader.LOADERS` (existing keys are left alone);
* every ``MultiTurnLossMaskGenerator`` class (``slime.utils.mask_utils``) -> a subclass that builds
  :class:`gemma4.slime.loss_mask.Gemma4LossMaskGenerator` for ``tokenizer_type="gemma4"``.

Names bound by ``from … import …`` in already-loaded slime modules are patched too (found by identity with
the original object); the source modules in :data:`KNOWN_MODULES` are imported first when slime is
importable, so later imports see the patched objects. Idempotent; without slime it does nothing. The module
paths are an assumption about slime's layout (README: Running with slime); what was patched is returned and
logged, so a slime that moved them shows up as an empty list.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterable
from types import ModuleType
from typing import Any

KNOWN_MODULES = (
    "slime.backends.megatron_utils.megatron_to_hf",
    "slime.utils.mask_utils",
)


def _slime_modules(modules: Iterable[ModuleType] | None) -> list[ModuleType]:
    if modules is not None:
        return list(modules)
    return [
        m
        for name, m in list(sys.modules.items())
        if isinstance(m, ModuleType) and (name == "slime" or name.startswith("slime."))
    ]


def _import_known() -> None:
    if importlib.util.find_spec("slime") is None:
        return
    for name in KNOWN_MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a slime without this module: nothing to patch there
            continue


def _is_slime_object(obj: Any, name: str) -> bool:
    return getattr(obj, "__name__", None) == name and str(getattr(obj, "__module__", "")).startswith("slime")


def install(modules: Iterable[ModuleType] | None = None, import_known: bool = True) -> list[str]:
    """Patch slime's dispatch points (see the module docstring); returns one line per patched attribute."""
    from gemma4.slime.loader import LOADERS
    from gemma4.slime.loss_mask import dispatching_class
    from gemma4.slime.weight_sync import dispatcher_with_gemma4

    if modules is None and import_known:
        _import_known()
    done: list[str] = []
    replacements: dict[int, Any] = {}
    for module in _slime_modules(modules):
        for attr, value in list(vars(module).items()):
            where = f"{module.__name__}.{attr}"
            if attr == "_LOADERS" and isinstance(value, dict):
                added = [k for k in LOADERS if k not in value]
                for k in added:
                    value[k] = LOADERS[k]
                if added:
                    done.append(f"{where} += {added}")
                continue
            if getattr(value, "gemma4_hook", False):
                continue
            if callable(value) and not isinstance(value, type) and _is_slime_object(value, "convert_to_hf"):
                new = replacements.setdefault(id(value), dispatcher_with_gemma4(value))
            elif isinstance(value, type) and _is_slime_object(value, "MultiTurnLossMaskGenerator"):
                new = replacements.setdefault(id(value), dispatching_class(value))
            else:
                continue
            setattr(module, attr, new)
            done.append(f"{where} -> gemma4")
    return done
