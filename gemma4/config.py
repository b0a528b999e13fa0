"""Gemma 4 text config, normalised from any of the shapes HF uses for it.

:func:`text_spec_from_any` / :func:`hf_text_config_from_any` accept a ``Gemma4TextConfig``, a ``Gemma4Config`` (its ``text_config``),
a ``config.json`` path or directory, or the parsed JSON dict, in both the old schema
(``global_head_dim`` / ``num_global_key_value_heads``) and the transformers >= 5.15 schema
(``per_layer_config``). Dicts are parsed by transformers itself, so HF's defaults apply (e.g. PLE on when
``hidden_size_per_layer_input`` is absent) and our model is built from exactly what HF would build.

:class:`Gemma4TextSpec` is the frozen, validated summary the Megatron model is built from. Everything it
holds is per layer where Gemma 4 is heterogeneous (head dim, KV heads, attention type); it never reads
``config.head_dim`` (which raises on >= 5.15 configs, facts §6.10).

HF checkpoints: :func:`read_hf_config` is the one reader of a ``config.json`` (file or directory; strict,
:class:`HFConfigFile`: raw object, text config, conditional-generation or not, text-weight prefix), and
:func:`text_weight_prefix` / :func:`prefix_from_names` the one prefix rule (``model.`` for
``Gemma4ForCausalLM``, ``model.language_model.`` for ``Gemma4ForConditionalGeneration`` and the 12B's
``Gemma4UnifiedForConditionalGeneration``, ``model_type gemma4_unified``). Conversion, the
slime loader and weight sync, ``--hf-config`` and the e2e preflight all read configs through them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gemma4.errors import ConfigError, InvalidInputError

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)
SUPPORTED_ROPE_TYPES = ("default", "proportional")


@dataclass(frozen=True)
class RopeSpec:
    """RoPE of one layer type. ``partial_rotary_factor`` only matters for ``proportional``."""

    rope_type: str
    theta: float
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


@dataclass(frozen=True)
class Gemma4TextSpec:
    """Validated Gemma 4 text-decoder hyper-parameters: dense, MoE, and the E-series features (PLE, KV
    sharing, double-wide MLP)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    layer_types: tuple[str, ...]
    head_dims: tuple[int, ...]
    num_kv_heads: tuple[int, ...]
    sliding_window: int
    rope: dict[str, RopeSpec]
    rms_norm_eps: float
    final_logit_softcapping: float | None
    attention_k_eq_v: bool
    tie_word_embeddings: bool
    attention_dropout: float
    max_position_embeddings: int
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    # MoE (26B-A4B): every layer has a dense MLP and `num_experts` routed experts (top `top_k_experts`).
    enable_moe: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    # E2B/E4B: per-layer embeddings of width `ple_dim` (0 = off) from a `ple_vocab_size`-row table; KV
    # sharing modes per layer (None, "store", "reuse"); MLP width per layer (2x on reuse layers when the
    # double-wide MLP is on).
    ple_dim: int = 0
    ple_vocab_size: int = 0
    kv_sharing: tuple[str | None, ...] = ()
    intermediate_sizes: tuple[int, ...] = ()

    # ---- per-layer helpers -------------------------------------------------------------------------
    def is_sliding(self, layer: int) -> bool:
        """True if ``layer`` (0-based) is a sliding-window layer."""
        return self.layer_types[layer] == SLIDING

    def has_v_proj(self, layer: int) -> bool:
        """K=V full layers have no ``v_proj``: V is v_norm of the raw K projection (facts §1.5); KV-shared
        (reuse) layers own no K/V at all."""
        return not self.reuses_kv(layer) and not (self.attention_k_eq_v and not self.is_sliding(layer))

    def reuses_kv(self, layer: int) -> bool:
        """KV-shared layer: reads K/V of the last earlier layer of its type ("store"), owns no K/V weights."""
        return bool(self.kv_sharing) and self.kv_sharing[layer] == "reuse"

    @property
    def kv_sharing_reuse(self) -> tuple[bool, ...]:
        """Per layer: does it reuse another layer's K/V."""
        return tuple(self.reuses_kv(i) for i in range(self.num_layers))

    def stores_kv(self, layer: int) -> bool:
        """The layer whose K/V the later reuse layers of its type read."""
        return bool(self.kv_sharing) and self.kv_sharing[layer] == "store"

    def head_dim_of(self, layer_type: str) -> int:
        """Head dim shared by every layer of ``layer_type``."""
        dims = {d for t, d in zip(self.layer_types, self.head_dims) if t == layer_type}
        if len(dims) != 1:
            raise ConfigError(f"layer type {layer_type!r} has head dims {sorted(dims)}; expected exactly one")
        return dims.pop()

    def kv_heads_of(self, layer_type: str) -> int:
        """KV heads shared by every layer of ``layer_type``."""
        heads = {n for t, n in zip(self.layer_types, self.num_kv_heads) if t == layer_type}
        if len(heads) != 1:
            raise ConfigError(f"layer type {layer_type!r} has KV heads {sorted(heads)}; expected exactly one")
        return heads.pop()

    @property
    def present_layer_types(self) -> tuple[str, ...]:
        """Layer types that occur, in a fixed order (sliding first)."""
        return tuple(t for t in LAYER_TYPES if t in self.layer_types)

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (for reports and goldens)."""
        d = asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["kv_sharing"] = list(self.kv_sharing)
        d["intermediate_sizes"] = list(self.intermediate_sizes)
        d["head_dims"] = list(self.head_dims)
        d["num_kv_heads"] = list(self.num_kv_heads)
        return d


# ---- loading: HF config.json and the text-weight prefix ------------------------------------------------


#: Text-weight name prefixes of an HF checkpoint: ``Gemma4ForCausalLM`` and ``Gemma4ForConditionalGeneration``.
HF_CAUSAL_LM_PREFIX = "model."
HF_CONDITIONAL_GENERATION_PREFIX = "model.language_model."
CONFIG_FILE = "config.json"
#: Top-level model types of multimodal configs (text under ``text_config``): Gemma 4, and the 12B's unified model.
MULTIMODAL_MODEL_TYPES = ("gemma4", "gemma4_unified")
#: Text-config model types we read: ``gemma4_text``, and the 12B's ``gemma4_unified_text`` (same fields, other
#: class defaults, no PLE/MoE attributes; parsed as a ``Gemma4TextConfig``, :func:`hf_text_config_from_dict`).
TEXT_MODEL_TYPES = ("gemma4_text", "gemma4_unified_text")
CONDITIONAL_GENERATION_ARCHITECTURES = (
    "Gemma4ForConditionalGeneration",
    "Gemma4UnifiedForConditionalGeneration",
)
#: ``Gemma4UnifiedTextConfig`` class defaults that differ from ``Gemma4TextConfig``'s (transformers 5.24), used
#: when transformers has no unified class; the PLE/MoE fields the unified class lacks are off.
UNIFIED_TEXT_DEFAULTS: dict[str, Any] = {
    "sliding_window": 1024,
    "max_position_embeddings": 262144,
    "use_bidirectional_attention": "vision",
    "hidden_size_per_layer_input": 0,
    "vocab_size_per_layer_input": 262144,
    "enable_moe_block": False,
    "num_experts": None,
    "top_k_experts": None,
    "moe_intermediate_size": None,
}


def _transformers_classes(*names: str) -> tuple[type, ...]:
    """The named transformers classes this transformers has (``Gemma4Unified*`` came after ``Gemma4*``)."""
    import transformers

    return tuple(c for c in (getattr(transformers, n, None) for n in names) if c is not None)


def is_conditional_generation(config: Any) -> bool:
    """Does ``config`` describe a multimodal model whose text weights sit under ``model.language_model.``
    (``Gemma4ForConditionalGeneration``, or the 12B's ``Gemma4UnifiedForConditionalGeneration``)? A
    ``config.json`` dict does when its ``model_type`` is ``gemma4`` / ``gemma4_unified`` or its
    ``architectures`` name one of those classes; a config object when it is a ``Gemma4Config`` /
    ``Gemma4UnifiedConfig``. Anything else (a text config, a spec) is a ``…ForCausalLM`` (``model.``)."""
    if isinstance(config, Mapping):
        archs = config.get("architectures") or []
        return config.get("model_type") in MULTIMODAL_MODEL_TYPES or any(
            a in CONDITIONAL_GENERATION_ARCHITECTURES for a in archs
        )
    if isinstance(config, Gemma4TextSpec):
        return False
    return isinstance(config, _transformers_classes("Gemma4Config", "Gemma4UnifiedConfig"))


def text_weight_prefix(conditional_generation: bool) -> str:
    """The one prefix rule: ``model.language_model.`` for ``Gemma4[Unified]ForConditionalGeneration``, else
    ``model.`` (SGLang's unified loader strips ``model.`` and expects ``language_model.`` after it)."""
    return HF_CONDITIONAL_GENERATION_PREFIX if conditional_generation else HF_CAUSAL_LM_PREFIX


def prefix_from_names(names: Iterable[str]) -> str:
    """The text-weight prefix of a checkpoint whose tensor names are known: ``model.language_model.`` if any
    name has it, else ``model.``."""
    return text_weight_prefix(any(n.startswith(HF_CONDITIONAL_GENERATION_PREFIX) for n in names))


def config_json_path(path: str | Path) -> Path:
    """``path`` itself, or ``path/config.json`` when ``path`` is a directory."""
    path = Path(path)
    return path / CONFIG_FILE if path.is_dir() else path


@dataclass(frozen=True)
class HFConfigFile:
    """An HF ``config.json`` read strictly: the raw object, its text config, and the text-weight prefix."""

    path: Path
    raw: dict[str, Any]

    @property
    def text(self) -> dict[str, Any]:
        """The text config as a dict: ``text_config`` of a multimodal config, else the whole object."""
        text = self.raw.get("text_config")
        return text if isinstance(text, dict) else self.raw

    @property
    def conditional_generation(self) -> bool:
        """Whether it describes ``Gemma4ForConditionalGeneration`` (:func:`is_conditional_generation`)."""
        return is_conditional_generation(self.raw)

    @property
    def prefix(self) -> str:
        """The text-weight prefix this config implies (:func:`text_weight_prefix`)."""
        return text_weight_prefix(self.conditional_generation)

    def hf_text_config(self, source: str | None = None) -> Any:
        """The ``Gemma4TextConfig`` (errors name ``source``, default this file)."""
        return hf_text_config_from_dict(self.raw, source=str(self.path) if source is None else source)

    def spec(self, source: str | None = None) -> Gemma4TextSpec:
        """The validated :class:`Gemma4TextSpec`."""
        return text_spec_from_hf(self.hf_text_config(source))


def read_hf_config(path: str | Path, what: str = "config file") -> HFConfigFile:
    """The one reader of an HF ``config.json`` (the file, or the directory holding it): a regular file, no
    NaN/Infinity, bounded size and nesting (:mod:`gemma4.safe_read`). An unreadable file raises
    :class:`ConfigError` naming it (and ``what`` it is)."""
    from gemma4.safe_read import read_json_object

    path = config_json_path(path)
    try:
        return HFConfigFile(path, read_json_object(path, what))
    except ConfigError:
        raise
    except InvalidInputError as exc:  # a config that cannot be read is a config error (same exit code 2)
        raise ConfigError(str(exc)) from None


def text_spec_and_prefix(config: Any) -> tuple[Gemma4TextSpec, str]:
    """The spec and text-weight prefix of any config source: a ``config.json`` path or directory (read by
    :func:`read_hf_config`), a ``config.json`` dict, a ``Gemma4TextConfig`` / ``Gemma4Config``, or a
    :class:`Gemma4TextSpec` (a ``Gemma4ForCausalLM``)."""
    if isinstance(config, (str, Path)):
        hf = read_hf_config(config)
        return hf.spec(), hf.prefix
    spec = config if isinstance(config, Gemma4TextSpec) else text_spec_from_any(config)
    return spec, text_weight_prefix(is_conditional_generation(config))


#: Most decoder layers a config may declare. Released Gemma 4 models have at most 60; transformers' own
#: config object takes ~0.5 ms per layer to build, so 10^5 layers would spin for a minute before any check.
MAX_LAYERS = 1024


def _bounded_layers(data: dict[str, Any], source: str) -> None:
    n = data.get("num_hidden_layers")
    if isinstance(n, int) and not isinstance(n, bool) and n > MAX_LAYERS:
        raise ConfigError(
            f"{source}: field 'num_hidden_layers' is {n}; more than {MAX_LAYERS} layers is refused "
            "(released Gemma 4 models have at most 60)"
        )
    types = data.get("layer_types")
    if isinstance(types, list) and len(types) > MAX_LAYERS:
        raise ConfigError(f"{source}: field 'layer_types' has {len(types)} entries; at most {MAX_LAYERS}")
    vocab = data.get("vocab_size")
    if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0:
        # before transformers sees them (it only warns, then HF's embedding indexes out of range)
        _token_id(data.get("pad_token_id"), "pad_token_id", vocab)
        _token_id(data.get("bos_token_id"), "bos_token_id", vocab)


def _unified_text_fields(data: dict[str, Any], source: str) -> dict[str, Any]:
    """A ``gemma4_unified_text`` dict as ``Gemma4TextConfig`` kwargs: the unified class's defaults for what the
    dict leaves out (its window, max positions; no PLE/MoE), and a refusal of any field of the unified class
    that ``Gemma4TextConfig`` does not have (a unified model we would silently build differently)."""
    defaults, unified_only = _unified_defaults()
    extra = sorted(k for k in data if k in unified_only)
    if extra:
        raise ConfigError(
            f"{source}: gemma4_unified_text field(s) {extra} have no Gemma4TextConfig counterpart; "
            "this unified model is not supported"
        )
    return defaults | data


@functools.lru_cache(maxsize=1)
def _unified_defaults() -> tuple[dict[str, Any], frozenset[str]]:
    """(defaults for a unified text dict, fields only the unified text class has); from transformers'
    ``Gemma4UnifiedTextConfig`` when it has one, else :data:`UNIFIED_TEXT_DEFAULTS`."""
    from transformers import Gemma4TextConfig

    defaults = dict(UNIFIED_TEXT_DEFAULTS)
    unified_only: frozenset[str] = frozenset()
    for unified_cls in _transformers_classes("Gemma4UnifiedTextConfig"):
        unified = unified_cls().to_dict()
        unified_only = frozenset(set(unified) - set(Gemma4TextConfig().to_dict()))
        defaults.update({k: unified[k] for k in ("sliding_window", "max_position_embeddings")})
        defaults["use_bidirectional_attention"] = unified.get("use_bidirectional_attention", "vision")
    return defaults, unified_only


def hf_text_config_from_dict(data: dict[str, Any], source: str = "config") -> Any:
    """Build a ``Gemma4TextConfig`` from a ``config.json`` dict: text (``gemma4_text``, or the 12B's
    ``gemma4_unified_text`` with the unified class's defaults) or multimodal (``gemma4``, ``gemma4_unified``)."""
    from transformers import Gemma4TextConfig

    model_type = data.get("model_type")
    if model_type in MULTIMODAL_MODEL_TYPES or "text_config" in data:
        text = data.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(
                f"{source}: field 'text_config' must be an object for model_type {model_type!r}"
            )
        data = text
        default_text = "gemma4_unified_text" if model_type == "gemma4_unified" else "gemma4_text"
        model_type = data.get("model_type", default_text)
    if model_type not in (None, *TEXT_MODEL_TYPES):
        raise ConfigError(
            f"{source}: field 'model_type' is {model_type!r}; expected one of "
            f"{[*TEXT_MODEL_TYPES, *MULTIMODAL_MODEL_TYPES]}"
        )
    _bounded_layers(data, source)
    clean = {
        k: v for k, v in data.items() if k not in ("model_type", "transformers_version", "architectures")
    }
    if model_type == "gemma4_unified_text":
        clean = _unified_text_fields(clean, source)
    try:
        return Gemma4TextConfig(**clean)
    except Exception as exc:  # transformers' strict dataclass validation raises several types
        detail = " ".join(str(exc).split())  # transformers' messages span lines; ours are one
        raise ConfigError(f"{source}: transformers rejects the config: {detail}") from exc


def hf_text_config_from_any(obj: Any) -> Any:
    """Return the ``Gemma4TextConfig`` behind a config object (``Gemma4TextConfig``, ``Gemma4Config``, or the
    unified ``Gemma4Unified[Text]Config``, re-parsed as a ``Gemma4TextConfig``), JSON dict, or path."""
    from transformers import Gemma4Config, Gemma4TextConfig

    if isinstance(obj, Gemma4TextConfig):
        return obj
    if isinstance(obj, Gemma4Config):
        return obj.text_config
    unified = _transformers_classes("Gemma4UnifiedConfig", "Gemma4UnifiedTextConfig")
    if unified and isinstance(obj, unified):
        text = getattr(obj, "text_config", obj)
        return hf_text_config_from_dict(text.to_dict(), source=type(obj).__name__)
    if isinstance(obj, (str, Path)):
        return read_hf_config(obj).hf_text_config(source=str(obj))
    if isinstance(obj, dict):
        return hf_text_config_from_dict(obj)
    raise ConfigError(f"unsupported config object of type {type(obj).__name__}")


def _per_layer(cfg: Any, layer: int, name: str, default: int) -> int:
    """Read a per-layer attribute from ``per_layer_config`` (>= 5.15) or fall back to old attributes."""
    plc = getattr(cfg, "per_layer_config", None)
    if plc is not None:
        value = getattr(plc[layer], name)
        return int(value)
    return default


def _finite_number(value: Any, name: str) -> float:
    """``value`` as a float if it is a finite JSON number (not a bool, string or NaN/inf); else ConfigError."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"field {name!r} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"field {name!r} is non-finite ({value!r}); a config needs finite numbers")
    return float(value)


def _token_id(value: Any, name: str, vocab: int) -> None:
    """A special token id must be null or an integer in ``[0, vocab_size)`` (HF's embedding indexes it)."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab:
        raise ConfigError(
            f"field {name!r} must be an integer in [0, vocab_size) = [0, {vocab}), got {value!r}"
        )


def text_spec_from_any(obj: Any) -> Gemma4TextSpec:
    """Normalise and validate any supported config form into a :class:`Gemma4TextSpec`."""
    return text_spec_from_hf(hf_text_config_from_any(obj))


def text_spec_from_hf(cfg: Any) -> Gemma4TextSpec:
    """Validate a ``Gemma4TextConfig`` and summarise it; unsupported settings raise :class:`ConfigError`."""
    d = cfg.to_dict()

    def field(name: str) -> Any:
        if name not in d:
            raise ConfigError(f"field {name!r} is missing")
        return d[name]

    def positive_int(name: str) -> int:
        v = field(name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"field {name!r} must be a positive integer, got {v!r}")
        return v

    vocab = positive_int("vocab_size")
    hidden = positive_int("hidden_size")
    inter = positive_int("intermediate_size")
    n_layers = positive_int("num_hidden_layers")
    n_heads = positive_int("num_attention_heads")

    layer_types = tuple(field("layer_types"))
    if len(layer_types) != n_layers:
        raise ConfigError(
            f"field 'layer_types' has {len(layer_types)} entries but 'num_hidden_layers' is {n_layers}"
        )
    for i, t in enumerate(layer_types):
        if t not in LAYER_TYPES:
            raise ConfigError(f"field 'layer_types[{i}]' is {t!r}; expected one of {list(LAYER_TYPES)}")

    # Refuse what this model does not build yet, naming the field.
    ple_dim = d.get("hidden_size_per_layer_input") or 0
    if not isinstance(ple_dim, int) or isinstance(ple_dim, bool) or ple_dim < 0:
        raise ConfigError(
            f"field 'hidden_size_per_layer_input' must be a non-negative integer, got {ple_dim!r}"
        )
    ple_vocab = d.get("vocab_size_per_layer_input") or 0
    if ple_dim and (not isinstance(ple_vocab, int) or ple_vocab <= 0):
        raise ConfigError(
            f"field 'vocab_size_per_layer_input' must be a positive integer with PLE, got {ple_vocab!r}"
        )
    n_shared = d.get("num_kv_shared_layers") or 0
    if not isinstance(n_shared, int) or isinstance(n_shared, bool) or not 0 <= n_shared < n_layers:
        raise ConfigError(
            f"field 'num_kv_shared_layers' must be an integer in [0, num_hidden_layers) = [0, {n_layers}), "
            f"got {n_shared!r} (a model where every layer reuses K/V has no producer)"
        )
    try:
        sharing = tuple(cfg.kv_sharing_modes)
    except ValueError as exc:  # HF: a reused layer type with no earlier producer
        raise ConfigError(f"field 'num_kv_shared_layers' ({n_shared}) with 'layer_types': {exc}") from exc
    double_wide = bool(d.get("use_double_wide_mlp")) and n_shared > 0
    moe = bool(d.get("enable_moe_block"))
    if moe:
        n_exp, top_k, moe_inter = d.get("num_experts"), d.get("top_k_experts"), d.get("moe_intermediate_size")
        for name, value in (
            ("num_experts", n_exp),
            ("top_k_experts", top_k),
            ("moe_intermediate_size", moe_inter),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(
                    f"field {name!r} must be a positive integer with enable_moe_block, got {value!r}"
                )
        if top_k > n_exp:
            raise ConfigError(f"field 'top_k_experts' ({top_k}) exceeds 'num_experts' ({n_exp})")
    if d.get("use_bidirectional_attention") == "all":
        raise ConfigError(
            "field 'use_bidirectional_attention' is 'all': only causal text attention is supported"
        )
    if d.get("attention_bias"):
        raise ConfigError("field 'attention_bias' is true: Gemma 4 has no attention biases; unsupported")
    act = field("hidden_activation")
    if act not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"field 'hidden_activation' is {act!r}; Gemma 4 uses {SUPPORTED_ACTIVATIONS[0]!r}")

    k_eq_v = bool(d.get("attention_k_eq_v", False))
    head_dims, kv_heads = [], []
    for i in range(n_layers):
        hd = _per_layer(cfg, i, "head_dim", d.get("head_dim", 0))
        nkv = _per_layer(cfg, i, "num_key_value_heads", d.get("num_key_value_heads", 0))
        if hd <= 0 or hd % 2:
            raise ConfigError(f"layer {i}: head_dim must be a positive even integer, got {hd}")
        if nkv <= 0 or n_heads % nkv:
            raise ConfigError(
                f"layer {i}: num_key_value_heads ({nkv}) must divide 'num_attention_heads' ({n_heads})"
            )
        head_dims.append(hd)
        kv_heads.append(nkv)
    for t in LAYER_TYPES:
        dims = {hd for lt, hd in zip(layer_types, head_dims) if lt == t}
        heads = {n for lt, n in zip(layer_types, kv_heads) if lt == t}
        if len(dims) > 1 or len(heads) > 1:
            raise ConfigError(
                f"field 'per_layer_config': layers of type {t!r} disagree on head_dim {sorted(dims)} "
                f"or num_key_value_heads {sorted(heads)}"
            )

    window = field("sliding_window")
    if SLIDING in layer_types and (not isinstance(window, int) or window < 1):
        raise ConfigError(f"field 'sliding_window' must be a positive integer, got {window!r}")

    rope_params = field("rope_parameters") or {}
    rope: dict[str, RopeSpec] = {}
    for t in sorted(set(layer_types)):
        p = rope_params.get(t)
        if not isinstance(p, dict):
            raise ConfigError(f"field 'rope_parameters.{t}' is missing (RoPE parameters per layer type)")
        rtype = p.get("rope_type", "default")
        if rtype not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"field 'rope_parameters.{t}.rope_type' is {rtype!r}; supported: {list(SUPPORTED_ROPE_TYPES)}"
            )
        theta = _finite_number(p.get("rope_theta"), f"rope_parameters.{t}.rope_theta")
        if not theta > 0:
            raise ConfigError(f"field 'rope_parameters.{t}.rope_theta' must be positive, got {theta!r}")
        prf, factor = 1.0, 1.0
        if rtype == "proportional":
            prf = _finite_number(
                p.get("partial_rotary_factor", 1.0), f"rope_parameters.{t}.partial_rotary_factor"
            )
            factor = _finite_number(p.get("factor", 1.0), f"rope_parameters.{t}.factor")
        if not 0.0 <= prf <= 1.0:
            raise ConfigError(
                f"field 'rope_parameters.{t}.partial_rotary_factor' must be in [0, 1], got {prf}"
            )
        if factor <= 0:
            raise ConfigError(f"field 'rope_parameters.{t}.factor' must be positive, got {factor}")
        # 'default' RoPE: Gemma4TextRotaryEmbedding.compute_default_rope_parameters reads only rope_theta and
        # the head dim, so a stray 'factor' / 'partial_rotary_factor' is ignored here exactly as HF ignores it.
        rope[t] = RopeSpec(rtype, float(theta), prf, factor)

    eps = _finite_number(field("rms_norm_eps"), "rms_norm_eps")
    if not eps > 0:
        raise ConfigError(f"field 'rms_norm_eps' must be positive, got {eps!r}")
    softcap = d.get("final_logit_softcapping")
    if softcap is not None and not _finite_number(softcap, "final_logit_softcapping") > 0:
        raise ConfigError(
            f"field 'final_logit_softcapping' must be a positive number or null, got {softcap!r}"
        )
    dropout = _finite_number(d.get("attention_dropout") or 0.0, "attention_dropout")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"field 'attention_dropout' must be in [0, 1), got {dropout!r}")
    max_pos = d.get("max_position_embeddings", 131072)
    if not isinstance(max_pos, int) or isinstance(max_pos, bool) or max_pos < 1:
        raise ConfigError(f"field 'max_position_embeddings' must be a positive integer, got {max_pos!r}")
    _token_id(d.get("pad_token_id"), "pad_token_id", vocab)
    _token_id(d.get("bos_token_id"), "bos_token_id", vocab)
    eos = d.get("eos_token_id")
    for i, e in enumerate(eos if isinstance(eos, list) else [eos]):
        _token_id(e, "eos_token_id" if not isinstance(eos, list) else f"eos_token_id[{i}]", vocab)

    return Gemma4TextSpec(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=n_layers,
        num_attention_heads=n_heads,
        layer_types=layer_types,
        head_dims=tuple(head_dims),
        num_kv_heads=tuple(kv_heads),
        sliding_window=int(window) if isinstance(window, int) else 0,
        rope=rope,
        rms_norm_eps=float(eps),
        final_logit_softcapping=None if softcap is None else float(softcap),
        attention_k_eq_v=k_eq_v,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        attention_dropout=float(dropout),
        max_position_embeddings=max_pos,
        pad_token_id=d.get("pad_token_id"),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        ple_dim=ple_dim,
        ple_vocab_size=ple_vocab if ple_dim else 0,
        kv_sharing=sharing,
        intermediate_sizes=tuple(inter * (2 if double_wide and m == "reuse" else 1) for m in sharing),
        enable_moe=moe,
        num_experts=d.get("num_experts") if moe else None,
        top_k_experts=d.get("top_k_experts") if moe else None,
        moe_intermediate_size=d.get("moe_intermediate_size") if moe else None,
    )
