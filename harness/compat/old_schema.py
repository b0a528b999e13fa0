"""A pre-5.15 view of a transformers >= 5.15 ``Gemma4TextConfig`` (facts §6.10).

transformers 5.15 (HF PR #47384) folds ``global_head_dim`` / ``num_global_key_value_heads`` into
``per_layer_config`` and makes ``config.head_dim`` / ``config.num_key_value_heads`` raise
``AmbiguousGlobalPerLayerAttributeError`` (a ``RuntimeError``, so even ``getattr(cfg, "head_dim", d)`` raises).
Code written against transformers < 5.15 reads the old names. :class:`OldSchemaView` answers them from the
new config and delegates everything else:

* ``head_dim`` / ``num_key_value_heads``: the sliding-layer (model-level) values;
* ``global_head_dim``: the full-layer head dim (``head_dim`` when there is no full layer);
* ``num_global_key_value_heads``: the full-layer KV heads when ``attention_k_eq_v`` (the only case the
  old schema's value was used), else ``None`` (its old default);
* ``per_layer_config`` is still answered (the view hides nothing).

:func:`old_schema_dict` gives the pre-5.15 ``config.json`` dict of a config.
"""

from __future__ import annotations

from typing import Any

_OLD_NAMES = ("head_dim", "num_key_value_heads", "global_head_dim", "num_global_key_value_heads")


def _model_level(config: Any) -> dict[str, Any]:
    return config.to_dict()


def _full_layer_cfg(config: Any) -> Any | None:
    if "full_attention" not in list(getattr(config, "layer_types", None) or []):
        return None
    return config.per_layer_config["full_attention"]


def old_schema_values(config: Any) -> dict[str, Any]:
    """``{head_dim, num_key_value_heads, global_head_dim, num_global_key_value_heads}`` of ``config``."""
    if isinstance(config, OldSchemaView):
        config = config._config
    top = _model_level(config)
    head_dim = top["head_dim"]
    kv = top["num_key_value_heads"]
    full = _full_layer_cfg(config)
    global_head_dim = head_dim
    global_kv = None
    if full is not None:
        global_head_dim = getattr(full, "head_dim", None) or head_dim
        if top.get("attention_k_eq_v"):
            global_kv = getattr(full, "num_key_value_heads", None) or kv
    elif "global_head_dim" in top:  # an old-schema config object (transformers < 5.15)
        global_head_dim = top["global_head_dim"]
        global_kv = top.get("num_global_key_value_heads")
    return {
        "head_dim": head_dim,
        "num_key_value_heads": kv,
        "global_head_dim": global_head_dim,
        "num_global_key_value_heads": global_kv,
    }


class OldSchemaView:
    """Read-only attribute view of a Gemma 4 text config with the pre-5.15 names (see module doc)."""

    def __init__(self, config: Any):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_old", old_schema_values(config))

    def __getattr__(self, name: str) -> Any:
        old = object.__getattribute__(self, "_old")
        if name in old:
            return old[name]
        return getattr(object.__getattribute__(self, "_config"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"OldSchemaView is read-only (tried to set {name!r})")

    def to_dict(self) -> dict[str, Any]:
        return old_schema_dict(self._config)

    def __repr__(self) -> str:
        return f"OldSchemaView({type(self._config).__name__}, {self._old})"


def old_schema_dict(config: Any) -> dict[str, Any]:
    """The pre-5.15 ``config.json`` dict: ``per_layer_config`` removed, the four old fields written."""
    d = dict(config.to_dict())
    d.pop("per_layer_config", None)
    d.update(old_schema_values(config))
    return d
