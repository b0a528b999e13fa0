"""Checkpoint builders and checks shared by the conversion tests, the planted-bug tests and the benchmark.

Oracles are the other side's own code: HF transformers builds and saves the checkpoints
(``save_pretrained``) and computes reference logits; the ``safetensors`` library reads files independently
of our reader; Megatron-Core builds the model our checkpoints load into. Each ``*_failures`` function
returns a list of human-readable failures (empty = pass), so a test asserts ``== []`` and a planted-bug
test asserts the same check goes red.
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from gemma4.conversion import mapping


def save_hf_checkpoint(
    directory: Path,
    config: dict[str, Any],
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    conditional_generation: bool = False,
    shards: int = 1,
) -> Path:
    """A ``Gemma4ForCausalLM`` checkpoint saved by transformers (seeded non-trivial weights), optionally
    rewritten as a sharded ``Gemma4ForConditionalGeneration`` checkpoint with a vision tensor."""
    from safetensors.torch import load_file, save_file
    from transformers.utils import logging as hf_logging

    from gemma4.config import hf_text_config_from_any
    from harness.reference import build_reference_model

    hf_logging.disable_progress_bar()
    directory = Path(directory)
    model = build_reference_model(hf_text_config_from_any(config), torch.float32, seed=seed).to(dtype)
    if not conditional_generation and shards == 1:
        model.save_pretrained(directory)
        return directory
    stage = directory.parent / f".{directory.name}.causal"
    model.save_pretrained(stage)
    tensors = load_file(stage / "model.safetensors")
    text = json.loads((stage / "config.json").read_text())
    if conditional_generation:
        tensors = {
            ("model.language_model." + k[len("model.") :] if k.startswith("model.") else k): v
            for k, v in tensors.items()
        }
        tensors["model.vision_tower.patch.weight"] = torch.zeros(2, 2, dtype=dtype)
        text = {
            "model_type": "gemma4",
            "architectures": ["Gemma4ForConditionalGeneration"],
            "text_config": text,
        }
    directory.mkdir(parents=True)
    names = sorted(tensors)
    if shards == 1:
        save_file({k: tensors[k].contiguous() for k in names}, directory / "model.safetensors")
    else:
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: tensors[k].contiguous() for k in part}, directory / fname)
            weight_map.update({k: fname for k in part})
        index = {"metadata": {}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(text))
    for p in stage.iterdir():
        p.unlink()
    stage.rmdir()
    return directory


def stored_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors directory, read with the ``safetensors`` library (the oracle reader)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def text_relative(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the text prefix (``model.language_model.`` or ``model.``); drop vision/audio tensors."""
    out = {}
    for k, v in tensors.items():
        if k.startswith(
            ("model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio.")
        ):
            continue
        for prefix in (mapping.HF_CONDITIONAL_GENERATION_PREFIX, mapping.HF_CAUSAL_LM_PREFIX):
            if k.startswith(prefix):
                k = k[len(prefix) :]
                break
        out[k] = v
    return out


def state_dict_failures(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> list[str]:
    """Same keys, shapes, dtypes and values (bit for bit)."""
    failures = [f"missing {k!r}" for k in sorted(set(want) - set(got))]
    failures += [f"unexpected {k!r}" for k in sorted(set(got) - set(want))]
    for k in sorted(set(want) & set(got)):
        a, b = got[k], want[k]
        if a.dtype != b.dtype:
            failures.append(f"{k!r}: dtype {a.dtype} != {b.dtype}")
        elif a.shape != b.shape:
            failures.append(f"{k!r}: shape {tuple(a.shape)} != {tuple(b.shape)}")
        elif not torch.equal(a, b):
            failures.append(f"{k!r}: values differ")
    return failures


def key_contract_failures(produced: Iterable[str], oracle: Iterable[str]) -> list[str]:
    """Every oracle key produced exactly once, nothing else."""
    produced = list(produced)
    seen: set[str] = set()
    failures = []
    for k in produced:
        if k in seen:
            failures.append(f"{k!r} produced more than once")
        seen.add(k)
    oracle = set(oracle)
    failures += [f"{k!r} never produced" for k in sorted(oracle - seen)]
    failures += [f"{k!r} produced but not an HF tensor" for k in sorted(seen - oracle)]
    return failures


def roundtrip_failures(
    hf_dir: Path, work: Path, tp: int = 1, ep: int = 1, fmt: str = "safetensors"
) -> list[str]:
    """HF -> Megatron -> HF through the public API; the export must equal the source (safetensors oracle)."""
    from gemma4.conversion.convert import hf_to_mcore_dir, mcore_to_hf_dir

    mc, back = Path(work) / f"mcore-{fmt}-tp{tp}-ep{ep}", Path(work) / f"hf-{fmt}-tp{tp}-ep{ep}"
    hf_to_mcore_dir(hf_dir, mc, tp=tp, ep=ep, fmt=fmt)
    mcore_to_hf_dir(mc, back)
    src = text_relative(stored_tensors(hf_dir))
    return state_dict_failures(text_relative(stored_tensors(back)), src)


def megatron_state_from_hf(hf_config: Any, hf_weights: Mapping[str, torch.Tensor], dtype: torch.dtype):
    """A TP=1 Megatron model loaded from relative HF weights through the table (for the streaming checks)."""
    from gemma4.config import text_spec_from_hf
    from gemma4.model.build import build_gemma4_model

    spec = text_spec_from_hf(hf_config)
    model = build_gemma4_model(spec, dtype)
    mapping.load_hf_into_mcore(model, hf_weights, spec)
    return model


def streaming_failures(
    model: torch.nn.Module, hf_full: Mapping[str, torch.Tensor], args: Any, wrappers: str = "module.module."
) -> list[str]:
    """Feed every Megatron parameter and persistent buffer (slime-style global names) to the streaming
    converter; the output must be HF's state dict, every key exactly once, tensor for tensor."""
    from gemma4.slime.weight_sync import ExpertStacker, convert_gemma4_to_hf, resolve_target

    spec, _ = resolve_target(args)
    produced: list[tuple[str, torch.Tensor]] = []
    state = model.state_dict()
    for name, t in state.items():
        produced += convert_gemma4_to_hf(args, wrappers + name, t)
    if spec.tie_word_embeddings:  # pipeline-parallel copies of the tied head must not become lm_head
        produced += convert_gemma4_to_hf(
            args, wrappers + "output_layer.weight", state["embedding.word_embeddings.weight"]
        )
    if mapping._num_experts(spec):  # per-expert slices, each exactly once, restacked into HF's 3-D tensors
        stacker = ExpertStacker(spec.num_experts)
        produced = [pair for n, t in produced for pair in stacker.add(n, t)]
        if stacker.pending:
            return [f"experts never completed: {sorted(stacker.pending)}"]
    failures = key_contract_failures([n for n, _ in produced], hf_full)
    failures += state_dict_failures(dict(produced), hf_full) if not failures else []
    return failures


def slime_args(**kwargs: Any) -> types.SimpleNamespace:
    """The smallest ``args`` the streaming converter accepts."""
    return types.SimpleNamespace(**kwargs)


def logits_failures(hf_dir: Path, mcore_dir: Path, seq_len: int = 12, batch: int = 2) -> list[str]:
    """Our Megatron model loaded from ``mcore_dir`` vs HF loaded from ``hf_dir``, both run in fp64 (the
    checkpoint's values cast up, HF in exact-fp64 mode): logits within the fp64 policy bound
    (``harness.tolerances``), which any mis-mapped tensor exceeds by orders of magnitude."""
    from gemma4.config import hf_text_config_from_any, text_spec_from_hf
    from gemma4.conversion.mcore_io import load_mcore_checkpoint
    from gemma4.conversion.torch_dist import is_torch_dist, load_torch_dist_into_model
    from gemma4.model.build import build_gemma4_model
    from harness.parity import make_inputs
    from harness.reference import build_reference_model
    from harness.tolerances import tolerance_for

    dtype = torch.float64
    cfg = hf_text_config_from_any(Path(hf_dir))
    weights = {k: v.to(dtype) for k, v in text_relative(stored_tensors(hf_dir)).items()}
    if cfg.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    ref = build_reference_model(cfg, dtype, weights=weights)
    spec = text_spec_from_hf(cfg)
    if is_torch_dist(mcore_dir):  # Megatron's own loader, per-layer keys
        ours = build_gemma4_model(spec, dtype, hetereogenous_dist_checkpoint=True)
        load_torch_dist_into_model(ours, mcore_dir)
    else:
        ours = build_gemma4_model(spec, dtype)
        load_mcore_checkpoint(ours, mcore_dir)
    ours.eval()
    ids = make_inputs(spec, batch, seq_len, seed=0)
    with torch.no_grad():
        want = ref(input_ids=ids, use_cache=False).logits
        got = ours(ids)
    bound = tolerance_for(dtype).logits_max_abs
    diff = (got - want).abs().max().item()
    return [] if diff <= bound else [f"logits max |diff| {diff:.3e} > {bound:.0e} (fp64 policy)"]
