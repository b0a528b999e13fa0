"""The old-schema view against the old-schema config of each preset."""

from __future__ import annotations

import pytest

from harness.compat.old_schema import OldSchemaView, old_schema_dict
from harness.presets import PRESETS, preset_config_dict


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_view_answers_old_names(preset):
    from transformers import Gemma4TextConfig

    old = preset_config_dict(preset)
    cfg = Gemma4TextConfig(**old)
    with pytest.raises(RuntimeError):
        cfg.head_dim  # noqa: B018  (new schema: ambiguous per-layer attribute)
    view = OldSchemaView(cfg)
    assert view.head_dim == old["head_dim"]
    assert view.num_key_value_heads == old["num_key_value_heads"]
    assert view.global_head_dim == old["global_head_dim"]
    expected_kv = old["num_global_key_value_heads"] if old["attention_k_eq_v"] else None
    assert view.num_global_key_value_heads == expected_kv
    assert getattr(view, "head_dim", 0) == old["head_dim"]  # getattr with a default no longer raises
    assert view.layer_types == old["layer_types"] and view.sliding_window == old["sliding_window"]
    assert not hasattr(view, "text_config")
    d = old_schema_dict(cfg)
    assert "per_layer_config" not in d
    for k in ("head_dim", "global_head_dim", "num_key_value_heads"):
        assert d[k] == old[k]
    with pytest.raises(AttributeError):
        view.head_dim = 3
