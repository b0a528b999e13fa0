"""Megatron ``torch_dist`` checkpoints: written by Megatron's own save, loaded by Megatron's own load into
our model (per-layer keys), read back by us without unpickling anything but DCP's plain data classes."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from gemma4.conversion.mcore_io import MANIFEST
from harness.cli import main
from harness.presets import PRESETS, preset_config_dict
from harness.testing.conversion import logits_failures, roundtrip_failures, save_hf_checkpoint


def run(argv, capsys):
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_torch_dist_roundtrip_bit_exact(tmp_path, name):
    """Every preset (dense, MoE with stacked experts, PLE + KV sharing) through Megatron's own save."""
    hf = save_hf_checkpoint(tmp_path / "hf", preset_config_dict(name), torch.bfloat16, seed=3)
    assert roundtrip_failures(hf, tmp_path, fmt="torch_dist") == []


def test_torch_dist_roundtrip_untied(tmp_path):
    cfg = preset_config_dict("tiny-31b") | {"tie_word_embeddings": False}
    hf = save_hf_checkpoint(tmp_path / "hf", cfg, torch.float32, seed=3)
    assert roundtrip_failures(hf, tmp_path, fmt="torch_dist") == []


@pytest.mark.parametrize("name", ["tiny-12b", "tiny-26b-a4b", "tiny-e2b"])
def test_megatron_loads_torch_dist_and_logits_equal_hf(tmp_path, capsys, name):
    """dist_checkpointing.load(model.sharded_state_dict()) with hetereogenous_dist_checkpoint=True: strict,
    every key (incl. the linears' _extra_state) present; the loaded model's logits equal HF's."""
    hf = save_hf_checkpoint(tmp_path / "hf", preset_config_dict(name), seed=6)
    rc, out, _ = run(
        ["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "td"), "--format", "torch_dist"],
        capsys,
    )
    assert rc == 0 and "torch_dist" in out
    assert logits_failures(hf, tmp_path / "td") == []


def test_torch_dist_without_manifest_needs_hf_config(tmp_path, capsys):
    """A torch_dist directory saved by Megatron itself has no manifest: --hf-config supplies the model."""
    hf = save_hf_checkpoint(tmp_path / "hf", preset_config_dict("tiny-12b"))
    td = tmp_path / "td"
    assert (
        run(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(td), "--format", "torch_dist"], capsys)[
            0
        ]
        == 0
    )
    (td / MANIFEST).unlink()
    rc, _, err = run(["convert", "mcore-to-hf", "--mcore", str(td), "--out", str(tmp_path / "a")], capsys)
    assert rc == 2 and "--hf-config" in err and "Traceback" not in err
    argv = [
        "convert",
        "mcore-to-hf",
        "--mcore",
        str(td),
        "--out",
        str(tmp_path / "b"),
        "--hf-config",
        str(hf / "config.json"),
    ]
    assert run(argv, capsys)[0] == 0
    cfg = json.loads((hf / "config.json").read_text()) | {"intermediate_size": 96}
    (tmp_path / "wrong.json").write_text(json.dumps(cfg))
    argv[-1], argv[5] = str(tmp_path / "wrong.json"), str(tmp_path / "c")
    rc, _, err = run(argv, capsys)
    assert rc == 2 and "'decoder.layers.0.mlp.linear_fc1.weight' has shape [320, 48]" in err


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch BOOM",))


def test_torch_dist_metadata_is_never_unpickled_freely(tmp_path, capsys, monkeypatch):
    """A malicious .metadata is refused before anything runs (allow-list unpickler, like weights_only)."""
    monkeypatch.chdir(tmp_path)
    td = tmp_path / "td"
    td.mkdir()
    (td / ".metadata").write_bytes(pickle.dumps(_Boom()))
    hf = save_hf_checkpoint(tmp_path / "hf", preset_config_dict("tiny-12b"))
    argv = [
        "convert",
        "mcore-to-hf",
        "--mcore",
        str(td),
        "--out",
        str(tmp_path / "o"),
        "--hf-config",
        str(hf / "config.json"),
    ]
    rc, _, err = run(argv, capsys)
    assert rc == 2 and "refusing to unpickle" in err and ".metadata" in err
    assert not (tmp_path / "BOOM").exists()


def test_a_key_megatrons_load_does_not_return_is_refused(tmp_path, capsys):
    """If ``sharded_state_dict()`` (and so Megatron's load) leaves a tensor out -- as it would a buffer such as
    ``layer_scalar`` that a module forgot to shard -- the strict ``load_state_dict`` refuses instead of keeping
    the initial value (a silently wrong model; issue 17: ``strict=True`` dropped survived)."""
    from gemma4.config import text_spec_from_any
    from gemma4.conversion.torch_dist import load_torch_dist_into_model
    from gemma4.model.build import build_gemma4_model

    hf = save_hf_checkpoint(tmp_path / "hf", preset_config_dict("tiny-12b"), seed=6)
    td = tmp_path / "td"
    argv = ["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(td), "--format", "torch_dist"]
    assert run(argv, capsys)[0] == 0
    model = build_gemma4_model(
        text_spec_from_any(preset_config_dict("tiny-12b")), torch.float32, hetereogenous_dist_checkpoint=True
    )
    full = model.sharded_state_dict

    def forgetful(*args, **kwargs):
        return {k: v for k, v in full(*args, **kwargs).items() if not k.endswith("layer_scalar")}

    model.sharded_state_dict = forgetful
    with pytest.raises(RuntimeError, match="layer_scalar"):
        load_torch_dist_into_model(model, td)
