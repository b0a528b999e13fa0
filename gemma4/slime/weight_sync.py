"""Weight sync (Megatron -> SGLang): slime's ``convert_<model>_to_hf(args, name, param)`` for Gemma 4.

slime gathers each parameter over TP (and EP, with global expert indices) and calls the converter of the
model once per parameter; the converter returns the HF ``(name, tensor)`` pairs SGLang loads. Ours is
:func:`gemma4.conversion.streaming.convert_gemma4_to_hf` itself (re-exported, not wrapped), so weight sync
is the same code the conversion tests check against HF's state dict; it reads the model geometry from
``args.hf_checkpoint``'s ``config.json``. MoE experts come back one per call as
``layers.{L}.experts.{e}.gate_up_proj`` / ``down_proj`` slices (see that module's docstring).

:func:`convert_to_hf` has the shape of slime's dispatcher, ``convert_to_hf(args, model_name, name, param,
quantization_config=None)``: Gemma 4 model names (any config or class name containing ``gemma4``) go to our
converter; :func:`gemma4.slime.hooks.install` routes slime's own dispatcher through it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gemma4.conversion.streaming import ExpertStacker, convert_gemma4_to_hf  # noqa: F401 - re-exported
from gemma4.errors import InvalidInputError


def is_gemma4_model_name(model_name: Any) -> bool:
    """True for slime's model names of Gemma 4 (``gemma4config``, ``gemma4textconfig``, ``gemma-4``, ...)."""
    if not isinstance(model_name, str):
        return False
    return "gemma4" in model_name.lower().replace("-", "").replace("_", "")


def convert_to_hf(
    args: Any, model_name: str, name: str, param: Any, quantization_config: Any = None, *, fallback=None
) -> list[tuple[str, Any]]:
    """slime's dispatcher shape. Gemma 4 names -> :func:`convert_gemma4_to_hf`; other names -> ``fallback``
    (slime's original dispatcher when installed by the hooks) or an error naming the model."""
    if is_gemma4_model_name(model_name):
        if quantization_config is not None:
            raise InvalidInputError(
                f"weight sync of {name!r}: quantized export ({type(quantization_config).__name__}) is not "
                "supported for Gemma 4"
            )
        return convert_gemma4_to_hf(args, name, param)
    if fallback is not None:
        return fallback(args, model_name, name, param, quantization_config)
    raise InvalidInputError(f"no Megatron->HF converter for model {model_name!r} here (Gemma 4 only)")


def dispatcher_with_gemma4(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap slime's ``convert_to_hf`` so that Gemma 4 models use our converter and others the original."""

    def convert_to_hf_with_gemma4(args, model_name, name, param, *rest, **kwargs):
        if is_gemma4_model_name(model_name):
            quantization = rest[0] if rest else kwargs.get("quantization_config")
            return convert_to_hf(args, model_name, name, param, quantization)
        return original(args, model_name, name, param, *rest, **kwargs)

    convert_to_hf_with_gemma4.__wrapped__ = original
    convert_to_hf_with_gemma4.gemma4_hook = True
    return convert_to_hf_with_gemma4
