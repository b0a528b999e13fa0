"""Megatron-Bridge 0.6.2's own ``torch_dist`` checkpoints -> ours / HF (``convert mcore-to-hf --layout
megatron-bridge --hf-config``, ``convert relayout --to ours --hf-config``).

**The fixture is Megatron-Bridge's own output.** ``data/megatron_bridge_torch_dist_tiny31b/`` (888 KiB:
``.metadata``, ``__0_0.distcp``, ``metadata.json``) was written by :data:`SAVE_SCRIPT` under Megatron-Bridge
0.6.2 / Megatron-Core 0.19.2 / torch 2.9.1 (CPU; see ``PROVENANCE.md`` beside it): Megatron-Bridge builds its
Gemma 4 ``GPTModel`` for the tiny-31b preset, imports the HF weights ``build_reference_model(seed=1)`` in
bfloat16 with its loader, and Megatron saves ``dist_checkpointing.save(model.sharded_state_dict(), dir)``, as
Megatron-Bridge's trainer saves model weights. Its keys (pinned in :data:`PINNED_KEYS`) are layer-stacked, with
attention split by layer type (``self_attention_sliding`` / ``self_attention_global``), unlike both our
``torch_dist`` layout (one key per layer) and the Bridge state dict (``decoder.layers.{L}.self_attention.``).

Set ``GEMMA4_MEGATRON_BRIDGE_PYTHON`` to a Python with megatron-bridge 0.6.2 (see
``test_megatron_bridge.py``) to regenerate the checkpoint live and compare it with the fixture
(:func:`test_live_bridge_torch_dist`, tiny-31b and tiny-e2b).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import pickletools
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gemma4.config import hf_text_config_from_any, text_spec_from_hf
from gemma4.conversion import megatron_bridge as mb
from gemma4.conversion.torch_dist import TorchDistReader, _AllowListUnpickler
from gemma4.errors import InvalidInputError
from harness.cli import main
from harness.presets import preset_config_dict
from harness.testing.conversion import save_hf_checkpoint, state_dict_failures, stored_tensors, text_relative

FIXTURE = Path(__file__).parent / "data" / "megatron_bridge_torch_dist_tiny31b"
PRESET = "tiny-31b"
ONE_LINE_ERROR = re.compile(r"^gemma4-harness convert( [a-z-]+)?: error: [^\n]+\n$")

#: sha256 of every fixture file (as PROVENANCE.md lists them).
FIXTURE_SHA256 = {
    ".metadata": "12500dcbbc82457976b110f07c50e44ac0be2d7c5cb9e971782ce9dfe29c89e3",
    "__0_0.distcp": "907111cdebf4f2612f9046b7254c0205582f93d14c31004d9023691a3a3d9b93",
    "metadata.json": "56b32e2dfbc0255db319bddf6880c9dfd3475135ca8d5ace23b8a6a384ed63c6",
}

#: The tensor keys Megatron-Bridge 0.6.2 saved for tiny-31b (5 sliding + 3 full layers), global shape and dtype,
#: in its ``.metadata`` order. Besides these, 33 byte entries: ``_extra_state`` of each linear, per layer
#: (``.../shard_{i}_{n}``), and ``common_state/shard_0_1``.
PINNED_KEYS: dict[str, tuple[tuple[int, ...], str]] = {
    "embedding.word_embeddings.weight": ((256, 64), "bfloat16"),
    "decoder.layers.layer_scalar": ((8, 1), "float32"),
    "decoder.layers.input_layernorm.weight": ((8, 64), "bfloat16"),
    "decoder.layers.self_attention_sliding.linear_proj.weight": ((5, 64, 64), "bfloat16"),
    "decoder.layers.self_attention_sliding.linear_qkv.weight": ((5, 128, 64), "bfloat16"),
    "decoder.layers.self_attention_sliding.q_layernorm.weight": ((5, 16), "bfloat16"),
    "decoder.layers.self_attention_sliding.k_layernorm.weight": ((5, 16), "bfloat16"),
    "decoder.layers.pre_mlp_layernorm.weight": ((8, 64), "bfloat16"),
    "decoder.layers.mlp.linear_fc1.weight": ((8, 256, 64), "bfloat16"),
    "decoder.layers.mlp.linear_fc2.weight": ((8, 64, 128), "bfloat16"),
    "decoder.layers.post_self_attn_layernorm.weight": ((8, 64), "bfloat16"),
    "decoder.layers.post_mlp_layernorm.weight": ((8, 64), "bfloat16"),
    "decoder.layers.self_attention_global.linear_proj.weight": ((3, 64, 128), "bfloat16"),
    "decoder.layers.self_attention_global.linear_qkv.weight": ((3, 192, 64), "bfloat16"),
    "decoder.layers.self_attention_global.q_layernorm.weight": ((3, 32), "bfloat16"),
    "decoder.layers.self_attention_global.k_layernorm.weight": ((3, 32), "bfloat16"),
    "decoder.final_layernorm.weight": ((64,), "float32"),
}

#: Run under a Python with megatron-bridge 0.6.2: ``python SAVE_SCRIPT HF_DIR OUT_DIR`` writes the torch_dist
#: checkpoint to OUT_DIR and Megatron-Bridge's model state dict to OUT_DIR/../mb_state_dict.safetensors.
SAVE_SCRIPT = r'''"""Megatron-Bridge 0.6.2: import an HF Gemma 4 checkpoint with its loader, save its model's torch_dist
checkpoint with Megatron's dist_checkpointing.save(model.sharded_state_dict(), dir) (as its trainer saves
model weights)."""
import json, os, sys, types
from pathlib import Path
import torch


class _Meta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Meta(name, (), {})


class _Stub(types.ModuleType):
    __version__ = "0.0.0"
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Meta(name, (), {})


def main():
    hf_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    from safetensors.torch import save_file
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state, dist_checkpointing
    parallel_state.initialize_model_parallel(1, 1)
    # Megatron-Core records "no Transformer Engine" first; then a stub satisfies Megatron-Bridge's import.
    import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401
    import megatron.core.transformer.transformer_layer  # noqa: F401
    import megatron.core.transformer.moe.experts  # noqa: F401
    for n in ("transformer_engine", "transformer_engine.pytorch", "transformer_engine.common",
              "transformer_engine.common.recipe", "transformer_engine.pytorch.tensor",
              "transformer_engine.pytorch.float8_tensor"):
        sys.modules.setdefault(n, _Stub(n))
    sys.modules["transformer_engine"].pytorch = sys.modules["transformer_engine.pytorch"]
    from megatron.bridge import AutoBridge

    torch.cuda.current_device = lambda: "cpu"  # its Gemma 4 rotary embedding ignores use_cpu_initialization
    torch.cuda.synchronize = lambda *a, **k: None  # CPU run: filesystem_async.preload_tensors syncs CUDA
    torch.manual_seed(0)
    bridge = AutoBridge.from_hf_pretrained(str(hf_dir), torch_dtype=torch.bfloat16)
    provider = bridge.to_megatron_provider(load_weights=False)
    provider.params_dtype = torch.bfloat16
    provider.use_cpu_initialization = True
    for knob in ("gradient_accumulation_fusion", "masked_softmax_fusion", "bias_activation_fusion",
                 "bias_dropout_fusion", "apply_rope_fusion", "persist_layer_norm"):
        if hasattr(provider, knob):
            setattr(provider, knob, False)
    provider.finalize()
    model = provider.provide_distributed_model(
        wrap_with_ddp=False, use_cpu_initialization=True, mixed_precision_wrapper=None, bf16=True)
    bridge.load_hf_weights(model)
    m = model[0]
    sd = {k: v.detach().contiguous() for k, v in m.state_dict().items()
          if not k.endswith("_extra_state") and v is not None}
    save_file(sd, str(out_dir.parent / "mb_state_dict.safetensors"))
    out_dir.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(m.sharded_state_dict(), str(out_dir))
    print(json.dumps({"n_state_dict": len(sd)}))


if __name__ == "__main__":  # dist_checkpointing.save starts a spawn multiprocessing manager
    main()
'''


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def bridge_to_hf(mcore: Path, out: Path, hf_config: Path | None = None) -> list[str]:
    """``convert mcore-to-hf --layout megatron-bridge`` argv (with ``--hf-config`` when given)."""
    argv = ["convert", "mcore-to-hf", "--mcore", str(mcore), "--out", str(out), "--layout", "megatron-bridge"]
    return argv + (["--hf-config", str(hf_config)] if hf_config is not None else [])


def refused(argv: list[str], capsys) -> str:
    """Exit 2 with one line on stderr (no traceback); the line."""
    rc, out, err = run(argv, capsys)
    assert rc == 2, (rc, out, err)
    assert ONE_LINE_ERROR.match(err), err
    return err


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """The HF checkpoint the fixture was made from (``build_reference_model(seed=1)`` in bfloat16)."""
    return save_hf_checkpoint(
        tmp_path_factory.mktemp("mbtd") / "hf", preset_config_dict(PRESET), torch.bfloat16, seed=1
    )


@pytest.fixture()
def ckpt(tmp_path) -> Path:
    """A writable copy of the fixture."""
    out = tmp_path / "bridge_td"
    shutil.copytree(FIXTURE, out)
    return out


def spec():
    return text_spec_from_hf(hf_text_config_from_any(preset_config_dict(PRESET)))


# ---- the fixture --------------------------------------------------------------------------------------------


def test_fixture_files_are_pinned():
    names = sorted(p.name for p in FIXTURE.iterdir() if p.name != "PROVENANCE.md")
    assert names == sorted(FIXTURE_SHA256)
    for name, digest in FIXTURE_SHA256.items():
        assert hashlib.sha256((FIXTURE / name).read_bytes()).hexdigest() == digest, name
    provenance = (FIXTURE / "PROVENANCE.md").read_text()
    assert all(d in provenance for d in FIXTURE_SHA256.values())
    assert sum((FIXTURE / n).stat().st_size for n in FIXTURE_SHA256) < 2 * 1024**2


def test_fixture_keys_are_megatron_bridges():
    reader = TorchDistReader.open(FIXTURE)  # the .metadata pickle through the allow-list
    got = {k: (reader.shape(k), str(reader.dtype(k)).removeprefix("torch.")) for k in reader.tensors}
    assert list(got.items()) == list(PINNED_KEYS.items())
    assert mb.is_bridge_torch_dist_keys(reader.tensors)


def _data_pickle_ops(blob: bytes) -> set[str]:
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        (pkl,) = [n for n in z.namelist() if n.endswith("data.pkl")]
        return {op.name for op, _, _ in pickletools.genops(z.read(pkl))}


def test_fixture_byte_entries_hold_no_objects():
    """Besides tensors, the .distcp file holds 33 DCP byte entries (``_extra_state``, ``common_state``): each a
    ``torch.save`` zip whose pickle (disassembled, never run) names no global: they hold ``[None]`` / ``[{}]``."""
    with open(FIXTURE / ".metadata", "rb") as f:
        meta = _AllowListUnpickler(f).load()
    data = (FIXTURE / "__0_0.distcp").read_bytes()
    byte_keys = [k for k, v in meta.state_dict_metadata.items() if type(v).__name__ == "BytesStorageMetadata"]
    assert len(byte_keys) == 33 and "common_state/shard_0_1" in byte_keys
    for idx, info in meta.storage_data.items():
        if idx.fqn in byte_keys:
            ops = _data_pickle_ops(data[info.offset : info.offset + info.length])
            assert not ops & {"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ", "BUILD"}, idx.fqn


# ---- names --------------------------------------------------------------------------------------------------


def test_names_map_onto_the_bridge_state_dict():
    s = spec()
    names = mb.bridge_torch_dist_names({k: v[0] for k, v in PINNED_KEYS.items()}, s)
    assert {
        n: (PINNED_KEYS[k][0] if r is None else PINNED_KEYS[k][0][1:]) for n, (k, r) in names.items()
    } == {e.name: e.shape for e in mb.bridge_plan(s)}
    full = [L for L in range(s.num_layers) if not s.is_sliding(L)]
    sliding = [L for L in range(s.num_layers) if s.is_sliding(L)]
    for i, L in enumerate(full):  # the i-th full layer is row i of the _global key
        assert names[f"decoder.layers.{L}.self_attention.linear_qkv.weight"] == (
            "decoder.layers.self_attention_global.linear_qkv.weight",
            i,
        )
    for i, L in enumerate(sliding):
        assert names[f"decoder.layers.{L}.self_attention.linear_proj.weight"] == (
            "decoder.layers.self_attention_sliding.linear_proj.weight",
            i,
        )
    assert names["decoder.layers.7.mlp.linear_fc1.weight"] == ("decoder.layers.mlp.linear_fc1.weight", 7)
    assert names["decoder.final_layernorm.weight"] == ("decoder.final_layernorm.weight", None)


def test_names_per_layer_form():
    """E2B/E4B (layers of different shapes): Megatron-Bridge saves one key per layer, attention still under
    ``self_attention_sliding``/``_global`` (seen live, :data:`LIVE_KEYS`)."""
    s = text_spec_from_hf(hf_text_config_from_any(preset_config_dict("tiny-e2b")))
    plan = {e.name: e.shape for e in mb.bridge_plan(s)}

    def saved(name: str) -> str:
        m = re.match(r"decoder\.layers\.(\d+)\.self_attention\.(.*)$", name)
        if m is None:
            return name
        kind = "sliding" if s.is_sliding(int(m.group(1))) else "global"
        return f"decoder.layers.{m.group(1)}.self_attention_{kind}.{m.group(2)}"

    keys = {saved(n): shape for n, shape in plan.items()}
    assert mb.is_bridge_torch_dist_keys(keys)
    assert mb.bridge_torch_dist_names(keys, s) == {n: (saved(n), None) for n in plan}


def test_names_refuse_a_wrong_layer_axis():
    shapes = {k: v[0] for k, v in PINNED_KEYS.items()}
    shapes["decoder.layers.self_attention_global.linear_qkv.weight"] = (4, 192, 64)
    with pytest.raises(
        InvalidInputError, match=r"'decoder\.layers\.self_attention_global\.linear_qkv\.weight'.*4"
    ):
        mb.bridge_torch_dist_names(shapes, spec())


def test_names_refuse_two_keys_for_one_tensor():
    shapes = {k: v[0] for k, v in PINNED_KEYS.items()}
    shapes["decoder.layers.3.self_attention_global.linear_qkv.weight"] = (192, 64)  # also row 0 of the stack
    with pytest.raises(InvalidInputError, match=r"both hold 'decoder\.layers\.3\.self_attention\.linear_qkv"):
        mb.bridge_torch_dist_names(shapes, spec())


def test_names_refuse_a_per_layer_key_of_the_wrong_type():
    with pytest.raises(InvalidInputError, match=r"layer 0 is full attention; the config disagrees"):
        mb.bridge_torch_dist_names(
            {"decoder.layers.0.self_attention_global.linear_qkv.weight": (192, 64)}, spec()
        )


def test_names_skip_optimizer_state():
    shapes = {k: v[0] for k, v in PINNED_KEYS.items()}
    shapes["optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.weight"] = (8, 256, 64)
    assert "optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.weight" not in {
        k for k, _ in mb.bridge_torch_dist_names(shapes, spec()).values()
    }


# ---- conversion ---------------------------------------------------------------------------------------------


def test_cli_mcore_to_hf_bit_exact(tmp_path, capsys, hf_dir):
    out = tmp_path / "hf_out"
    rc, stdout, err = run(bridge_to_hf(FIXTURE, out, hf_dir / "config.json"), capsys)
    assert rc == 0, err
    assert "torch_dist" in stdout
    assert (
        state_dict_failures(text_relative(stored_tensors(out)), text_relative(stored_tensors(hf_dir))) == []
    )


def test_cli_relayout_to_ours_bit_exact(tmp_path, capsys, hf_dir):
    ours, back = tmp_path / "ours", tmp_path / "back"
    rc, _, err = run(
        ["convert", "relayout", "--mcore", str(FIXTURE), "--out", str(ours), "--to", "ours", "--tp", "2"]
        + ["--hf-config", str(hf_dir / "config.json")],
        capsys,
    )
    assert rc == 0, err
    assert run(["convert", "mcore-to-hf", "--mcore", str(ours), "--out", str(back)], capsys)[0] == 0
    assert (
        state_dict_failures(text_relative(stored_tensors(back)), text_relative(stored_tensors(hf_dir))) == []
    )


def test_values_equal_the_bridge_state_dict_of_the_hf_weights(hf_dir):
    """Read and converted to ours, then to the Bridge state dict again: what our ``to_bridge`` gives from the
    HF weights, which test_megatron_bridge.py's pinned oracle shows equal to Megatron-Bridge's own loader."""
    from gemma4.conversion.hf_io import open_hf_checkpoint

    src = mb.open_bridge_checkpoint(FIXTURE, hf_dir / "config.json")
    hf = open_hf_checkpoint(hf_dir)
    expected = mb.hf_relative_to_bridge({n: hf.read(n) for n in hf.tensors}, src.spec)
    got = mb.to_bridge(src.ours, src.spec)
    assert sorted(got) == sorted(expected)
    assert [k for k in got if not torch.equal(got[k], expected[k])] == []
    assert src.notes[0].startswith("Megatron-Bridge 0.6.2 torch_dist checkpoint (attention keys under")


# ---- refusals -----------------------------------------------------------------------------------------------


def test_refused_without_hf_config(tmp_path, capsys):
    err = refused(
        bridge_to_hf(FIXTURE, tmp_path / "o"),
        capsys,
    )
    assert str(FIXTURE) in err and "torch_dist" in err and "--hf-config" in err


def test_our_reader_hints_at_the_bridge_layout(tmp_path, capsys, hf_dir):
    err = refused(
        ["convert", "mcore-to-hf", "--mcore", str(FIXTURE), "--out", str(tmp_path / "o")]
        + ["--hf-config", str(hf_dir / "config.json")],
        capsys,
    )
    assert f"{FIXTURE} is a Megatron-Bridge 0.6.2 torch_dist checkpoint" in err
    assert "--layout megatron-bridge" in err


def test_training_root_refused(tmp_path, capsys, hf_dir):
    root = tmp_path / "run"
    shutil.copytree(FIXTURE, root / "iter_0000010")
    (root / "latest_checkpointed_iteration.txt").write_text("10")
    err = refused(
        ["convert", "relayout", "--mcore", str(root), "--out", str(tmp_path / "o"), "--to", "ours"]
        + ["--hf-config", str(hf_dir / "config.json")],
        capsys,
    )
    assert str(root) in err and "iter_NNNNNNN" in err


def _rewrite_keys(directory: Path, rename) -> None:
    """Planted fault: rename keys in ``.metadata`` (tensor metadata and storage index alike)."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    with open(directory / ".metadata", "rb") as f:
        meta = _AllowListUnpickler(f).load()
    meta.state_dict_metadata = {rename(k): v for k, v in meta.state_dict_metadata.items()}
    meta.storage_data = {
        MetadataIndex(rename(i.fqn), i.offset, i.index): v for i, v in meta.storage_data.items()
    }
    (directory / ".metadata").write_bytes(pickle.dumps(meta))


def test_planted_renamed_key_refused(ckpt, tmp_path, capsys, hf_dir):
    _rewrite_keys(ckpt, lambda k: k.replace("layers.post_mlp_layernorm", "layers.post_feedforward_layernorm"))
    assert TorchDistReader.open(ckpt).tensors  # still a readable torch_dist checkpoint
    err = refused(
        bridge_to_hf(ckpt, tmp_path / "o", hf_dir / "config.json"),
        capsys,
    )
    assert str(ckpt) in err
    assert "decoder.layers.0.post_mlp_layernorm.weight" in err  # missing
    assert "decoder.layers.0.post_feedforward_layernorm.weight" in err  # unexpected


def test_planted_missing_chunk_refused(ckpt, tmp_path, capsys, hf_dir):
    """The 'up' half of layer 2's fc1 dropped from .metadata: refused (named), never read as garbage."""
    with open(ckpt / ".metadata", "rb") as f:
        meta = _AllowListUnpickler(f).load()
    md = meta.state_dict_metadata["decoder.layers.mlp.linear_fc1.weight"]
    md.chunks = [c for c in md.chunks if tuple(c.offsets) != (2, 128, 0)]
    assert len(md.chunks) == 15
    (ckpt / ".metadata").write_bytes(pickle.dumps(meta))
    err = refused(
        bridge_to_hf(ckpt, tmp_path / "o", hf_dir / "config.json"),
        capsys,
    )
    assert "'decoder.layers.mlp.linear_fc1.weight' cover 8192 of the 16384 elements of its row 2" in err


def test_torch_dist_without_bridge_keys_refused(ckpt, tmp_path, capsys, hf_dir):
    _rewrite_keys(
        ckpt,
        lambda k: k.replace("self_attention_sliding.", "sa_s.").replace("self_attention_global.", "sa_g."),
    )
    err = refused(
        ["convert", "relayout", "--mcore", str(ckpt), "--out", str(tmp_path / "o"), "--to", "ours"]
        + ["--hf-config", str(hf_dir / "config.json")],
        capsys,
    )
    assert str(ckpt) in err and "without Megatron-Bridge 0.6.2's Gemma 4 keys" in err


def test_moe_refused(tmp_path, capsys):
    """No MoE Bridge model can be built on CPU (Transformer Engine), so its torch_dist layout is unchecked:
    refused, naming the directory and the ways out."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(preset_config_dict("tiny-26b-a4b")))
    err = refused(
        ["convert", "relayout", "--mcore", str(FIXTURE), "--out", str(tmp_path / "o"), "--to", "ours"]
        + ["--hf-config", str(cfg)],
        capsys,
    )
    assert f"{FIXTURE}: a torch_dist checkpoint of a MoE model" in err
    assert "export it with Megatron-Bridge to HF" in err and "state_dict()" in err


def test_wrong_config_refused(tmp_path, capsys):
    """A config with another sliding/full split: the layer axes do not fit (named), no misread."""
    raw = preset_config_dict(PRESET)
    raw["layer_types"] = ["sliding_attention"] * 4 + ["full_attention"] * 4
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(raw))
    err = refused(
        bridge_to_hf(FIXTURE, tmp_path / "o", cfg),
        capsys,
    )
    assert "layer-stacked key needs a leading axis of 4" in err


# ---- live ---------------------------------------------------------------------------------------------------


#: Live runs: sha256[:16] over "key [shape] dtype" lines of the tensor keys Megatron-Bridge 0.6.2 saved, and
#: their number. tiny-e2b (985 KiB; not committed) has one key per layer (its layers differ in shape), e.g.
#: ``decoder.layers.0.self_attention_sliding.linear_qkv.weight``, plus ``per_layer_embedding.weight``,
#: ``per_layer_model_proj.weight``, ``per_layer_proj_norm.weight``.
LIVE_KEYS = {"tiny-31b": (17, None), "tiny-e2b": (145, "3e07c9731c6d78be")}


def _keys_digest(reader: TorchDistReader) -> str:
    h = hashlib.sha256()
    for k in reader.tensors:
        h.update(f"{k} {list(reader.shape(k))} {reader.dtype(k)}\n".encode())
    return h.hexdigest()[:16]


@pytest.mark.skipif(
    not os.environ.get("GEMMA4_MEGATRON_BRIDGE_PYTHON"),
    reason="set GEMMA4_MEGATRON_BRIDGE_PYTHON to a Python with megatron-bridge 0.6.2 (see the module doc)",
)
@pytest.mark.parametrize("name", sorted(LIVE_KEYS))
def test_live_bridge_torch_dist(tmp_path, capsys, name):
    """Rerun SAVE_SCRIPT: tiny-31b gives the fixture's keys and values; every preset's checkpoint converts to
    exactly the state dict of the Megatron-Bridge model that saved it and, through the CLI, to the HF weights
    it was made from."""
    from safetensors.torch import load_file

    from harness.reference import build_reference_model

    raw = preset_config_dict(name)
    if (
        raw.get("num_global_key_value_heads") is None
    ):  # its importer crashes on null (test_megatron_bridge.py)
        raw["num_global_key_value_heads"] = raw["num_key_value_heads"]
    model = build_reference_model(hf_text_config_from_any(raw), torch.float32, seed=1).to(torch.bfloat16)
    hf = text_relative(model.state_dict())
    hf.pop("lm_head.weight", None)
    hf_path = tmp_path / "hf"
    hf_path.mkdir()
    save_file({"model." + k: v.contiguous() for k, v in hf.items()}, hf_path / "model.safetensors")
    (hf_path / "config.json").write_text(
        json.dumps(raw | {"architectures": ["Gemma4ForCausalLM"], "dtype": "bfloat16"})
    )
    script = tmp_path / "save_td.py"
    script.write_text(SAVE_SCRIPT)
    out = tmp_path / "out" / "ckpt"
    out.parent.mkdir()
    proc = subprocess.run(
        [os.environ["GEMMA4_MEGATRON_BRIDGE_PYTHON"], str(script), str(hf_path), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    live = TorchDistReader.open(out)
    n, digest = LIVE_KEYS[name]
    assert len(live.tensors) == n
    if digest is not None:
        assert _keys_digest(live) == digest
    if name == PRESET:
        fixed = TorchDistReader.open(FIXTURE)
        assert {k: (live.shape(k), live.dtype(k)) for k in live.tensors} == {
            k: (fixed.shape(k), fixed.dtype(k)) for k in fixed.tensors
        }
        assert [k for k in fixed.tensors if not torch.equal(live.read(k), fixed.read(k))] == []
    own = load_file(tmp_path / "out" / "mb_state_dict.safetensors")
    got = mb.open_bridge_checkpoint(out, hf_path / "config.json")
    back = mb.to_bridge(got.ours, got.spec)
    assert sorted(back) == sorted(own)
    assert [k for k in own if not torch.equal(own[k].double(), back[k].double())] == []
    hf_out = tmp_path / "hf_out"
    assert run(bridge_to_hf(out, hf_out, hf_path / "config.json"), capsys)[0] == 0
    assert (
        state_dict_failures(text_relative(stored_tensors(hf_out)), text_relative(stored_tensors(hf_path)))
        == []
    )
