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

Their own Megatron -> HF export (``slime/backends/megatron_utils/megatron_to_hf``) is run too:
:func:`export_hf` (``convert_to_hf`` with a model name; the other models' converters and ``processors``,
absent from the copy, are stood in), :func:`round_trip` (HF -> their bridge -> their model -> their export,
bit for bit) and :func:`named_grads` (their gradients under HF names, for ``--grads``); :data:`EXPORT_FIXES`
holds the fix of the export's finding.

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
    tp: int = 1,
    ep: int = 1,
) -> SlimeModel:
    """Build their model for the HF config dict ``config`` through their provider and spec, in ``dtype``
    (``tp`` / ``ep``: Megatron's tensor / expert parallel sizes, passed as their scripts pass them; the
    process groups must already exist, e.g. in a rank of :func:`harness.distributed.run_distributed`).

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
            argv = _argv(config) + ["--tensor-model-parallel-size", str(tp)]
            if ep > 1:
                argv += ["--expert-model-parallel-size", str(ep)]
            args = parse_megatron_args(
                argv,
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


def load_hf_weights(
    sm: SlimeModel,
    hf_state: dict[str, torch.Tensor],
    *,
    tp_rank: int = 0,
    tp: int = 1,
    ep_rank: int = 0,
    ep: int = 1,
) -> dict[str, list[str]]:
    """Load HF-named weights (relative to ``model.``) through their bridge; strict both ways. Returns the
    mapping used (Megatron name -> HF names). Sharded (``tp`` / ``ep`` > 1): the bridge gives each TP = 1
    tensor (an EP rank's local expert ``i`` is global expert ``ep_rank * E / ep + i``), cut for this TP
    rank by Megatron's own partition attributes of the parameter (:func:`gemma4.parallel.shard_like`), as
    mbridge's loader does."""
    from gemma4.errors import InvalidInputError
    from gemma4.parallel import global_expert_name, shard_like

    bridge = sm.env["bridge"].Gemma4Bridge(OldSchemaView(hf_text_config(sm.config)))
    prefix = "model.language_model."
    used: set[str] = set()
    mapping = {}
    own = sm.model.state_dict()
    params = dict(sm.model.named_parameters())
    num_experts = int(sm.config.get("num_experts") or 1)
    with torch.no_grad():
        for local, tensor in own.items():
            if local.endswith("_extra_state"):
                continue
            te = _te_name(global_expert_name(local, ep_rank, ep, num_experts))
            hf_names = _bridge_hf_names(bridge, te)
            missing = [n for n in hf_names if n[len(prefix) :] not in hf_state]
            if missing:
                raise InvalidInputError(f"{local}: HF tensors {missing} are not in the state dict")
            hf_weights = [hf_state[n[len(prefix) :]].to(torch.float64) for n in hf_names]
            value = bridge._weight_to_mcore_format(te, hf_weights)
            if local in params and tp > 1:
                try:
                    value = shard_like(value, params[local], tp_rank, tp)
                except InvalidInputError as exc:
                    raise InvalidInputError(f"{local}: {exc}") from None
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
    sm: SlimeModel,
    ids: torch.Tensor,
    *,
    packed: list[int] | None = None,
    capture: bool = False,
    grad: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits ``[b, s, V]`` for ``ids`` ``[b, s]`` (``packed``: one row holding documents of these lengths,
    run as THD with ``cu_seqlens``), and with ``capture`` each decoder layer's output ``[b, s, h]``; with
    ``grad`` the logits keep their graph (for a backward)."""
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
        with torch.set_grad_enabled(grad):
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


@contextlib.contextmanager
def fix_kv_heads_below_tp(env: dict[str, types.ModuleType]) -> Iterator[None]:
    """Finding 6: K=V global layers break when TP exceeds their KV heads (``num_global_key_value_heads <
    tensor_model_parallel_size``).

    Megatron's ``Attention`` supports fewer KV heads than TP ranks (``num_query_groups < world_size``:
    ``num_query_groups_per_partition = 1``; ``get_query_key_value_tensors`` all-gathers ``linear_qkv``'s
    output, takes this rank's group, then this rank's query heads: megatron-core ``attention.py``, "steps
    1-4"). Their override for K=V global layers, ``Gemma4SelfAttention._split_qkv_global_k_eq_v``
    (gemma4.py:864-895, called at gemma4.py:901 instead of the parent), reshapes the *local* shard as if it
    held whole groups: at TP 2 with 1 global KV head (the released 12B; tiny-31b / tiny-12b) the view
    raises (``shape '[s, b, 1, ...]' is invalid``), and with more ranks than heads on 26B-A4B (2) / 31B (4)
    likewise. Fix: in that case do Megatron's steps 1-2 (all-gather, this rank's group) and 4 (this rank's
    query heads) around their split; with ``num_query_groups >= TP`` their code runs unchanged.
    """
    cls = env["gemma4"].Gemma4SelfAttention
    orig = cls._split_qkv_global_k_eq_v

    def _split_qkv_global_k_eq_v(self, hidden_states):
        from megatron.core.parallel_state import get_tensor_model_parallel_rank
        from megatron.core.tensor_parallel.mappings import all_gather_last_dim_from_tensor_parallel_region

        ng, world = self.config.num_query_groups, self.world_size
        if ng >= world:
            return orig(self, hidden_states)
        rank, per_group = get_tensor_model_parallel_rank(), world // ng
        mixed_qkv, _ = self.linear_qkv(hidden_states)
        mixed_qkv = all_gather_last_dim_from_tensor_parallel_region(mixed_qkv)  # step 1
        size = mixed_qkv.size(-1) // ng
        mixed_qkv = mixed_qkv[:, :, (rank // per_group) * size : (rank // per_group + 1) * size]  # step 2
        hn = self.hidden_size_per_attention_head
        heads = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        mixed_qkv = mixed_qkv.view(*mixed_qkv.shape[:-1], 1, (heads + 2) * hn)
        query, raw_key, _raw_value = torch.split(mixed_qkv, [heads * hn, hn, hn], dim=3)  # as theirs
        query = query.reshape(query.size(0), query.size(1), -1, hn)
        q_size = self.num_attention_heads_per_partition // per_group  # step 4
        query = query[:, :, (rank % per_group) * q_size : (rank % per_group + 1) * q_size, :]
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
        value = self.v_norm(raw_key)
        key = self.k_layernorm(raw_key) if self.k_layernorm is not None else raw_key
        return query, key, value

    with _patched(cls, "_split_qkv_global_k_eq_v", _split_qkv_global_k_eq_v):
        yield


FIXES["kv_heads_below_tp"] = fix_kv_heads_below_tp


# ---- the implementation under test (harness/parity/impl.py) ---------------------------------------------

ALL_FIXES: tuple[str, ...] = (
    "layer_types",
    "global_rope",
    "sliding_window",
    "fp64_islands",
    "kv_heads_below_tp",
)


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

    Runs the single process, plain and packed (THD with ``cu_seqlens``), and TP > 1 or EP > 1 in forked
    gloo ranks (:meth:`supports_run` declares the rest not applicable, with the reason). Activations are
    captured at the embedding, each layer's attention / dense MLP / routed experts / output, the final norm
    and the logits: every point of :func:`harness.parity.capture.capture_order`. With gradients
    (``--grads``) it backpropagates the harness's loss through their model and maps every parameter's
    gradient back to HF names with **their own** Megatron -> HF export (:func:`export_hf`, model name as
    their default derives it, :data:`EXPORT_MODEL_NAME`): ``RankResult.hf_grads``, compared with HF's by the
    pipeline.
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
        """The layouts this plugin cannot run (checked after :meth:`for_source`, so config-dependent ones are
        known): TP alone or EP alone are run (forked gloo ranks, their model built with
        ``--tensor-model-parallel-size`` / ``--expert-model-parallel-size``, weights cut by Megatron's
        partition attributes); the rest is declared here with the reason."""
        if layout.cp > 1:
            return (
                "context parallelism: the plugin does not write the CP split of inputs, positions and "
                "packed-sequence params for their model (their SDPACoreAttention has its own CP path)"
            )
        if layout.sequence_parallel:
            return "sequence parallelism: not written in the plugin (their scripts' --sequence-parallel)"
        if layout.tp > 1 and layout.ep > 1:
            return "TP and EP together: not written in the plugin (TP alone and EP alone are)"
        if layout.world_size > 1 and layout.packed:
            return "a packed row under TP/EP: not written in the plugin (packed runs single-process)"
        cfg = self.hf_config or {}
        if layout.tp > 1 and cfg:
            for key in ("vocab_size", "num_attention_heads"):
                if cfg.get(key) and cfg[key] % layout.tp:
                    return f"{key} {cfg[key]} is not divisible by TP {layout.tp} (Megatron partitions it)"
        if layout.ep > 1 and cfg:
            if not cfg.get("enable_moe_block"):
                return "expert parallelism needs experts (enable_moe_block)"
            if cfg["num_experts"] % layout.ep:
                return f"num_experts {cfg['num_experts']} is not divisible by EP {layout.ep}"
        return None

    def run(self, rank, world, spec, dtype, full_weights, seq, layout, ref_grads):
        from gemma4.conversion.mapping import mcore_to_hf
        from gemma4.errors import InvalidInputError
        from harness.parity.impl import ImplementationBroken, RankResult

        why = self.supports_run(layout, ref_grads is not None)
        if why or world != layout.world_size:
            raise InvalidInputError(
                f"{self.name} cannot run this: {why or f'{world} ranks for {layout.name}'}"
            )
        if self.hf_config is None:
            raise InvalidInputError(f"{self.name}: needs the HF config (use .for_source(source))")
        tp, ep = layout.tp, layout.ep
        tp_rank = ep_rank = dp_rank = 0
        if world > 1:  # a forked gloo rank (harness.distributed.run_distributed): Megatron's groups exist
            from megatron.core import parallel_state as ps

            tp_rank, ep_rank = ps.get_tensor_model_parallel_rank(), ps.get_expert_model_parallel_rank()
            dp_rank = ps.get_data_parallel_rank()
        config = dict(self.hf_config)
        hf_state = mcore_to_hf(full_weights, spec)
        fixes = tuple(f for f in self.fixes if f != "fp64_islands" or dtype == torch.float64)
        lengths = None
        if layout.packed:
            cu = seq.cu_padded.tolist()
            lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
        rows = seq.ids.shape[0] // ep  # EP ranks are data-parallel replicas: each takes its rows
        ids = seq.ids[dp_rank * rows : (dp_rank + 1) * rows]
        labels = seq.labels[dp_rank * rows : (dp_rank + 1) * rows]
        with build(config, dtype, hf_state, fixes=fixes, tp=tp, ep=ep) as sm:
            try:
                load_hf_weights(sm, hf_state, tp_rank=tp_rank, tp=tp, ep_rank=ep_rank, ep=ep)
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
            grad = ref_grads is not None
            with _capture(sm.model, acts):
                logits, _ = forward(sm, ids, packed=lengths, grad=grad)
            if tp > 1 and logits.shape[-1] != spec.vocab_size:  # vocab-parallel logits: gather, unpad
                from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

                logits = gather_from_tensor_model_parallel_region(logits)[..., : spec.vocab_size]
            out = RankResult(tp_rank, 0, dp_rank, ep_rank, acts, logits.detach())
            if grad:
                out.hf_grads, out.missing_grads = named_grads(sm, logits, labels, tp=tp, ep=ep)
        return out


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


# ---- their Megatron -> HF export (slime/backends/megatron_utils/megatron_to_hf) -------------------------

_EXPORT_PKG = "slime.backends.megatron_utils.megatron_to_hf"
#: The converters ``megatron_to_hf/__init__.py`` imports that are not in the reference copy (other models).
_OTHER_CONVERTERS = {
    "deepseekv3": "convert_deepseekv3_to_hf",
    "glm4": "convert_glm4_to_hf",
    "glm4moe": "convert_glm4moe_to_hf",
    "gpt_oss": "convert_gpt_oss_to_hf",
    "llama": "convert_llama_to_hf",
    "mimo": "convert_mimo_to_hf",
    "minimax_m2": "convert_minimax_m2_to_hf",
    "qwen2": "convert_qwen2_to_hf",
    "qwen3_5": "convert_qwen3_5_to_hf",
    "qwen3_next": "convert_qwen3_next_to_hf",
    "qwen3_vl": "convert_qwen3vl_to_hf",
    "qwen3moe": "convert_qwen3moe_to_hf",
}

#: The model names a user passes as ``--model-name`` for the released checkpoints: their own run scripts'
#: ``MODEL_NAME`` (``scripts/run-gemma4-31B-gsm8k.sh``, ``run-gemma4-26B-A4B-gsm8k.sh``), the same lowercased,
#: and the HF repo ids (facts §4: ``google/gemma-4-31B-it``...).
RELEASED_MODEL_NAMES: tuple[str, ...] = (
    "gemma-4-31B-it",
    "gemma-4-26B-A4B-it",
    "gemma-4-31b-it",
    "gemma-4-26b-a4b-it",
    "google/gemma-4-31B-it",
    "google/gemma-4-26B-A4B-it",
)


def _export_stand_ins() -> dict[str, types.ModuleType]:
    """Stand-ins for what ``megatron_to_hf/__init__.py`` imports and the copy lacks: the other models'
    converters (raise if called) and ``processors`` (upstream slime's ``remove_padding``: the embedding and
    output layer cut to ``vocab_size`` rows; ``quantize_params`` without a quantization config: unchanged)."""
    mods: dict[str, types.ModuleType] = {}
    for sub, fn in _OTHER_CONVERTERS.items():
        m = types.ModuleType(f"{_EXPORT_PKG}.{sub}")

        def _absent(*a: Any, _fn: str = fn, **k: Any) -> Any:
            raise NotImplementedError(f"{_fn} is not in the slime #2135 reference copy")

        setattr(m, fn, _absent)
        mods[m.__name__] = m
    proc = types.ModuleType(f"{_EXPORT_PKG}.processors")

    def remove_padding(name: str, param: torch.Tensor, vocab_size: int) -> torch.Tensor:
        if name in ("module.module.embedding.word_embeddings.weight", "module.module.output_layer.weight"):
            return param[:vocab_size]
        return param

    def quantize_params(args: Any, name: str, converted: list, quantization_config: Any) -> list:
        if quantization_config is not None:
            raise NotImplementedError("quantized export is not part of the harness's round trip")
        return converted

    proc.remove_padding, proc.quantize_params = remove_padding, quantize_params
    mods[proc.__name__] = proc
    for m in mods.values():
        m.__harness_stand_in__ = True
    return mods


@contextlib.contextmanager
def export_environment(sm: SlimeModel) -> Iterator[types.ModuleType]:
    """Their export package (``megatron_to_hf``, whose ``convert_to_hf(args, model_name, name, param)``
    dispatches on ``model_name``) importable inside the model's environment; yields the package. Their
    ``_get_config`` reads the checkpoint with ``AutoConfig``: answered with the pre-5.15 view
    (:class:`~harness.compat.old_schema.OldSchemaView`, as for their model), and its caches are emptied on
    entry and exit."""
    import importlib

    import transformers

    before = set(sys.modules)
    real = transformers.AutoConfig

    class _OldSchemaAutoConfig:
        @staticmethod
        def from_pretrained(*a: Any, **k: Any) -> Any:
            return OldSchemaView(real.from_pretrained(*a, **k))

    stand_ins = _export_stand_ins()
    sys.modules.update(stand_ins)
    transformers.AutoConfig = _OldSchemaAutoConfig
    try:
        pkg = importlib.import_module(_EXPORT_PKG)
        g4 = importlib.import_module(f"{_EXPORT_PKG}.gemma4")
        g4._config_cache.clear()
        g4.reset_expert_buffers()
        yield pkg
        g4._config_cache.clear()
        g4.reset_expert_buffers()
    finally:
        transformers.AutoConfig = real
        for k in set(sys.modules) - before:
            if k == "slime" or k.startswith("slime."):
                sys.modules.pop(k, None)


def megatron_named_tensors(sm: SlimeModel, tensors: dict[str, torch.Tensor] | None = None):
    """``(name, tensor)`` as their export receives them in a slime run: Megatron's TE names (the model is
    built with local modules: :func:`_te_name` gives the TE name their code was written against) under
    ``module.module.`` (DDP + Float16Module), parameters then buffers (``layer_scalar``); or, given,
    ``tensors`` instead (local TP = 1 names with global expert indices; e.g. gradients)."""
    own = dict(sm.model.named_parameters()) | dict(sm.model.named_buffers())
    for local, value in (own if tensors is None else tensors).items():
        yield f"module.module.{_te_name(local)}", value.detach()


def export_hf(
    sm: SlimeModel,
    model_name: str,
    tensors: dict[str, torch.Tensor] | None = None,
    *,
    fixes: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """Their Megatron -> HF export of the model (or of ``tensors``, by local name) through their own
    ``convert_to_hf(args, model_name, name, param)``, as a state dict with HF names relative to ``model.``
    (``model.language_model.`` stripped). A name exported twice with different values raises (the tied
    output layer, if present, must equal the embedding). ``fixes`` names entries of :data:`EXPORT_FIXES`."""
    out: dict[str, torch.Tensor] = {}
    prefix = "model.language_model."
    with export_environment(sm) as pkg, contextlib.ExitStack() as stack:
        for name in fixes:
            stack.enter_context(EXPORT_FIXES[name](pkg))
        for name, param in megatron_named_tensors(sm, tensors):
            for hf_name, value in pkg.convert_to_hf(sm.args, model_name, name, param):
                if not hf_name.startswith(prefix):
                    raise ValueError(f"{name} exported as {hf_name!r}, outside {prefix}")
                key = hf_name[len(prefix) :]
                if key in out and not torch.equal(out[key], value):
                    raise ValueError(f"{key} exported twice with different values (from {name})")
                out[key] = value
    return out


#: Fixes of their export, applied from outside (``with EXPORT_FIXES[name](pkg):``).
EXPORT_FIXES: dict[str, Callable[[types.ModuleType], contextlib.AbstractContextManager]] = {}


@contextlib.contextmanager
def fix_export_model_name(pkg: types.ModuleType) -> Iterator[None]:
    """Finding 5: their export rejects the released models' names.

    ``_convert_to_hf_core`` (``megatron_to_hf/__init__.py:59``) picks the Gemma 4 converter with
    ``"gemma4" in model_name``: the names of the released checkpoints, as their own run scripts spell them
    (``MODEL_NAME=gemma-4-31B-it``, ``gemma-4-26B-A4B-it``) or lowercased, or as HF repo ids
    (``google/gemma-4-31B-it``), contain ``gemma-4``, not ``gemma4``: every parameter raises
    ``ValueError: Unsupported model``. Fix: the dispatch sees the name lowercased with ``gemma-4`` /
    ``gemma_4`` read as ``gemma4`` (other models' names unchanged).
    """
    import re

    orig = pkg._convert_to_hf_core

    def _convert_to_hf_core(args, model_name, name, param):
        if re.search(r"gemma[-_]?4", model_name, flags=re.IGNORECASE):
            model_name = re.sub(r"gemma[-_]?4", "gemma4", model_name, flags=re.IGNORECASE).lower()
        return orig(args, model_name, name, param)

    with _patched(pkg, "_convert_to_hf_core", _convert_to_hf_core):
        yield


EXPORT_FIXES["model_name"] = fix_export_model_name


#: The model name their export is called with for gradients: what upstream slime derives when ``--model-name``
#: is not given (``type(AutoConfig.from_pretrained(hf_checkpoint)).__name__.lower()``; a text checkpoint's
#: ``Gemma4TextConfig``), which their dispatch accepts (``"gemma4" in model_name``).
EXPORT_MODEL_NAME = "gemma4textconfig"


def named_grads(
    sm: SlimeModel, logits: torch.Tensor, labels: torch.Tensor, *, tp: int = 1, ep: int = 1
) -> tuple[dict[str, torch.Tensor] | None, list[str]]:
    """The named-gradients hook: backpropagate :func:`harness.parity.inputs.lm_loss` of ``logits`` (still
    holding their graph) and map every parameter's gradient to HF names through their own export
    (:func:`export_hf`). Returns ``(HF name -> gradient, their parameters that got no gradient)``.

    Under TP / EP (a forked rank): the gradients are first finalized as Megatron's DDP does (summed over the
    data-parallel ranks, q/k layernorms over TP: :func:`harness.parity.megatron_side.finalize_grads`), then
    made whole as slime does before its export: TP shards all-gathered and joined by Megatron's partition
    attributes, EP ranks' experts all-gathered under their global index. Only global rank 0 exports (the
    others return ``None``)."""
    from harness.parity.inputs import lm_loss

    for p in sm.model.parameters():
        p.grad = None
    lm_loss(logits, labels).backward()
    distributed = tp > 1 or ep > 1
    if distributed:
        from harness.parity.megatron_side import finalize_grads

        finalize_grads(sm.model, sm.model.config)
    grads, missing = {}, []
    for name, p in sm.model.named_parameters():
        if p.grad is None:
            missing.append(name)
            if not distributed:
                continue
        # zeros keep every rank's collectives aligned; the parameter is reported missing all the same
        grads[name] = p.grad.detach() if p.grad is not None else torch.zeros_like(p)
    if distributed:
        import torch.distributed as dist

        grads = _whole_grads(sm, grads, tp, ep)
        if dist.get_rank() != 0:
            return None, missing
    return export_hf(sm, EXPORT_MODEL_NAME, grads), missing


def _whole_grads(sm: SlimeModel, grads: dict[str, torch.Tensor], tp: int, ep: int) -> dict[str, torch.Tensor]:
    """TP = 1 / EP = 1 gradients (local names, global expert indices) from every rank's pieces."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from gemma4.parallel import gather_like, global_expert_name

    params = dict(sm.model.named_parameters())
    num_experts = int(sm.config.get("num_experts") or 1)
    out: dict[str, torch.Tensor] = {}
    for name, g in grads.items():
        p = params[name]
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            shards = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(shards, g.contiguous(), group=ps.get_tensor_model_parallel_group())
            g = gather_like(shards, p)
        if ep > 1 and ".experts.local_experts." in name:
            pieces = [torch.empty_like(g) for _ in range(ep)]
            dist.all_gather(pieces, g.contiguous(), group=ps.get_expert_model_parallel_group())
            for r, piece in enumerate(pieces):
                out[global_expert_name(name, r, ep, num_experts)] = piece
            continue
        out[name] = g
    return out


@dataclass(frozen=True)
class RoundTrip:
    """HF state dict -> their model (their bridge) -> their export, against the HF state dict: the HF names
    the export did not produce, the names it produced that HF does not have, and the names whose tensors are
    not bit-identical (value, dtype or shape)."""

    missing: list[str]
    extra: list[str]
    differ: list[str]

    @property
    def exact(self) -> bool:
        return not (self.missing or self.extra or self.differ)


def round_trip(
    config: dict[str, Any],
    dtype: torch.dtype,
    model_name: str,
    *,
    fixes: tuple[str, ...] = ("layer_types",),
    export_fixes: tuple[str, ...] = (),
    seed: int = 0,
) -> RoundTrip:
    """The harness's seeded HF weights for ``config`` in ``dtype`` loaded into their model by their bridge
    (:func:`load_hf_weights`), exported by their ``convert_to_hf`` under ``model_name`` (:func:`export_hf`),
    compared bit for bit with the HF state dict. ``fixes`` (model build; default ``layer_types``, without
    which the released schedules do not build, finding 1) and ``export_fixes`` are applied from outside."""
    _, hf_state = hf_reference(config, dtype, seed)
    with build(config, dtype, hf_state, fixes=fixes) as sm:
        load_hf_weights(sm, hf_state)
        out = export_hf(sm, model_name, fixes=export_fixes)
    differ = [
        k
        for k, v in hf_state.items()
        if k in out and not (out[k].dtype == v.dtype and out[k].shape == v.shape and torch.equal(out[k], v))
    ]
    return RoundTrip(sorted(set(hf_state) - set(out)), sorted(set(out) - set(hf_state)), differ)
