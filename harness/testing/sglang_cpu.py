"""SGLang 0.5.23's own Gemma 4 model code, imported and run on CPU: build ``Gemma4ForCausalLM`` /
``Gemma4ForConditionalGeneration`` from a preset and run its real ``load_weights`` on what weight sync emits,
recording every ``weight_loader`` call (which emitted name landed where, which name SGLang skipped).

Used by ``tests/unit/gemma4/slime/test_sglang_real_load.py`` (weight sync into SGLang's model),
``tests/unit/gemma4/conversion/test_sglang_config.py`` (SGLang's ``ModelConfig`` and ``load_weights`` on our
``--for sglang`` export; :func:`build_sglang_model` takes the config SGLang's loader made of a directory,
:func:`load_and_check` any weights) and ``e2e-mini`` (:mod:`harness.e2e.sglang_route`: every synced tensor
goes through SGLang's ``load_weights``; :func:`hf_sources_in_sglang` reads SGLang's loaded parameters back
under HF names, :func:`routing_failures` names skipped and doubly written tensors).

How SGLang imports here
-----------------------
``sglang==0.5.23`` is installed with ``--no-deps`` (its metadata pins ``torch==2.14.1`` and
``transformers==5.19.0`` and CUDA wheels). Its model modules import the server stack at package import, so the
**real** pure-Python (or CPU-built) dependencies that this import chain reaches are installed, each with
``--no-deps`` so nothing moves torch / transformers / megatron-core (:data:`CPU_PACKAGES`, the exact line is
:data:`INSTALL_COMMAND`). ``triton`` is the real PyPI wheel: it imports without a GPU (only kernel launches need
one), so SGLang's triton-decorated definitions (which a stub triton broke in ``CpuSRTPlatform``'s class body,
``platforms/cpu.py:119``) import as written.

SGLang runs as its own CPU engine: ``SGLANG_USE_CPU_ENGINE=1`` is set before the import (SGLang's switch,
``srt/utils/common.py:221-224``, read once into module constants such as ``rotary_embedding/base.py``'s
``_is_cpu``; without it ``RotaryEmbedding`` asks for ``vllm._custom_ops``). Its distributed / TP groups are
set up as SGLang's own layer tests do (``sglang/test/layer_ut_utils.py``: ``init_single_process_dist``, and
``sglang/test/test_utils.py``: ``publish_build_topology``): ``init_distributed_environment`` (gloo, world 1; a
``tcp://`` store on a free port, or the process group that already exists), ``publish(ServerArgs(...))`` and
``initialize_model_parallel(backend="gloo")``. ``sglang.test.test_utils`` itself is not imported: it pulls
``sglang.benchmark`` -> ``datasets``; its ``publish_build_topology`` is three calls of SGLang's runtime-context
API, made here the same way. The model config comes from SGLang's own loader
(``srt/utils/hf_transformers/config.py``: ``get_config`` on a written ``config.json``, which flattens Gemma 4's
per-layer head dims for the ``gemma4`` wrapper).

Stubs (only for code that needs CUDA kernels; nothing of SGLang is replaced):

* ``sgl_kernel`` -- SGLang's compiled kernel package (``sglang-kernel``/``sgl-kernel`` on PyPI is built against
  CUDA torch; the CPU build its CPU engine uses is not on PyPI). A module whose every attribute is a callable
  that raises when called; it is not a package, so ``from sgl_kernel.<sub> import ...`` raises ``ImportError``
  and SGLang's own fallbacks run (e.g. ``quantization/utils.py:get_scalar_types``). Only looked up at import,
  by the CPU engine's branches (``kernels/ops/kvcache/cache_move.py:10`` ``copy_all_layer_kv_cache_cpu``,
  ``srt/mem_cache/allocation.py:46``, ``kernels/ops/speculative/eagle.py:10`` / ``spec_tree.py:43`` and the
  cache-location / tree kernels: 8 names, recorded in ``accessed``); none is called by building the model or
  by ``load_weights`` (recorded in ``called``; the tests assert it stays empty).
* ``torchvision`` -- the only torchvision PyPI has is a CUDA build: its ``_C.so`` links ``libtorch_cuda.so`` /
  ``libc10_cuda.so``, which the CPU torch lacks, so ``import torchvision`` dies at
  ``torchvision/_meta_registrations.py:163`` (``operator torchvision::nms does not exist``). SGLang imports it
  for other models' image preprocessing (``srt/multimodal/internvl_utils.py:5``, ``srt/configs/deepseek_ocr.py:7``
  via ``srt/configs/__init__``). The stub exists only while SGLang's modules import and is removed from
  ``sys.modules`` afterwards (transformers' ``is_torchvision_available`` is evaluated, and cached as False,
  before it), so nothing else in the process sees a torchvision.

Side effects on the process (why tests using this run in one xdist group): ``SGLANG_USE_CPU_ENGINE=1`` in
``os.environ``; ``import sglang`` applies SGLang's transformers patches
(``srt/utils/hf_transformers_patches.py:apply_all``: relaxes ``standardize_rope_params`` for a missing
``max_position_embeddings`` and ``validate_layer_type`` for MTP layers, re-exports ``LlamaFlashAttention2``,
image-processor kwargs); a world-1 gloo process group (reused if one exists) and SGLang's model-parallel groups.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import json
import os
import re
import socket
import sys
import tempfile
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gemma4.errors import InvalidInputError

SGLANG_VERSION = "0.5.23"

#: The real packages SGLang's Gemma 4 import chain needs here beyond the project's own dependencies, as
#: ``name==version`` (each ``--no-deps``; every one is imported by it: checked against ``sys.modules``).
CPU_PACKAGES: tuple[str, ...] = (
    f"sglang=={SGLANG_VERSION}",
    "triton==3.9.0",
    "orjson==3.13.0",
    "pybase64==1.5.1",
    "requests==2.34.2",
    "urllib3==2.8.0",
    "certifi==2026.10.19.post1",
    "charset_normalizer==3.5.3",
    "starlette==1.10.0",
    "msgspec==0.23.0",
    "pyzmq==27.3.0",
    "ipython==9.19.1",
    "traitlets==5.16.1",
    "aiohttp==3.14.5",
    "aiohappyeyeballs==2.7.1",
    "aiosignal==1.4.0",
    "attrs==26.1.0",
    "frozenlist==1.8.0",
    "multidict==7.2.1",
    "propcache==0.5.4",
    "yarl==1.25.1",
    "apache-tvm-ffi==0.1.11",
    "dill==0.4.1",
    "sentencepiece==0.2.1",
    "compressed-tensors==0.18.0",
    "loguru==0.7.3",
    "gguf==0.19.0",
    "einops==0.8.2",
    "openai==2.8.0",
    "httpx==0.29.0",
    "distro==1.9.0",
    "sniffio==1.3.1",
    "partial_json_parser==0.2.1.1.post7",
)
#: How to install them (what ``tox -e unit`` runs).
INSTALL_COMMAND = "python -m pip install --no-deps " + " ".join(CPU_PACKAGES)

#: Stubbed modules and why (see the module docstring).
STUBS: dict[str, str] = {
    "sgl_kernel": "compiled kernel package; PyPI's wheel is a CUDA build, the CPU build is not on PyPI",
    "torchvision": "PyPI's wheel is a CUDA build (_C.so links libtorch_cuda); only during SGLang's import",
}


class SGLangUnavailable(InvalidInputError):
    """SGLang 0.5.23 (or a package its Gemma 4 import chain needs) is not importable here."""


# ---- stubs ---------------------------------------------------------------------------------------------------


class _KernelStub(types.ModuleType):
    """A module whose attributes are callables that raise: a compiled CUDA-kernel package that is not here.

    Records every attribute SGLang looked up (``accessed``) so a test can show nothing was called."""

    def __init__(self, name: str, *, package: bool = False) -> None:
        super().__init__(name)
        self.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
        if package:
            self.__path__ = []
        self.accessed: set[str] = set()
        self.called: list[str] = []

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        self.accessed.add(attr)
        stub = self

        class _Missing:
            """Stand-in for ``{module}.{attr}``: usable as a name or base class, raises when called."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                stub.called.append(attr)
                raise RuntimeError(f"{stub.__name__}.{attr} is a CPU stub (needs a CUDA kernel)")

            def __class_getitem__(cls, item: Any) -> type:
                return cls

        _Missing.__name__ = _Missing.__qualname__ = attr
        _Missing.__module__ = self.__name__
        setattr(self, attr, _Missing)
        return _Missing


class _StubPackageFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``root`` and any ``root.<sub>`` to a :class:`_KernelStub` package (the torchvision stub)."""

    def __init__(self, root: str) -> None:
        self.root = root

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname == self.root or fullname.startswith(self.root + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _KernelStub(spec.name, package=True)

    def exec_module(self, module: types.ModuleType) -> None:
        return None


# ---- import ----------------------------------------------------------------------------------------------------

_MODULES: dict[str, types.ModuleType] = {}
#: The first failed import (re-raised on every later call; see import_sglang_gemma4).
_FAILED: list[SGLangUnavailable] = []


def _check_version() -> None:
    try:
        got = importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        raise SGLangUnavailable(
            f"sglang=={SGLANG_VERSION} is not installed; install it and the CPU import chain's packages: "
            f"{INSTALL_COMMAND}"
        ) from None
    if got != SGLANG_VERSION:
        raise SGLangUnavailable(f"pinned to sglang=={SGLANG_VERSION} (line numbers cited), got {got}")


def import_sglang_gemma4() -> dict[str, types.ModuleType]:
    """Import SGLang's ``gemma4_causal`` and ``gemma4_mm`` (and its config loader) on CPU, once per process.

    Returns ``{"causal", "mm", "config", "parallel_state", "runtime_context", "server_args", "sgl_kernel"}``.
    Raises :class:`SGLangUnavailable` (with :data:`INSTALL_COMMAND`) when sglang or a package of its import
    chain is missing."""
    if _MODULES:
        return _MODULES
    if _FAILED:  # a failed import leaves half of sglang's packages in sys.modules: never retry it
        raise _FAILED[0]
    _check_version()
    already = [m for m in sys.modules if m == "sglang" or m.startswith("sglang.")]
    if already and os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
        raise SGLangUnavailable(
            "sglang was imported before SGLANG_USE_CPU_ENGINE=1 was set; its CPU switch is read at import"
        )
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()  # cached (lru_cache) before the torchvision stub exists
    kernels = sys.modules.get("sgl_kernel")
    if kernels is None:
        kernels = _KernelStub("sgl_kernel")
        sys.modules["sgl_kernel"] = kernels
    vision = _StubPackageFinder("torchvision") if importlib.util.find_spec("torchvision") is None else None
    if vision is not None:
        sys.meta_path.insert(0, vision)
    try:
        mods = {
            "causal": importlib.import_module("sglang.srt.models.gemma4_causal"),
            "mm": importlib.import_module("sglang.srt.models.gemma4_mm"),
            "config": importlib.import_module("sglang.srt.utils.hf_transformers.config"),
            "parallel_state": importlib.import_module("sglang.srt.distributed.parallel_state"),
            "runtime_context": importlib.import_module("sglang.srt.runtime_context"),
            "server_args": importlib.import_module("sglang.srt.server_args"),
            "fused_moe": importlib.import_module("sglang.srt.layers.moe.fused_moe_triton.layer"),
        }
    except ImportError as exc:
        _FAILED.append(
            SGLangUnavailable(
                f"importing SGLang's Gemma 4 model on CPU failed ({type(exc).__name__}: {exc}); "
                f"install the import chain's packages: {INSTALL_COMMAND}"
            )
        )
        raise _FAILED[0] from exc
    finally:
        if vision is not None:
            sys.meta_path.remove(vision)
            for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[name]
    mods["sgl_kernel"] = kernels
    _MODULES.update(mods)
    return _MODULES


def require_sglang() -> dict[str, types.ModuleType]:
    """:func:`import_sglang_gemma4` for a test: when SGLang is not importable it skips with the reason and
    :data:`INSTALL_COMMAND`, and fails instead under ``GEMMA4_REQUIRE_SHARED=1`` (CI), as
    ``tests/conftest.py:require_reference_data`` does for reference data."""
    import pytest

    from harness.reference_data import REQUIRE_SHARED_ENV

    try:
        return import_sglang_gemma4()
    except SGLangUnavailable as exc:
        if os.environ.get(REQUIRE_SHARED_ENV, "").strip() not in ("", "0"):
            pytest.fail(
                f"{exc} [{REQUIRE_SHARED_ENV}=1: SGLang's CPU import is required here]", pytrace=False
            )
        pytest.skip(str(exc))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_sglang_parallel() -> None:
    """SGLang's distributed environment and model-parallel groups at world 1 (TP 1, EP 1, PP 1), as
    ``sglang/test/layer_ut_utils.py:init_single_process_dist`` sets them up (gloo). Idempotent."""
    mods = import_sglang_gemma4()
    ps, rc = mods["parallel_state"], mods["runtime_context"]
    if ps.model_parallel_is_initialized():
        return
    ps.init_distributed_environment(
        world_size=1,
        rank=0,
        local_rank=0,
        backend="gloo",
        distributed_init_method=f"tcp://127.0.0.1:{_free_port()}",
    )
    # sglang/test/test_utils.py:publish_build_topology(tp_size=1, ep_size=1, pp_size=1)
    rc.reset_context()
    rc.publish(
        mods["server_args"].ServerArgs(model_path="dummy", tp_size=1, ep_size=1, pp_size=1),
        role="test",
        ranks=rc.SpawnRanks(world_rank=0),
    )
    if ps._WORLD is not None:
        rc.get_parallel().override_permanently(world_group=ps._WORLD)
    ps.initialize_model_parallel(backend="gloo")


# ---- config and model --------------------------------------------------------------------------------------------


#: A tiny ``Gemma4VisionConfig`` for the conditional-generation layout (SGLang's
#: ``Gemma4ForConditionalGeneration`` always builds a vision tower; weight sync never writes it).
TINY_VISION_CONFIG: dict[str, Any] = {
    "model_type": "gemma4_vision",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "patch_size": 4,
    "pooling_kernel_size": 2,
    "position_embedding_size": 64,
}


def sglang_config(text_config: dict[str, Any]) -> Any:
    """The ``Gemma4Config`` SGLang's own loader (``get_config``) makes of a ``gemma4`` wrapper ``config.json``
    whose ``text_config`` is ``text_config`` (the wrapper is what SGLang flattens; see
    ``tests/unit/gemma4/conversion/test_sglang_config.py``)."""
    mods = import_sglang_gemma4()
    with tempfile.TemporaryDirectory(prefix="sglang-cfg-") as tmp:
        wrapper = {
            "model_type": "gemma4",
            "architectures": ["Gemma4ForConditionalGeneration"],
            "text_config": dict(text_config),
            "vision_config": dict(TINY_VISION_CONFIG),
        }
        (Path(tmp) / "config.json").write_text(json.dumps(wrapper))
        return mods["config"].get_config(tmp, trust_remote_code=False)


def build_sglang_model(
    text_config: dict[str, Any], layout: str, *, dtype: torch.dtype = torch.float32, config: Any = None
) -> torch.nn.Module:
    """SGLang's ``Gemma4ForCausalLM`` (``layout="causal"``, built from the flattened text config) or
    ``Gemma4ForConditionalGeneration`` (``"conditional"``, from the wrapper config), on CPU, in ``dtype``.
    ``config``: a ``Gemma4Config`` SGLang's loader already made (e.g. of an exported directory) instead of
    the one :func:`sglang_config` makes of ``text_config``."""
    mods = import_sglang_gemma4()
    init_sglang_parallel()
    config = sglang_config(text_config) if config is None else config
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cpu"):
            if layout == "causal":
                return mods["causal"].Gemma4ForCausalLM(config.text_config)
            if layout == "conditional":
                return mods["mm"].Gemma4ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    raise InvalidInputError(f"unknown layout {layout!r}; expected 'causal' or 'conditional'")


# ---- recording load_weights ----------------------------------------------------------------------------------------


@dataclass
class LoadRecord:
    """What SGLang's ``load_weights`` did with each emitted tensor.

    ``calls``: ``(emitted name, SGLang parameter name, shard id, expert id)`` per ``weight_loader`` call, in
    order; ``skipped``: emitted names for which no loader ran (SGLang's ``continue``); ``loaded``: the set
    ``load_weights`` returned."""

    calls: list[tuple[str, str, Any, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    loaded: set[str] = field(default_factory=set)


def _shard_and_expert(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    """The ``(shard_id, expert_id)`` of a ``weight_loader(param, tensor, ...)`` call, as SGLang passes them
    (QKV / merged-column loaders: ``(param, w, shard_id)``; FusedMoE: ``(param, w, name, shard_id, expert_id)``
    or keywords)."""
    shard, expert = kwargs.get("shard_id"), kwargs.get("expert_id")
    rest = args[2:]
    if (
        rest
        and isinstance(rest[0], str)
        and (len(rest) >= 2 or "shard_id" in kwargs or "expert_id" in kwargs)
    ):
        rest = rest[1:]  # FusedMoE's weight_name
    if rest and shard is None:
        shard = rest[0]
        rest = rest[1:]
    if rest and expert is None:
        expert = rest[0]
    return shard, expert


def run_load_weights(model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> LoadRecord:
    """Run SGLang's own ``model.load_weights(weights)`` and record every ``weight_loader`` call.

    Observation only: each parameter's ``weight_loader`` is wrapped (the original runs), and
    ``default_weight_loader`` (looked up in the model module for parameters and buffers without a loader) is
    wrapped in that module for the duration. ``weights`` is fed one tensor at a time, so the calls made
    between two pulls belong to the tensor pulled first; a tensor that caused none was skipped."""
    mods = import_sglang_gemma4()
    record = LoadRecord()
    names = {id(p): n for n, p in model.named_parameters()}
    names.update({id(b): n for n, b in model.named_buffers()})
    current: list[str] = []

    def recorder(loader: Any) -> Any:
        def call(param: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            shard, expert = _shard_and_expert((param, *args), kwargs)
            record.calls.append((current[-1], names.get(id(param), "?"), shard, expert))
            return loader(param, *args, **kwargs)

        call.__wrapped__ = loader  # type: ignore[attr-defined]
        return call

    originals: list[tuple[torch.Tensor, Any]] = []
    for _, p in model.named_parameters():
        if hasattr(p, "weight_loader") and not hasattr(p.weight_loader, "__wrapped__"):
            originals.append((p, p.weight_loader))
            p.weight_loader = recorder(p.weight_loader)
    module_globals = [mods["causal"], mods["mm"]]
    default_originals = [(m, m.default_weight_loader) for m in module_globals]
    for m, loader in default_originals:
        m.default_weight_loader = recorder(loader)

    def feed() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            before = len(record.calls)
            current.append(name)
            yield name, tensor
            if len(record.calls) == before:
                record.skipped.append(name)

    try:
        with torch.no_grad():
            loaded = model.load_weights(feed())
    finally:
        for p, loader in originals:
            p.weight_loader = loader
        for m, loader in default_originals:
            m.default_weight_loader = loader
    # the last tensor's calls happen after its yield, before the generator ends: checked on exhaustion above
    record.loaded = set(loaded or ())
    return record


_LAYER = re.compile(r"layers\.(\d+)\.")


def k_eq_v_layers(text_config: Any) -> set[int]:
    """Full-attention layers of a K=V config (HF has no ``v_proj`` there; V is K)."""
    if not getattr(text_config, "attention_k_eq_v", False):
        return set()
    return {i for i, kind in enumerate(text_config.layer_types) if kind == "full_attention"}


def expected_sglang_state(
    hf_full: dict[str, torch.Tensor],
    text_config: Any,
    *,
    prefix: str = "model.",
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, torch.Tensor]:
    """What SGLang's parameters must hold after loading HF weights ``hf_full`` (text names ``model.X``), stated
    from HF's tensors and SGLang's documented layouts, independently of its loaders: ``qkv_proj = [q; k; v]``
    (``v = k`` on K=V layers, which have no ``v_proj``), ``mlp.gate_up_proj = [gate; up]``,
    ``moe.experts.w13_weight = experts.gate_up_proj`` ([E, 2I, H], ``[w1=gate; w3=up]``),
    ``moe.experts.w2_weight = experts.down_proj``, ``router.per_expert_scale`` as ``moe.per_expert_scale``;
    everything else under its HF name. ``prefix`` replaces ``model.`` (``model.language_model.`` for the
    conditional-generation layout)."""
    kv = k_eq_v_layers(text_config)
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    gate_up: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in hf_full.items():
        name = prefix + name[len("model.") :] if name.startswith("model.") else name
        m = re.match(r"^(.*\.self_attn)\.([qkv])_proj\.weight$", name)
        if m:
            parts = qkv.setdefault(f"{m.group(1)}.qkv_proj.weight", {})
            parts[m.group(2)] = t
            layer = _LAYER.search(name)
            if m.group(2) == "k" and layer is not None and int(layer.group(1)) in kv:
                parts["v"] = t
            continue
        m = re.match(r"^(.*\.mlp)\.(gate|up)_proj\.weight$", name)
        if m:
            gate_up.setdefault(f"{m.group(1)}.gate_up_proj.weight", {})[m.group(2)] = t
            continue
        name = name.replace(".router.per_expert_scale", ".moe.per_expert_scale")
        name = name.replace(".experts.gate_up_proj", ".moe.experts.w13_weight")
        name = name.replace(".experts.down_proj", ".moe.experts.w2_weight")
        out[name] = t
    for name, parts in qkv.items():
        if "k" in parts:
            out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
            continue
        if shapes is None or name not in shapes:
            raise InvalidInputError(f"{name}: HF has only q_proj (a KV-shared layer); pass SGLang's shapes")
        rest = torch.full((shapes[name][0] - parts["q"].shape[0], *parts["q"].shape[1:]), float("nan"))
        out[name] = torch.cat([parts["q"], rest.to(parts["q"].dtype)], dim=0)
    for name, parts in gate_up.items():
        out[name] = torch.cat([parts["gate"], parts["up"]], dim=0)
    layers = int(text_config.num_hidden_layers)
    shared = set(range(layers - int(getattr(text_config, "num_kv_shared_layers", 0) or 0), layers))
    for name, shape in (shapes or {}).items():
        layer = _LAYER.search(name)
        if (
            name.endswith(".self_attn.k_norm.weight")
            and name not in out
            and layer
            and int(layer.group(1)) in shared
        ):
            out[name] = torch.full(shape, float("nan"))  # SGLang builds it; a KV-shared layer never uses it
    return out


def poison(model: torch.nn.Module, names: Iterable[str]) -> None:
    """Fill the named parameters / buffers with NaN, so a region ``load_weights`` never writes shows."""
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    with torch.no_grad():
        for name in names:
            if name in state and state[name].is_floating_point():
                state[name].fill_(float("nan"))


def routing_failures(record: LoadRecord) -> list[str]:
    """The routing failures of one recorded load: each emitted name SGLang skipped (no ``weight_loader`` ran),
    and each ``weight_loader`` slot (parameter, shard, expert) written more than once, naming both writers."""
    failures = [f"skipped by SGLang (no weight_loader ran): {n}" for n in record.skipped]
    seen: dict[tuple[str, Any, Any], str] = {}
    for emitted, pname, shard, expert in record.calls:
        key = (pname, shard, expert)
        if key in seen:
            failures.append(
                f"written twice: {pname} shard={shard} expert={expert} (by {seen[key]} and {emitted})"
            )
        seen.setdefault(key, emitted)
    return failures


#: An index into one SGLang tensor: rows ``[start, stop)`` of dim 0 (``None``: the whole tensor).
RowSlice = tuple[int, int] | None


def hf_sources_in_sglang(
    model: torch.nn.Module, hf_shapes: dict[str, tuple[int, ...]], *, prefix: str = "model."
) -> dict[str, tuple[str, RowSlice]]:
    """The inverse of :func:`expected_sglang_state`: for each HF tensor (text names ``model.X``, shapes
    ``hf_shapes``), the SGLang parameter or buffer that holds it and the rows it occupies there --
    ``q`` / ``k`` / ``v`` rows of ``qkv_proj`` (``[q; k; v]``; a K=V or KV-shared layer's HF tensors cover
    only some of them), the ``gate`` / ``up`` halves of ``mlp.gate_up_proj``, ``experts.gate_up_proj`` /
    ``experts.down_proj`` as the whole ``moe.experts.w13_weight`` / ``w2_weight`` ([E, 2I, H] = ``[w1; w3]``
    per expert, [E, H, I]), ``router.per_expert_scale`` as ``moe.per_expert_scale``; else the same name.
    Raises :class:`InvalidInputError` naming an HF tensor SGLang has no parameter (or the shape) for."""
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    out: dict[str, tuple[str, RowSlice]] = {}
    for name, shape in hf_shapes.items():
        sg = prefix + name[len("model.") :] if name.startswith("model.") else name
        rows: RowSlice = None
        m = re.match(r"^(.*\.self_attn)\.([qkv])_proj\.weight$", sg)
        g = re.match(r"^(.*\.mlp)\.(gate|up)_proj\.weight$", sg)
        if m:
            q_rows = hf_shapes[name.replace(f".{m.group(2)}_proj.", ".q_proj.")][0]
            k_rows = hf_shapes.get(name.replace(f".{m.group(2)}_proj.", ".k_proj."), (0,))[0]
            start = {"q": 0, "k": q_rows, "v": q_rows + k_rows}[m.group(2)]
            sg, rows = f"{m.group(1)}.qkv_proj.weight", (start, start + shape[0])
        elif g:
            start = 0 if g.group(2) == "gate" else shape[0]
            sg, rows = f"{g.group(1)}.gate_up_proj.weight", (start, start + shape[0])
        else:
            sg = sg.replace(".router.per_expert_scale", ".moe.per_expert_scale")
            sg = sg.replace(".experts.gate_up_proj", ".moe.experts.w13_weight")
            sg = sg.replace(".experts.down_proj", ".moe.experts.w2_weight")
        if sg not in state:
            raise InvalidInputError(f"SGLang's {type(model).__name__} has no parameter for HF tensor {name}")
        got = tuple(state[sg].shape) if rows is None else (rows[1] - rows[0], *state[sg].shape[1:])
        if got != tuple(shape) or (rows is not None and rows[1] > state[sg].shape[0]):
            raise InvalidInputError(f"HF tensor {name} {tuple(shape)} does not fit SGLang's {sg} at {rows}")
        out[name] = (sg, rows)
    return out


def load_failures(
    model: torch.nn.Module,
    record: LoadRecord,
    expected: dict[str, torch.Tensor],
    *,
    trained: Iterable[str] | None = None,
) -> list[str]:
    """Failures of one SGLang load (empty = pass): an emitted name SGLang skipped; a ``weight_loader`` slot
    (parameter, shard, expert) written more than once; a parameter of the model with no expected value
    (``trained``, default: every parameter) or an expected name with no parameter; a value that differs from
    ``expected`` (NaN where nothing was written, if the model was :func:`poison`-ed)."""
    failures = routing_failures(record)
    state = dict(model.named_parameters())
    state.update({n: b for n, b in model.named_buffers() if n in expected})
    names = set(state) if trained is None else set(trained)
    for name in sorted(names - set(expected)):
        failures.append(f"SGLang parameter with no HF source: {name}")
    for name in sorted(set(expected) - set(state)):
        failures.append(f"no SGLang parameter for HF tensor: {name}")
    for name in sorted(names & set(expected)):
        got, want = state[name].detach(), expected[name]
        if tuple(got.shape) != tuple(want.shape):
            failures.append(f"wrong shape: {name} {tuple(got.shape)} != {tuple(want.shape)}")
        elif not torch.equal(got.isnan(), want.isnan()) or not torch.equal(
            got.nan_to_num(0.0), want.to(got.dtype).nan_to_num(0.0)
        ):
            bad = int((~torch.isclose(got, want.to(got.dtype), rtol=0, atol=0, equal_nan=True)).sum())
            failures.append(f"wrong values: {name} ({bad} of {got.numel()} elements)")
    return failures


# ---- what slime hands SGLang -----------------------------------------------------------------------------------

#: The HF name prefix SGLang's loader receives per layout (the converter's, from ``args.hf_config``).
EMIT_PREFIX = {"causal": "model.", "conditional": "model.language_model."}
#: The prefix of SGLang's own text parameters per layout (``Gemma4ForConditionalGeneration`` strips ``model.``).
PARAM_PREFIX = {"causal": "model.", "conditional": "language_model."}


@functools.cache
def preset_states(preset: str) -> tuple[dict[str, Any], Any, dict[str, torch.Tensor], torch.nn.Module]:
    """``(config dict, HF text config, HF weights as model.X, Megatron model holding them)`` of a preset
    (HF's reference model, seed 3, float32; cached per process)."""
    from gemma4.config import hf_text_config_from_any
    from harness.presets import preset_config_dict
    from harness.reference import build_reference_model, hf_text_state_dict
    from harness.testing.conversion import megatron_state_from_hf

    raw = preset_config_dict(preset)
    cfg = hf_text_config_from_any(raw)
    rel = hf_text_state_dict(build_reference_model(cfg, torch.float32, seed=3))
    full = {(k if k == "lm_head.weight" else "model." + k): v for k, v in rel.items()}
    if cfg.tie_word_embeddings:
        full.pop("lm_head.weight", None)
    return raw, cfg, full, megatron_state_from_hf(cfg, rel, torch.float32)


def num_experts(text_config: Any) -> int:
    """Experts per MoE layer (0 for a dense model)."""
    if not getattr(text_config, "enable_moe_block", False):
        return 0
    return int(getattr(text_config, "num_experts", 0) or 0)


_LOCAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")


def slime_names(
    model: torch.nn.Module, experts: int, ep: int, *, global_names: bool
) -> list[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` as slime's converter receives them at EP ``ep`` (TP 1): Megatron names with
    ``module.module.``; expert ``g`` lives on EP rank ``g // (E/ep)`` as ``local_experts.{g % (E/ep)}``, which
    slime keeps rank-local (``update_weight/common.py:232``) unless renamed to the global index
    (``slime_global_expert_name``, ``global_names``); EP ranks' lists follow one another
    (``update_weight_from_distributed.py:238``). ``layer_scalar`` is a buffer slime does not walk
    (``common.py:235-252``): :func:`emit_for_sglang` adds it from the HF weights."""
    from gemma4.slime.weight_sync import slime_global_expert_name

    per_rank = experts // ep if experts else 0
    plain: list[tuple[str, torch.Tensor]] = []
    by_rank: list[list[tuple[str, torch.Tensor]]] = [[] for _ in range(ep)]
    for name, t in model.state_dict().items():
        if name.endswith("_extra_state") or name.endswith("layer_scalar"):
            continue
        m = _LOCAL_EXPERT.search(name)
        if m is None:
            plain.append(("module.module." + name, t))
            continue
        rank, i = divmod(int(m.group(1)), per_rank)
        local = "module.module." + _LOCAL_EXPERT.sub(f".mlp.experts.local_experts.{i}.", name)
        renamed = slime_global_expert_name(local, rank, ep, experts) if global_names else local
        by_rank[rank].append((renamed, t))
    return plain + [pair for rank in by_rank for pair in rank]


def slime_hf_config(raw: dict[str, Any], layout: str) -> dict[str, Any]:
    """``args.hf_config`` as slime passes it: the text config (causal) or the ``gemma4`` wrapper."""
    if layout == "causal":
        return raw
    return {"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"], "text_config": raw}


def emit_for_sglang(
    preset: str, layout: str, ep: int, *, global_names: bool = True, ep_told: int | None = None
) -> list[tuple[str, torch.Tensor]]:
    """What ``convert_gemma4_to_hf`` emits for ``preset`` in ``layout`` at EP ``ep`` (``args`` telling it
    ``ep_told``, default ``ep``), then the ``layer_scalar`` buffers under the layout's prefix."""
    from gemma4.slime.weight_sync import convert_gemma4_to_hf

    raw, cfg, full, model = preset_states(preset)
    told = ep if ep_told is None else ep_told
    args = types.SimpleNamespace(hf_config=slime_hf_config(raw, layout), expert_model_parallel_size=told)
    named = slime_names(model, num_experts(cfg), ep, global_names=global_names)
    emitted = [pair for n, t in named for pair in convert_gemma4_to_hf(args, n, t)]
    prefix = EMIT_PREFIX[layout]
    emitted += [(prefix + k[len("model.") :], v) for k, v in full.items() if k.endswith("layer_scalar")]
    return emitted


def load_into_sglang(
    preset: str, layout: str, emitted: Iterable[tuple[str, torch.Tensor]]
) -> tuple[torch.nn.Module, LoadRecord, list[str]]:
    """Build SGLang's model for ``preset`` / ``layout``, :func:`poison` it, run its ``load_weights`` on
    ``emitted``: ``(model, record, failures)`` (:func:`load_failures` against the preset's HF weights; the
    trained tensors are SGLang's text parameters and the buffers HF saves (``layer_scalar``); the vision
    tower is not weight sync's)."""
    raw, cfg, full, _ = preset_states(preset)
    model = build_sglang_model(raw, layout)
    record, failures = load_and_check(model, layout, full, cfg, emitted)
    return model, record, failures


def load_and_check(
    model: torch.nn.Module,
    layout: str,
    hf_full: dict[str, torch.Tensor],
    text_config: Any,
    weights: Iterable[tuple[str, torch.Tensor]],
) -> tuple[LoadRecord, list[str]]:
    """:func:`poison` SGLang's ``model`` (``layout``), run its ``load_weights`` on ``weights`` and return the
    record and :func:`load_failures` against ``hf_full`` (HF text weights as ``model.X``; ``text_config``:
    the HF text config). The trained tensors are SGLang's text parameters and the buffers HF saves
    (``layer_scalar``); a vision tower is not weight sync's."""
    prefix = PARAM_PREFIX[layout]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    expected = expected_sglang_state(hf_full, text_config, prefix=prefix, shapes=shapes)
    text = {n for n in shapes if n.startswith(prefix) or n == "lm_head.weight"}
    text |= {n for n, _ in model.named_buffers() if n in expected}  # layer_scalar: a buffer HF saves
    poison(model, set(expected) | text)
    record = run_load_weights(model, weights)
    return record, load_failures(model, record, expected, trained=text)


def install() -> int:
    """Install :data:`CPU_PACKAGES` with ``--no-deps`` into this interpreter (``tox -e unit`` and
    ``tox -e mutation`` run ``python -m harness.testing.sglang_cpu``): the one list of what SGLang's CPU
    import needs."""
    import subprocess

    return subprocess.call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *CPU_PACKAGES])


if __name__ == "__main__":
    sys.exit(install())
