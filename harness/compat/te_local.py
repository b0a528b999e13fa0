"""Transformer Engine -> local Megatron-Core modules, for running a TE-based implementation on a CPU.

Without Transformer Engine, Megatron-Core still *binds* every TE name: ``megatron.core.extensions.
transformer_engine`` sets ``te = MagicMock()`` so ``class TELinear(te.pytorch.Linear)`` makes
``TELinear``, ``TEColumnParallelLinear``, ``TERowParallelLinear``, ``TELayerNormColumnParallelLinear`` and
``TEDotProductAttention`` ``MagicMock`` *instances*; ``TENorm`` is a real class whose ``__new__`` raises;
the grouped-GEMM names are ``None``; ``TESpecProvider`` hands out those placeholders and, for experts, the
legacy ``GroupedMLP`` (which needs the ``grouped_gemm`` CUDA package). A spec naming them imports fine and
fails only when ``build_module`` runs (or silently builds a ``MagicMock`` where a module should be).

:func:`localize_spec` rewrites a ``ModuleSpec`` tree (any depth, any dataclass of submodules) so every TE
object, however it was referenced, becomes its local equivalent:

==================================  =====================================================================
TE                                  local
==================================  =====================================================================
TELayerNormColumnParallelLinear     ColumnParallelLinear, and the norm it fused becomes a separate submodule
                                    where Megatron's local spec has it (``input_layernorm`` before
                                    ``self_attention``, ``pre_mlp_layernorm`` before ``mlp``,
                                    ``pre_cross_attn_layernorm`` before ``cross_attention``)
TEColumnParallelLinear              ColumnParallelLinear
TERowParallelLinear                 RowParallelLinear
TEDotProductAttention               DotProductAttention
TENorm                              :class:`LocalNorm` (``torch.nn.RMSNorm`` / ``torch.nn.LayerNorm``)
TEGroupedMLP, GroupedMLP,           SequentialMLP(ColumnParallelLinear, RowParallelLinear)
TEFusedMLP                          MLP with local linears
==================================  =====================================================================

Anything else that is TE (a ``MagicMock`` placeholder, a class from ``transformer_engine``) raises
:class:`TELocalizationError` naming its path in the tree: nothing is left to fail at build time.

:func:`localized_globals` does the same for TE names a module uses *directly* (``TENorm(config=...)`` in
an ``__init__``), within a context manager (except the fused ``TELayerNormColumnParallelLinear``, left
for :func:`localize_spec`). :func:`te_to_local_param_name` renames state-dict keys
(``linear_qkv.layer_norm_weight`` -> ``input_layernorm.weight``, ``experts.linear_fc1.weight3`` ->
``experts.local_experts.3.linear_fc1.weight``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from typing import Any
from unittest.mock import NonCallableMock

import torch


class TELocalizationError(RuntimeError):
    """A spec names a Transformer Engine object with no local equivalent (message names where)."""


class LocalNorm:
    """``TENorm``'s local stand-in: ``torch.nn.RMSNorm`` / ``torch.nn.LayerNorm`` by ``config.normalization``.

    Unlike Megatron's ``WrappedTorchNorm`` it accepts ``persist_layer_norm`` / ``sequence_parallel`` configs
    (performance flags with no numerical effect on one rank); zero-centred gamma is refused (it changes the
    math and torch's norms cannot express it).
    """

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> torch.nn.Module:
        if getattr(config, "layernorm_zero_centered_gamma", False):
            raise TELocalizationError("LocalNorm: layernorm_zero_centered_gamma is not supported")
        dtype = getattr(config, "params_dtype", None)
        kind = getattr(config, "normalization", "LayerNorm")
        if kind == "RMSNorm":
            return torch.nn.RMSNorm(hidden_size, eps=eps, dtype=dtype)
        if kind == "LayerNorm":
            return torch.nn.LayerNorm(hidden_size, eps=eps, dtype=dtype)
        raise TELocalizationError(f"LocalNorm: normalization {kind!r} is not supported")


# Names in megatron.core.extensions.transformer_engine -> what they become.
_TE_NAMES = (
    "TELinear",
    "TELayerNormColumnParallelLinear",
    "TEColumnParallelLinear",
    "TERowParallelLinear",
    "TEDotProductAttention",
    "TENorm",
    "TEGroupedLinear",
    "TEColumnParallelGroupedLinear",
    "TERowParallelGroupedLinear",
    "TEFusedMLP",
    "TEActivationOp",
)
_FUSED_NORM_SLOT = {
    "self_attention": "input_layernorm",
    "mlp": "pre_mlp_layernorm",
    "cross_attention": "pre_cross_attn_layernorm",
}


def _locals() -> dict[str, Any]:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.mlp import MLP

    return {
        "TELayerNormColumnParallelLinear": ColumnParallelLinear,
        "TEColumnParallelLinear": ColumnParallelLinear,
        "TERowParallelLinear": RowParallelLinear,
        "TEDotProductAttention": DotProductAttention,
        "TENorm": LocalNorm,
        "TEFusedMLP": MLP,
    }


def te_objects() -> dict[int, str]:
    """``id(obj) -> name`` of every TE object Megatron-Core binds (placeholders included)."""
    import megatron.core.extensions.transformer_engine as te_ext

    out = {}
    for name in _TE_NAMES:
        obj = getattr(te_ext, name, None)
        if obj is not None:
            out[id(obj)] = name
    return out


def te_name(obj: Any) -> str | None:
    """The TE name ``obj`` stands for, or None if it is not a TE object."""
    name = te_objects().get(id(obj))
    if name is not None:
        return name
    if isinstance(obj, type):
        from megatron.core.transformer.moe.experts import GroupedMLP, TEGroupedMLP

        if issubclass(obj, TEGroupedMLP):
            return "TEGroupedMLP"
        if issubclass(obj, GroupedMLP):
            return "GroupedMLP"
        for base in obj.__mro__:
            if base.__module__.split(".")[0] == "transformer_engine":
                return base.__qualname__
            if (
                base.__module__ == "megatron.core.extensions.transformer_engine"
                and base.__name__ in _TE_NAMES
            ):
                return base.__name__
    return None


def _is_placeholder(obj: Any) -> bool:
    return isinstance(obj, NonCallableMock)


def _local_experts_spec():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.spec_utils import ModuleSpec

    return ModuleSpec(
        module=SequentialMLP,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
    )


def _module_of(x: Any) -> Any:
    from megatron.core.transformer.spec_utils import ModuleSpec

    return x.module if isinstance(x, ModuleSpec) else x


def _fused_linear_inside(x: Any) -> bool:
    """Whether spec ``x``'s own submodules name TELayerNormColumnParallelLinear (one level down)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if not isinstance(x, ModuleSpec) or x.submodules is None or not dataclasses.is_dataclass(x.submodules):
        return False
    return any(
        te_name(getattr(x.submodules, f.name)) == "TELayerNormColumnParallelLinear"
        for f in dataclasses.fields(x.submodules)
    )


def localize_spec(spec: Any, *, path: str = "spec") -> Any:
    """A copy of ``spec`` (ModuleSpec, class, dataclass of submodules, list...) with TE replaced (module doc)."""
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec

    table = _locals()
    name = te_name(spec)
    if name in ("TEGroupedMLP", "GroupedMLP"):
        return _local_experts_spec()
    if name is not None:
        if name not in table:
            raise TELocalizationError(f"{path}: Transformer Engine {name} has no local equivalent")
        return table[name]
    if _is_placeholder(spec):
        raise TELocalizationError(f"{path}: a MagicMock placeholder (Transformer Engine is not installed)")
    if isinstance(spec, ModuleSpec):
        module = spec.module
        mname = te_name(module)
        if mname in ("TEGroupedMLP", "GroupedMLP"):
            return _local_experts_spec()
        new_module = (
            localize_spec(module, path=f"{path}.module") if (mname or _is_placeholder(module)) else module
        )
        if mname == "TEFusedMLP":
            from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
            from megatron.core.transformer.mlp import MLPSubmodules

            return ModuleSpec(
                module=new_module,
                params=dict(spec.params),
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                metainfo=dict(spec.metainfo),
            )
        return ModuleSpec(
            module=new_module,
            params={k: localize_spec(v, path=f"{path}.params[{k}]") for k, v in spec.params.items()},
            submodules=localize_spec(spec.submodules, path=f"{path}.submodules"),
            metainfo=dict(spec.metainfo),
        )
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {}
        fused_slots = []
        for f in dataclasses.fields(spec):
            value = getattr(spec, f.name)
            if f.name in _FUSED_NORM_SLOT and _fused_linear_inside(value):
                fused_slots.append(f.name)
            changes[f.name] = localize_spec(value, path=f"{path}.{f.name}")
        for slot in fused_slots:
            norm_field = _FUSED_NORM_SLOT[slot]
            if not hasattr(spec, norm_field):
                raise TELocalizationError(
                    f"{path}.{slot}: a fused layernorm-linear with no {norm_field} slot to move the norm to"
                )
            current = _module_of(getattr(spec, norm_field))
            if current is not IdentityOp:
                raise TELocalizationError(
                    f"{path}.{slot}: a fused layernorm-linear although {norm_field} is already "
                    f"{current!r} (the input would be normed twice)"
                )
            changes[norm_field] = LocalNorm
        return dataclasses.replace(spec, **changes)
    if isinstance(spec, list | tuple):
        return type(spec)(localize_spec(v, path=f"{path}[{i}]") for i, v in enumerate(spec))
    if isinstance(spec, dict):
        return {k: localize_spec(v, path=f"{path}[{k!r}]") for k, v in spec.items()}
    return spec


def find_te(spec: Any, *, path: str = "spec") -> list[str]:
    """Paths of every TE object (or placeholder) left in ``spec``; ``[]`` after :func:`localize_spec`."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if te_name(spec) is not None or _is_placeholder(spec):
        return [path]
    if isinstance(spec, ModuleSpec):
        return (
            find_te(spec.module, path=f"{path}.module")
            + [p for k, v in spec.params.items() for p in find_te(v, path=f"{path}.params[{k}]")]
            + find_te(spec.submodules, path=f"{path}.submodules")
        )
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return [
            p
            for f in dataclasses.fields(spec)
            for p in find_te(getattr(spec, f.name), path=f"{path}.{f.name}")
        ]
    if isinstance(spec, list | tuple):
        return [p for i, v in enumerate(spec) for p in find_te(v, path=f"{path}[{i}]")]
    if isinstance(spec, dict):
        return [p for k, v in spec.items() for p in find_te(v, path=f"{path}[{k!r}]")]
    return []


@contextlib.contextmanager
def localized_globals(*modules: Any) -> Iterator[dict[str, list[str]]]:
    """Within the block, every TE name bound in each module's globals (``TENorm`` used directly in an
    ``__init__``) is the local equivalent; yields ``{module name: [replaced names]}``. Restored on exit."""
    table = _locals()
    saved: list[tuple[Any, str, Any]] = []
    report: dict[str, list[str]] = {}
    try:
        for mod in modules:
            for attr, value in list(vars(mod).items()):
                name = te_name(value)
                # A fused layernorm-linear cannot be swapped by name (the norm would be lost): it is left
                # in place for localize_spec, which moves its norm to a separate submodule.
                if name in table and name != "TELayerNormColumnParallelLinear":
                    saved.append((mod, attr, value))
                    setattr(mod, attr, table[name])
                    report.setdefault(mod.__name__, []).append(attr)
        yield report
    finally:
        for mod, attr, value in reversed(saved):
            setattr(mod, attr, value)


_EXPERT = re.compile(r"^(.*\.experts)\.linear_fc([12])\.weight(\d+)$")


def te_to_local_param_name(name: str) -> str:
    """The local-module state-dict key of a TE-module key (identity for keys TE does not change)."""
    m = _EXPERT.match(name)
    if m:
        return f"{m.group(1)}.local_experts.{m.group(3)}.linear_fc{m.group(2)}.weight"
    if name.endswith("self_attention.linear_qkv.layer_norm_weight"):
        return name.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
    if name.endswith("cross_attention.linear_q.layer_norm_weight"):
        return name.replace("cross_attention.linear_q.layer_norm_weight", "pre_cross_attn_layernorm.weight")
    m2 = re.match(r"^(.*)\.mlp\.linear_fc1\.layer_norm_weight$", name)
    if m2:
        return f"{m2.group(1)}.pre_mlp_layernorm.weight"
    return name
