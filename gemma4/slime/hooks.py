"""Route slime's model-name dispatch to the Gemma 4 entry points, in the current process.

slime has no registry for third-party models' weight converters, loaders or loss-mask types; it dispatches
on the model name inside its own functions. :func:`install` (called by our model provider, i.e. in every
training actor) therefore patches, in the slime modules loaded in this process:

* every ``convert_to_hf`` function (slime's Megatron -> HF dispatcher, ``slime.backends.megatron_utils.
  megatron_to_hf``) -> a wrapper sending Gemma 4 model names to
  :func:`gemma4.slime.weight_sync.convert_gemma4_to_hf` and everything else to the original;
* every ``_LOADERS`` dict (``slime.backends.megatron_utils.hf_to_megatron``, used by ``--load``/``--ref-load``
  with an HF directory) -> gains :data:`gemma4.slime.loader.LOADERS` (existing keys are left alone), and
  every ``load_hf_weights`` -> :func:`gemma4.slime.loader.with_gemma4_buffers` (slime's walk skips buffers,
  so ``layer_scalar`` would stay 1.0);
* every ``MultiTurnLossMaskGenerator`` class (``slime.utils.mask_utils``) -> a subclass that builds
  :class:`gemma4.slime.loss_mask.Gemma4LossMaskGenerator` for ``tokenizer_type="gemma4"``;
* ``_named_params_and_buffers_global`` (``slime.backends.megatron_utils.update_weight.common``, the one
  function every weight-sync path and the HF saver name parameters through) ->
  :func:`gemma4.slime.weight_sync.with_global_expert_names`: slime makes expert indices global only for
  TE's grouped names, so our SequentialMLP experts (``local_experts.{i}``) would reach the converter with
  the rank-local index at EP > 1 and be merged or dropped across EP ranks.

Names bound by ``from … import …`` in already-loaded slime modules are patched too (found by identity with
the original object); the source modules in :data:`KNOWN_MODULES` are imported first when slime is
importable, so later imports see the patched objects. This is what makes the order safe: slime imports
``hf_to_megatron`` lazily, inside ``checkpoint._load_checkpoint_hf``, i.e. after our model provider ran
``install``; importing it here first means that later ``from … import load_hf_weights`` finds the patched
function and the ``_LOADERS`` dict already holding Gemma 4. Idempotent; without slime it does nothing. The module
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
    "slime.backends.megatron_utils.update_weight.common",
    "slime.backends.megatron_utils.hf_to_megatron",
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
    from gemma4.slime.loader import LOADERS, with_gemma4_buffers
    from gemma4.slime.loss_mask import dispatching_class
    from gemma4.slime.weight_sync import dispatcher_with_gemma4, with_global_expert_names

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
            elif (
                callable(value) and not isinstance(value, type) and _is_slime_object(value, "load_hf_weights")
            ):
                new = replacements.setdefault(id(value), with_gemma4_buffers(value))
            elif (
                callable(value)
                and not isinstance(value, type)
                and _is_slime_object(value, "_named_params_and_buffers_global")
            ):
                new = replacements.setdefault(id(value), with_global_expert_names(value))
            elif isinstance(value, type) and _is_slime_object(value, "MultiTurnLossMaskGenerator"):
                new = replacements.setdefault(id(value), dispatching_class(value))
            else:
                continue
            setattr(module, attr, new)
            done.append(f"{where} -> gemma4")
    return done
