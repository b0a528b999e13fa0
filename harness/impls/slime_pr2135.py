"""slime PR #2135's Gemma 4 (``shared/reference/slime-pr2135``) run as written on a CPU, against HF.

Its own code builds the model: ``gemma4_provider.model_provider`` (``GPTModel`` + its hooks: embedding
scale, softcap, dual RoPE, layer scalars read from the checkpoint's safetensors) with the spec
``get_gemma4_spec`` (its layer, attention, ``SDPACoreAttention``, router, MoE layer) and its config
overrides; weights are mapped by its own mbridge bridge (``Gemma4Bridge``: names and the QKV / K=V /
expert packing). Only the run-time environment it cannot have on a CPU is swapped, by the generic pieces
in :mod:`harness.compat`:

* Transformer Engine -> local Megatron modules: the spec is passed through
  :func:`harness.compat.te_local.localize_spec` (``args.spec`` names :func:`localized_gemma4_spec`, which
  calls theirs), and the ``TENorm`` their modules call directly is swapped by ``localized_globals``;
  Megatron's block-level ``LayerNormImpl`` (``TENorm`` when TE is installed) likewise;
* ``flash_attn`` -> :mod:`harness.compat.flash_cpu` (only their packed sliding-layer path calls it);
* ``megatron.training`` -> the real one from ``shared/reference/megatron-lm`` (:mod:`harness.compat.
  megatron_training`), args parsed by Megatron's own parser from the flags of their
  ``scripts/models/gemma4-*.sh`` at tiny sizes;
* transformers >= 5.15 config -> :class:`harness.compat.old_schema.OldSchemaView` (their code reads
  ``global_head_dim`` etc.): ``_load_hf_text_config`` (their AutoConfig loader) is wrapped to return the view;
* ``mbridge`` (not installed; the bridge subclasses mbridge's ``Gemma3Bridge``): a minimal base class and
  ``register_model`` decorator, and the mbridge ``Gemma3TransformerConfig`` from the reference copy.
  The bridge's own name mapping and ``_weight_to_mcore_format`` do the work; the dispatch by name
  (direct / attention / MLP / other) that mbridge's ``Bridge`` does is re-done here (:func:`_bridge_hf_names`).

:class:`SlimePR2135` is the plugin the harness runs (``--impl slime-pr2135``, ``slime-pr2135+fixes``,
``slime-pr2135+FIX[,FIX]``: :func:`harness.parity.run.run_parity`, the same pipeline and judge as our model).
:func:`compare` is a lighter per-layer comparison kept for exploration.

:data:`FIXES` holds the minimal fixes for what the harness found (see ``FINDINGS``), each a function that
monkeypatches their code from outside for the duration of a ``with`` block; nothing in the reference copy is
edited.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import tempfile
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.compat import flash_cpu, te_local
from harness.compat.megatron_training import megatron_training, parse_megatron_args
from harness.compat.old_schema import OldSchemaView

NAME = "slime-pr2135"
_MODULE = "slime_plugins.models.gemma4"
_PROVIDER = "slime_plugins.models.gemma4_provider"


def slime_dir() -> Path:
    """``shared/reference/slime-pr2135`` (raises ``ReferenceDataUnavailable`` if missing)."""
    from harness.reference_data import reference_path

    return reference_path("slime-pr2135")


# ---- environment stand-ins ------------------------------------------------------------------------------


class _Gemma3BridgeBase:
    """Stand-in for mbridge's ``Gemma3Bridge`` base: holds ``hf_config`` (what ``Gemma4Bridge`` reads)."""

    def __init__(self, hf_config: Any, *args: Any, **kwargs: Any):
        self.hf_config = hf_config


def _mbridge_modules(root: Path) -> dict[str, types.ModuleType]:
    mb = types.ModuleType("mbridge")
    mb.__path__ = [str(root / "mbridge-89eb108" / "mbridge")]
    core = types.ModuleType("mbridge.core")
    core.register_model = lambda names: lambda cls: cls
    models = types.ModuleType("mbridge.models")
    models.__path__ = [str(root / "mbridge-89eb108" / "mbridge" / "models")]
    models.Gemma3Bridge = _Gemma3BridgeBase
    mb.core, mb.models = core, models
    for m in (mb, core, models):
        m.__harness_stand_in__ = True
    return {"mbridge": mb, "mbridge.core": core, "mbridge.models": models}


def localized_gemma4_spec(args: Any, config: Any, vp_stage: Any = None) -> Any:
    """Their ``get_gemma4_spec`` (the ``--spec`` entry), with TE replaced by local modules."""
    theirs = sys.modules[_MODULE].get_gemma4_spec
    return te_local.localize_spec(theirs(args, config, vp_stage))


@contextlib.contextmanager
def slime_environment(args: Any | None = None) -> Iterator[dict[str, types.ModuleType]]:
    """Their modules importable and runnable on a CPU (module doc); yields ``{"gemma4", "provider",
    "bridge"}``. ``sys.modules`` / ``sys.path`` are restored on exit."""
    root = slime_dir()
    before = set(sys.modules)
    old_path = list(sys.path)
    stack = contextlib.ExitStack()
    try:
        sys.path.insert(0, str(root))
        sys.modules.update(_mbridge_modules(root))
        sys.modules["flash_attn"] = flash_cpu.flash_attn_module()
        stack.enter_context(megatron_training(args))
        import importlib

        import megatron.core.transformer.transformer_block as tb

        gemma4 = importlib.import_module(_MODULE)
        provider = importlib.import_module(_PROVIDER)
        # slime_plugins/mbridge/__init__.py imports nine other models' bridges (not in the copy): a bare
        # package over the directory, so only gemma4.py is imported.
        bare = types.ModuleType("slime_plugins.mbridge")
        bare.__path__ = [str(root / "slime_plugins" / "mbridge")]
        sys.modules["slime_plugins.mbridge"] = bare
        bridge = importlib.import_module("slime_plugins.mbridge.gemma4")
        stack.enter_context(te_local.localized_globals(gemma4))
        old_ln = tb.LayerNormImpl
        tb.LayerNormImpl = te_local.LocalNorm
        stack.callback(setattr, tb, "LayerNormImpl", old_ln)
        # transformers >= 5.15 config -> the pre-5.15 attribute names their code reads.
        loader = gemma4._load_hf_text_config

        @functools.lru_cache(maxsize=4)
        def _old_schema_loader(path):
            return OldSchemaView(loader(path))

        for mod in (gemma4, provider):
            stack.enter_context(_patched(mod, "_load_hf_text_config", _old_schema_loader))
        yield {"gemma4": gemma4, "provider": provider, "bridge": bridge}
    finally:
        stack.close()
        for k in set(sys.modules) - before:
            if k.split(".")[0] in ("slime_plugins", "slime", "mbridge", "flash_attn"):
                sys.modules.pop(k, None)
        sys.path[:] = old_path


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# ---- config / checkpoint --------------------------------------------------------------------------------


def hf_text_config(config: dict[str, Any]) -> Any:
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(**config)


def _argv(config: dict[str, Any]) -> list[str]:
    """Their ``scripts/models/gemma4-*.sh`` MODEL_ARGS at the preset's sizes (+ the run scripts' dropout 0)."""
    argv = [
        "--num-layers", str(config["num_hidden_layers"]),
        "--hidden-size", str(config["hidden_size"]),
        "--ffn-hidden-size", str(config["intermediate_size"]),
        "--num-attention-heads", str(config["num_attention_heads"]),
        "--group-query-attention",
        "--num-query-groups", str(config["num_key_value_heads"]),
        "--kv-channels", str(config["head_dim"]),
        "--use-rotary-position-embeddings",
        "--disable-bias-linear",
        "--normalization", "RMSNorm",
        "--norm-epsilon", str(config.get("rms_norm_eps", 1e-6)),
        "--rotary-base", str(int(config["rope_parameters"]["sliding_attention"]["rope_theta"])),
        "--rotary-percent", "1.0",
        "--vocab-size", str(config["vocab_size"]),
        "--qk-layernorm",
        "--max-position-embeddings", str(config.get("max_position_embeddings", 4096)),
        "--attention-dropout", "0.0",
        "--hidden-dropout", "0.0",
        # TE swap: fused RoPE is a TE kernel (TransformerConfig refuses it without TE); their
        # _apply_core_config sets apply_rope_fusion = False anyway, after the config is built.
        "--no-rope-fusion",
        # CPU: no apex/CUDA fused weight-gradient kernel; parameters created on the CPU.
        "--no-gradient-accumulation-fusion",
        "--use-cpu-initialization",
    ]  # fmt: skip
    if config.get("enable_moe_block"):
        argv += [
            "--num-experts", str(config["num_experts"]),
            "--moe-ffn-hidden-size", str(config["moe_intermediate_size"]),
            "--moe-router-topk", str(config["top_k_experts"]),
            "--moe-router-dtype", "fp32",
            "--moe-router-score-function", "softmax",
            "--moe-router-load-balancing-type", "none",
            "--moe-aux-loss-coeff", "0.0",
            # CPU swap: the alltoall dispatcher creates a torch.cuda.Stream; at EP = 1 allgather is equivalent.
            "--moe-token-dispatcher-type", "allgather",
            "--moe-grouped-gemm",
        ]  # fmt: skip
    return argv


def write_checkpoint(
    directory: Path, config: dict[str, Any], hf_state: dict[str, torch.Tensor] | None
) -> None:
    """``config.json`` (as transformers 5.24 writes it) + ``model.safetensors`` + index, ``model.language_model.*``
    names. Their provider reads ``layer_scalar`` from it; without ``hf_state`` the scalars are 1.0."""
    from safetensors.torch import save_file

    hf_text_config(config).save_pretrained(directory)
    if hf_state is None:
        hf_state = {f"layers.{i}.layer_scalar": torch.ones(1) for i in range(config["num_hidden_layers"])}
    tensors = {f"model.language_model.{k}": v.detach().contiguous().clone() for k, v in hf_state.items()}
    save_file(tensors, str(directory / "model.safetensors"))
    index = {"metadata": {}, "weight_map": dict.fromkeys(tensors, "model.safetensors")}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


# ---- build / load / forward -----------------------------------------------------------------------------


@dataclass
class SlimeModel:
    """A built model and what it needs to run: the environment stays entered until :meth:`close`."""

    model: torch.nn.Module
    config: dict[str, Any]
    dtype: torch.dtype
    env: dict[str, types.ModuleType]
    args: Any
    _stack: contextlib.ExitStack = field(repr=False)
    _tmp: Any = field(repr=False)

    def close(self) -> None:
        self._stack.close()
        self._tmp.cleanup()

    def __enter__(self) -> SlimeModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def build(
    config: dict[str, Any],
    dtype: torch.dtype,
    hf_state: dict[str, torch.Tensor] | None = None,
    *,
    fixes: tuple[str, ...] = (),
) -> SlimeModel:
    """Build their model for the HF config dict ``config`` through their provider and spec, in ``dtype``.

    ``hf_state`` (HF names relative to ``model.``) is written to the checkpoint their provider reads
    layer scalars from; load the weights with :func:`load_hf_weights`. ``fixes`` names entries of
    :data:`FIXES` applied for the model's lifetime."""
    from gemma4.runtime import init_single_process

    init_single_process()
    tmp = tempfile.TemporaryDirectory(prefix="slime-pr2135-")
    ckpt = Path(tmp.name)
    write_checkpoint(ckpt, config, hf_state)
    stack = contextlib.ExitStack()
    try:
        with megatron_training():
            args = parse_megatron_args(
                _argv(config),
                params_dtype=dtype,
                extra={"hf_checkpoint": str(ckpt), "spec": [__name__, "localized_gemma4_spec"]},
            )
        args.position_embedding_type = (
            "rope"  # validate_args' translation of --use-rotary-position-embeddings
        )
        env = stack.enter_context(slime_environment(args))
        for name in fixes:
            stack.enter_context(FIXES[name](env))
        torch.manual_seed(0)
        model = env["provider"].model_provider(pre_process=True, post_process=True)
        model = model.to(dtype).eval()
    except BaseException:
        stack.close()
        tmp.cleanup()
        raise
    return SlimeModel(model, config, dtype, env, args, stack, tmp)


def _te_name(local: str) -> str:
    """Local-module state-dict key -> the TE key their bridge maps (inverse of ``te_to_local_param_name``)."""
    import re

    m = re.match(r"^(.*\.experts)\.local_experts\.(\d+)\.linear_fc([12])\.weight$", local)
    if m:
        return f"{m.group(1)}.linear_fc{m.group(3)}.weight{m.group(2)}"
    if local.endswith(".input_layernorm.weight"):
        return local.replace(".input_layernorm.weight", ".self_attention.linear_qkv.layer_norm_weight")
    return local


def _bridge_hf_names(bridge: Any, te_name: str) -> list[str]:
    """mbridge ``Bridge``'s dispatch of a Megatron name to the bridge's mapping methods."""
    if te_name in bridge._DIRECT_MAPPING:
        return [bridge._DIRECT_MAPPING[te_name]]
    if "self_attention" in te_name:
        return bridge._weight_name_mapping_attention(te_name)
    if "mlp" in te_name:
        return bridge._weight_name_mapping_mlp(te_name)
    return bridge._weight_name_mapping_other(te_name)


def load_hf_weights(sm: SlimeModel, hf_state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Load HF-named weights (relative to ``model.``) through their bridge; strict both ways. Returns the
    mapping used (Megatron name -> HF names)."""
    from gemma4.errors import InvalidInputError

    bridge = sm.env["bridge"].Gemma4Bridge(OldSchemaView(hf_text_config(sm.config)))
    prefix = "model.language_model."
    used: set[str] = set()
    mapping = {}
    own = sm.model.state_dict()
    with torch.no_grad():
        for local, tensor in own.items():
            if local.endswith("_extra_state"):
                continue
            te = _te_name(local)
            hf_names = _bridge_hf_names(bridge, te)
            missing = [n for n in hf_names if n[len(prefix) :] not in hf_state]
            if missing:
                raise InvalidInputError(f"{local}: HF tensors {missing} are not in the state dict")
            hf_weights = [hf_state[n[len(prefix) :]].to(torch.float64) for n in hf_names]
            value = bridge._weight_to_mcore_format(te, hf_weights)
            if tuple(value.shape) != tuple(tensor.shape):
                raise InvalidInputError(
                    f"{local}: bridge gives shape {tuple(value.shape)} from {hf_names}, model has {tuple(tensor.shape)}"
                )
            tensor.copy_(value.to(tensor.dtype))
            used.update(n[len(prefix) :] for n in hf_names)
            mapping[local] = hf_names
    unused = sorted(set(hf_state) - used)
    if unused:
        raise InvalidInputError(f"HF tensors not loaded by the bridge: {unused}")
    return mapping


def forward(
    sm: SlimeModel, ids: torch.Tensor, *, packed: list[int] | None = None, capture: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits ``[b, s, V]`` for ``ids`` ``[b, s]`` (``packed``: one row holding documents of these lengths,
    run as THD with ``cu_seqlens``), and with ``capture`` each decoder layer's output ``[b, s, h]``."""
    from megatron.core.packed_seq_params import PackedSeqParams

    layers = sm.model.decoder.layers
    acts: list[torch.Tensor] = []
    hooks = []
    if capture:
        for layer in layers:
            hooks.append(
                layer.register_forward_hook(
                    lambda m, i, o: acts.append(
                        (o[0] if isinstance(o, tuple) else o).transpose(0, 1).detach()
                    )
                )
            )
    b, s = ids.shape
    psp = None
    if packed is None:
        position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    else:
        assert b == 1 and sum(packed) == s, "packed: one row whose length is the sum of the documents"
        cu = torch.tensor([0, *torch.tensor(packed).cumsum(0).tolist()], dtype=torch.int32)
        position_ids = torch.cat([torch.arange(n) for n in packed]).unsqueeze(0)
        psp = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            max_seqlen_q=max(packed),
            max_seqlen_kv=max(packed),
        )
    try:
        with torch.no_grad():
            logits = sm.model(
                input_ids=ids, position_ids=position_ids, attention_mask=None, packed_seq_params=psp
            )
    finally:
        for h in hooks:
            h.remove()
    return logits, acts


# ---- HF side --------------------------------------------------------------------------------------------


def hf_reference(config: dict[str, Any], dtype: torch.dtype, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """The harness's HF reference (exact fp64 in fp64) and its HF-named weights."""
    from harness.reference import build_reference_model, hf_text_state_dict

    ref = build_reference_model(hf_text_config(config), dtype, seed=seed)
    return ref, hf_text_state_dict(ref)


def hf_forward(ref: torch.nn.Module, ids: torch.Tensor, *, packed: list[int] | None = None):
    """HF logits and per-layer outputs (hooks on the decoder layers); ``packed``: each document alone."""
    if packed is not None:
        outs = [hf_forward(ref, part) for part in ids.split(packed, dim=1)]
        return torch.cat([o[0] for o in outs], 1), [
            torch.cat([o[1][i] for o in outs], 1) for i in range(len(outs[0][1]))
        ]
    acts: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(
            lambda m, i, o: acts.append((o[0] if isinstance(o, tuple) else o).detach())
        )
        for layer in ref.model.layers
    ]
    try:
        with torch.no_grad():
            logits = ref(input_ids=ids).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, acts


@dataclass
class Comparison:
    logits_max_abs: float
    per_layer: list[float]
    layer_types: list[str]

    @property
    def first_divergence(self) -> int | None:
        for i, d in enumerate(self.per_layer):
            if d > 1e-9:
                return i
        return None


def compare(
    preset_or_config: str | dict[str, Any],
    dtype: torch.dtype = torch.float64,
    *,
    seq_len: int = 24,
    batch: int = 2,
    packed: list[int] | None = None,
    fixes: tuple[str, ...] = (),
    seed: int = 0,
) -> Comparison:
    """Build both sides from the same seeded weights, run ``seq_len`` tokens (or ``packed`` documents), and
    return max |Δ| of the logits and of each layer's output."""
    from harness.presets import preset_config_dict

    config = preset_config_dict(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
    ref, hf_state = hf_reference(config, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    if packed is not None:
        ids = torch.randint(3, config["vocab_size"], (1, sum(packed)), generator=gen)
    else:
        ids = torch.randint(3, config["vocab_size"], (batch, seq_len), generator=gen)
    with build(config, dtype, hf_state, fixes=fixes) as sm:
        load_hf_weights(sm, hf_state)
        logits, acts = forward(sm, ids, packed=packed, capture=True)
    ref_logits, ref_acts = hf_forward(ref, ids, packed=packed)
    per_layer = [
        float((a.to(torch.float64) - r.to(torch.float64)).abs().max()) for a, r in zip(acts, ref_acts)
    ]
    return Comparison(
        float((logits.to(torch.float64) - ref_logits.to(torch.float64)).abs().max()),
        per_layer,
        list(config["layer_types"]),
    )


# ---- fixes ----------------------------------------------------------------------------------------------

FIXES: dict[str, Callable[[dict[str, types.ModuleType]], contextlib.AbstractContextManager]] = {}


@contextlib.contextmanager
def fix_layer_types(env: dict[str, types.ModuleType]) -> Iterator[None]:
    """Finding 1: a layer's type from ``layer_types[i]`` instead of ``(i+1) % sliding_window_pattern``.

    ``Gemma4TransformerLayer.__init__`` (gemma4.py:313) decides ``is_sliding`` from
    ``sliding_window_pattern``, which ``_apply_core_config`` (gemma4.py:1092-1096) infers as the 1-based
    position of the *first* full layer: any schedule that is not strictly periodic (consecutive full layers,
    tiny-31b's ``S S S F S S F F``, tiny-26b-a4b's ``S F S S S F``) builds full layers as sliding and vice
    versa. The fix records ``layer_types`` on the config and, while each layer is built, sets the pattern
    so the modulo gives its true type (``n`` for a full layer numbered ``n``, ``n + 1`` for a sliding one).
    """
    gemma4 = env["gemma4"]
    layer_cls = gemma4.Gemma4TransformerLayer
    orig_apply, orig_init = gemma4._apply_core_config, layer_cls.__init__

    def _apply_core_config(config, hf_text):
        orig_apply(config, hf_text)
        config.harness_layer_types = list(hf_text.layer_types)

    def __init__(self, config, submodules, layer_number=1, hidden_dropout=None, **kwargs):
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        n = layer_number + get_transformer_layer_offset(config)
        full = config.harness_layer_types[n - 1] == "full_attention"
        # Set on the shared config only while this layer is built: sliding layers keep the shared config
        # object (their code relies on it, see fix_global_rope), global layers copy it.
        saved = config.sliding_window_pattern
        config.sliding_window_pattern = n if full else n + 1
        try:
            orig_init(self, config, submodules, layer_number, hidden_dropout, **kwargs)
        finally:
            config.sliding_window_pattern = saved

    with (
        _patched(gemma4, "_apply_core_config", _apply_core_config),
        _patched(layer_cls, "__init__", __init__),
    ):
        yield


FIXES["layer_types"] = fix_layer_types


@contextlib.contextmanager
def fix_global_rope(env: dict[str, types.ModuleType]) -> Iterator[None]:
    """Finding 2: global (full) layers never see ``dual_rope_global_dim``, so they get the wrong RoPE.

    ``_install_hooks`` sets ``config.dual_rope_global_dim`` (gemma4_provider.py:210) *after* the layers are
    built, on the shared config; global layers were built on a ``dc_replace`` copy (gemma4.py:322-330) and
    read ``getattr(self.config, "dual_rope_global_dim", 0)`` = 0 (gemma4.py:462). Their forward then takes
    the "single RoPE" branch (gemma4.py:476-482) and keeps the first ``global_head_dim * 0.25`` entries of
    the concatenated (global, local) embedding: Megatron rotates only the first quarter of each head as
    pairs (i, i + d/8) instead of HF's proportional pairs (i, i + d/2). Fix: give every layer's config the
    attribute once the hooks are installed.
    """
    provider = env["provider"]
    orig = provider._install_hooks

    def _install_hooks(model, args, config, pre_process, post_process):
        orig(model, args, config, pre_process, post_process)
        inner = model.module if hasattr(model, "module") else model
        dim = getattr(config, "dual_rope_global_dim", None)
        if dim is not None:
            for layer in inner.decoder.layers:
                layer.config.dual_rope_global_dim = dim

    with _patched(provider, "_install_hooks", _install_hooks):
        yield


FIXES["global_rope"] = fix_global_rope


@contextlib.contextmanager
def fix_sliding_window(env: dict[str, types.ModuleType]) -> Iterator[None]:
    """Finding 3: on unpacked batches (``[s, b, h, d]``, and THD without ``cu_seqlens``) sliding layers ignore
    the window.

    ``SDPACoreAttention.forward`` honours ``sliding_window`` only on the packed THD paths (flash
    ``window_size=(W-1, 0)``, or the CP mask); its BSHD branch (gemma4.py:839-850) and its THD branch without
    ``cu_seqlens`` (gemma4.py:822-836) call ``scaled_dot_product_attention(is_causal=True)``: every sliding
    layer attends to the whole causal past once a sequence is longer than the window. Fix: on those
    branches, a sliding layer gets HF's mask (key j visible to query i iff 0 <= i - j < W).
    """
    import torch.nn.functional as F

    cls = env["gemma4"].SDPACoreAttention
    orig = cls.forward

    def forward(
        self, query, key, value, attention_mask=None, attn_mask_type=None, packed_seq_params=None, **kw
    ):
        sw = getattr(self.config, "sliding_window", None)
        cp = getattr(self.config, "context_parallel_size", 1) or 1
        thd_packed = query.dim() == 3 and (packed_seq_params is not None or cp > 1)
        if not self._is_sliding or not sw or thd_packed:
            return orig(self, query, key, value, attention_mask, attn_mask_type, packed_seq_params, **kw)
        if query.dim() == 3:
            q, k, v = (t.unsqueeze(0).transpose(1, 2) for t in (query, key, value))
        else:
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        s = q.shape[2]
        i = torch.arange(s)[:, None]
        j = torch.arange(s)[None, :]
        mask = (j <= i) & (j > i - int(sw))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            scale=self._resolve_scale(q.shape[-1]),
            enable_gqa=q.shape[1] != k.shape[1],
        )
        if query.dim() == 3:
            return out.transpose(1, 2).reshape(query.shape[0], -1)
        return out.permute(2, 0, 1, 3).reshape(out.size(2), out.size(0), -1)

    with _patched(cls, "forward", forward):
        yield


FIXES["sliding_window"] = fix_sliding_window


@contextlib.contextmanager
def fix_fp64_islands(env: dict[str, types.ModuleType]) -> Iterator[None]:
    """Precision class (not a bug): fp32 islands cap an fp64 run near 1e-7.

    ``VNorm.forward`` (gemma4.py:73-75, also the router's norm) computes in fp32 (as HF's ``Gemma4RMSNorm``
    does), and both RoPE tables are built from fp32 ``inv_freq`` (Megatron's ``RotaryEmbedding``, and their
    global ``inv_freq`` at gemma4_provider.py:186-188). Against the harness's exact-fp64 reference this is
    ~2e-7 per layer; the implementation's declared precision is therefore "fp32 islands" (it cannot meet an
    fp64 1e-9 gate). Fix (to show the rest is exact): VNorm in the input dtype, both ``inv_freq`` in fp64.
    """
    gemma4, provider = env["gemma4"], env["provider"]

    def vnorm_forward(self, x):
        return x * torch.pow(x.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)

    orig_hooks = provider._install_hooks

    def _install_hooks(model, args, config, pre_process, post_process):
        orig_hooks(model, args, config, pre_process, post_process)
        inner = model.module if hasattr(model, "module") else model
        rope = inner.rotary_pos_emb
        for r, dim, live in ((rope.local_rope, None, None), (rope.global_rope, rope.global_dim, None)):
            n = r.inv_freq.numel()
            d = dim or 2 * n
            base = float(r.rotary_base) if hasattr(r, "rotary_base") else None
            if dim is None:
                base = float(args.rotary_base)
                inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
            else:
                hf = sys.modules[_MODULE]._load_hf_text_config(args.hf_checkpoint)
                full = hf.rope_parameters["full_attention"]
                live = int(full.get("partial_rotary_factor", 0.25) * d // 2)
                inv = torch.zeros(n, dtype=torch.float64)
                inv[:live] = 1.0 / full["rope_theta"] ** (
                    torch.arange(0, 2 * live, 2, dtype=torch.float64) / d
                )
            r.inv_freq = inv

    with (
        _patched(gemma4.VNorm, "forward", vnorm_forward),
        _patched(provider, "_install_hooks", _install_hooks),
    ):
        yield


FIXES["fp64_islands"] = fix_fp64_islands


# ---- the implementation under test (harness/parity/impl.py) ---------------------------------------------

ALL_FIXES: tuple[str, ...] = ("layer_types", "global_rope", "sliding_window", "fp64_islands")


def parse_fixes(text: str) -> tuple[str, ...]:
    """``fixes`` (every one) or a comma-separated list of :data:`FIXES` names; unknown names raise."""
    from gemma4.errors import InvalidInputError

    if text == "fixes":
        return ALL_FIXES
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in FIXES]
    if unknown or not names:
        raise InvalidInputError(
            f"{NAME}+{text}: unknown fix {unknown[0] if unknown else text!r}; "
            f"fixes: 'fixes' (all) or a comma-separated subset of {', '.join(FIXES)}"
        )
    return tuple(n for n in ALL_FIXES if n in names)


@dataclass(frozen=True)
class SlimePR2135:
    """slime PR #2135's Gemma 4 as an :class:`~harness.parity.impl.ImplementationUnderTest`.

    ``fixes`` names entries of :data:`FIXES` applied from outside (``()``: their code as written). Declared
    precision ``fp32-islands`` (their VNorm and RoPE tables compute in fp32 inside an fp64 run, see
    :func:`fix_fp64_islands`) unless the ``fp64_islands`` fix is applied, then ``reordered`` (their own GEMM
    packing and attention kernels). ``fp64_islands`` is a precision fix for fp64 runs only: in fp32 / bf16
    runs it is not applied (their fp32 norm is what HF does there).

    Runs the single process (TP = CP = EP = 1), plain and packed (THD with ``cu_seqlens``); forward only.
    Activations are captured at the embedding, each layer's attention / dense MLP / routed experts / output,
    the final norm and the logits: every point of :func:`harness.parity.capture.capture_order`.
    """

    fixes: tuple[str, ...] = ()
    hf_config: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        if not self.fixes:
            return NAME
        if set(self.fixes) == set(ALL_FIXES):
            return f"{NAME}+fixes"
        return f"{NAME}+{','.join(self.fixes)}"

    @property
    def precision(self) -> str:
        return "reordered" if "fp64_islands" in self.fixes else "fp32-islands"

    def for_source(self, source: Any) -> SlimePR2135:
        """This implementation bound to the HF config of ``source`` (their provider reads a ``config.json``)."""
        import dataclasses

        return dataclasses.replace(self, hf_config=source.hf_config.to_dict())

    def supports(self, spec: Any) -> str | None:
        from harness.reference_data import reference_path

        slime_dir()  # no reference copy: ReferenceDataUnavailable (exit 2, says how to provide it)
        reference_path("megatron-lm")
        if spec.ple_dim:
            return (
                "per-layer embeddings (E-series, hidden_size_per_layer_input) are not implemented in slime "
                "#2135 (_assert_hf_features_supported, gemma4.py:1035)"
            )
        if any(spec.kv_sharing_reuse):
            return (
                "KV sharing (E-series, num_kv_shared_layers) is not implemented in slime #2135 "
                "(_assert_hf_features_supported, gemma4.py:1041)"
            )
        return None

    def supports_run(self, layout: Any, grads: bool) -> str | None:
        """What this plugin cannot run besides the config: sharded layouts and gradients."""
        if layout.world_size > 1:
            return (
                f"layout {layout.name} (TP/CP/EP > 1): the plugin loads weights single-process only "
                "(sharded loading through their bridge is not written)"
            )
        if grads:
            return "--grads: mapping their parameter gradients back to HF names is not written"
        return None

    def run(self, rank, world, spec, dtype, full_weights, seq, layout, ref_grads):
        from gemma4.conversion.mapping import mcore_to_hf
        from gemma4.errors import InvalidInputError
        from harness.parity.impl import ImplementationBroken, RankResult

        why = self.supports_run(layout, ref_grads is not None)
        if why or world != 1:
            raise InvalidInputError(f"{self.name} cannot run this: {why or 'more than one rank'}")
        if self.hf_config is None:
            raise InvalidInputError(f"{self.name}: needs the HF config (use .for_source(source))")
        config = dict(self.hf_config)
        hf_state = mcore_to_hf(full_weights, spec)
        fixes = tuple(f for f in self.fixes if f != "fp64_islands" or dtype == torch.float64)
        lengths = None
        if layout.packed:
            cu = seq.cu_padded.tolist()
            lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
        with build(config, dtype, hf_state, fixes=fixes) as sm:
            try:
                load_hf_weights(sm, hf_state)
            except InvalidInputError as exc:  # their model does not fit the HF weights: their defect
                import re

                m = re.match(r"decoder\.layers\.(\d+)\.(self_attention|mlp)", str(exc))
                point = (
                    f"layer.{m.group(1)}.{'attention' if m.group(2) == 'self_attention' else 'mlp'}"
                    if m
                    else None
                )
                raise ImplementationBroken(f"its weights do not fit its model: {exc}", point) from None
            acts: dict[str, torch.Tensor] = {}
            with _capture(sm.model, acts):
                logits, _ = forward(sm, seq.ids, packed=lengths)
        return RankResult(0, 0, 0, 0, acts, logits.detach())


@contextlib.contextmanager
def _capture(model: torch.nn.Module, store: dict[str, torch.Tensor]) -> Iterator[None]:
    """Their activations at the harness's capture points (``[s, b, h]`` -> ``[b, s, h]``): the embedding
    (what layer 0 receives, after their scale hook), each layer's attention output (before its post-attention
    norm, like HF's ``self_attn``), dense MLP output (``mlp``, or ``dense_mlp`` on MoE layers), routed experts
    after ``post_feedforward_layernorm_2``, the layer's output, and the final norm."""

    def put(key: str, t: Any) -> None:
        t = t[0] if isinstance(t, tuple) else t
        store[key] = t.detach().transpose(0, 1).clone()

    layers = model.decoder.layers
    hooks = [
        layers[0].register_forward_pre_hook(
            lambda m, args, kwargs: put("embedding", kwargs.get("hidden_states", args[0] if args else None)),
            with_kwargs=True,
        )
    ]
    for idx, layer in enumerate(layers):
        if getattr(layer, "enable_moe_block", False):
            points = [
                (layer.self_attention, "attention"),
                (layer.dense_mlp, "mlp"),
                (layer.post_feedforward_layernorm_2, "experts"),
                (layer, "output"),
            ]
        else:
            points = [(layer.self_attention, "attention"), (layer.mlp, "mlp"), (layer, "output")]
        for sub, name in points:
            key = f"layer.{idx}.{name}"
            hooks.append(sub.register_forward_hook(lambda m, i, o, key=key: put(key, o)))
    hooks.append(model.decoder.final_layernorm.register_forward_hook(lambda m, i, o: put("final_norm", o)))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
