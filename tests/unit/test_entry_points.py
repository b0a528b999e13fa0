"""Every entry point a user calls is executed by at least one test (issue 17, "coverage of what users call").

Three lists, each checked against the code so that it cannot go stale:

* **every CLI flag** of every ``gemma4-harness`` subcommand (read from the parser itself) appears, with its
  subcommand, in a test module's string constants, i.e. some test passes it on a command line;
* **every ``gemma4.*`` path the README tells a user to pass** (slime flags, hooks) imports, and a test
  module names it;
* **the model's and converters' entry points** (:data:`ENTRY_POINTS`) each name the test that runs them, and
  that test exists.

Catches: a new flag or README entry point shipped without a test; a test renamed or deleted so that an entry
point silently loses its only check.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
from functools import cache
from pathlib import Path

import pytest

from harness.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"

#: (subcommand path, flag) -> why no test passes it on a command line. Keep it short: each entry is a flag
#: a user can pass that only the GPU stage runs.
UNRUN_FLAGS: dict[tuple[str, str], str] = {
    ("e2e-gsm8k", "--strict-localhost"): (
        "only a real run (GPU) has listeners to gate; the gate itself: "
        "tests/unit/harness/gsm8k/test_metrics_gates.py::test_localhost_listeners_are_reported_or_gated"
    ),
}

#: What a user calls that is not a CLI flag -> the test that executes it (``path::function``).
ENTRY_POINTS: dict[str, str] = {
    "Gemma4Model.forward, no labels (logits), every preset and dtype": (
        "tests/unit/gemma4/model/test_model_parity.py::test_presets"
    ),
    "Gemma4Model.forward with labels (per-token loss), tied and untied heads": (
        "tests/unit/gemma4/model/test_forward_labels.py::test_loss_with_labels_equals_hf_cross_entropy"
    ),
    "Gemma4Model.forward, packed rows / CP / TP / SP (forked ranks)": (
        "tests/unit/gemma4/model/parallel/test_parallel_parity.py::test_layout_fp64_forward_and_gradients"
    ),
    "Gemma4Model.forward, untied head, hypothesis-drawn configs": (
        "tests/unit/gemma4/model/test_model_parity.py::test_fp64_forward_and_gradients"
    ),
    "Gemma4Model.forward, E2B/E4B (PLE, KV sharing), packed and CP": (
        "tests/unit/gemma4/model/eseries/test_eseries_parity.py::test_layouts"
    ),
    "HF -> Megatron -> HF (safetensors), TP/EP": (
        "tests/unit/gemma4/conversion/test_conversion_cli.py::test_roundtrip_moe_expert_parallel"
    ),
    "Megatron checkpoint -> logits equal HF": (
        "tests/unit/gemma4/conversion/test_conversion_cli.py::test_converted_megatron_model_logits_equal_hf"
    ),
    "torch_dist checkpoints (Megatron's own loader)": (
        "tests/unit/gemma4/conversion/test_conversion_torch_dist.py::test_megatron_loads_torch_dist_and_logits_equal_hf"
    ),
    "streaming Megatron -> HF (slime weight sync)": (
        "tests/unit/gemma4/conversion/test_conversion_streaming.py::test_streaming_equals_hf_state_dict"
    ),
    "slime convert_to_hf dispatch by --model-name": (
        "tests/unit/gemma4/conversion/test_conversion_streaming.py::test_convert_to_hf_dispatches"
    ),
    "Megatron checkpoints <-> Megatron-Bridge 0.6.2 layout (both ways)": (
        "tests/unit/gemma4/conversion/test_megatron_bridge.py::test_cli_relayout_both_ways"
    ),
    "Megatron-Bridge's own torch_dist checkpoints -> HF": (
        "tests/unit/gemma4/conversion/test_megatron_bridge_torch_dist.py::test_cli_mcore_to_hf_bit_exact"
    ),
    "HF export SGLang starts from (--for sglang), through SGLang's own loader": (
        "tests/unit/gemma4/conversion/test_sglang_config.py::test_sglang_model_config_flattens_the_export"
    ),
    "weight sync into SGLang's own load_weights": (
        "tests/unit/gemma4/slime/test_sglang_real_load.py::test_sglang_loads_every_emitted_tensor_once_with_hf_values"
    ),
    "slime's update_weight gathering on forked TP/EP ranks": (
        "tests/unit/gemma4/slime/test_slime_update_weight_ranks.py::test_slime_gathers_and_names_our_model_into_hf_state_dict"
    ),
    "slime model provider": "tests/unit/gemma4/slime/test_slime_entry_points.py::test_model_provider_builds_our_model",
    "slime spec (--spec)": "tests/unit/gemma4/slime/test_slime_entry_points.py::test_spec_is_our_decoder_block_spec",
    "slime _LOADERS (HF -> Megatron in slime)": (
        "tests/unit/gemma4/slime/test_slime_contract.py::test_slime_hf_loader_loads_gemma4_with_layer_scalar"
    ),
    "slime loss mask (--loss-mask-type gemma4)": (
        "tests/unit/gemma4/slime/test_slime_contract.py::test_loss_mask_type_gemma4_through_slimes_parser"
    ),
    "slime SFT rollout masks": "tests/unit/gemma4/slime/test_slime_contract.py::test_slime_sft_rollout_builds_gemma4_masks",
    "slime weight sync at EP > 1 (global expert names)": (
        "tests/unit/gemma4/slime/test_slime_contract.py::test_weight_sync_names_experts_globally_through_slimes_own_walk"
    ),
}


def _parsed_tests() -> list[tuple[Path, ast.AST]]:
    here = Path(__file__).resolve()
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(TESTS.rglob("*.py")) if p != here]


@cache
def _test_modules() -> dict[Path, frozenset[str]]:
    """Each test module's string constants, and their whitespace-separated words (``"--tp 2"``)."""
    out: dict[Path, frozenset[str]] = {}
    for path, tree in _parsed_tests():
        words: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                words.add(node.value)
                words.update(node.value.split())
        out[path] = frozenset(words)
    return out


@cache
def _test_references() -> dict[Path, tuple[frozenset[str], frozenset[str]]]:
    """Each test module's imported dotted names (``from a.b import c`` gives ``a.b`` and ``a.b.c``) and
    the identifiers it uses (names and attributes)."""
    out: dict[Path, tuple[frozenset[str], frozenset[str]]] = {}
    for path, tree in _parsed_tests():
        imports: set[str] = set()
        idents: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imports.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imports.add(node.module)
                imports.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Name):
                idents.add(node.id)
            elif isinstance(node, ast.Attribute):
                idents.add(node.attr)
        out[path] = (frozenset(imports), frozenset(idents))
    return out


def names_entry_point(
    path: str, imports: frozenset[str], idents: frozenset[str], words: frozenset[str]
) -> bool:
    """Whether a test module uses ``path`` (``module``, ``module.attr`` or ``module:attr``): it imports the
    module (or the attribute from it) and uses the attribute, or passes the path as a string (a slime flag)."""
    if path in words or any(path in w for w in words):
        return True
    dotted = path.replace(":", ".")
    if dotted in imports:
        return True
    module, _, attr = dotted.rpartition(".")
    return module in imports and attr in idents


def cli_flags(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], str]]:
    """``(subcommand path, --flag)`` for every visible long option of ``parser`` and its subparsers."""
    out: list[tuple[tuple[str, ...], str]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += cli_flags(sub, (*path, name))
        elif action.help != argparse.SUPPRESS and "--help" not in action.option_strings:
            out += [(path, opt) for opt in action.option_strings if opt.startswith("--")]
    return out


def flag_is_run(path: tuple[str, ...], flag: str, modules: dict[Path, frozenset[str]]) -> Path | None:
    """A test module holding the subcommand's words and ``flag`` (or ``flag=value``), else ``None``."""
    for module, words in modules.items():
        if all(p in words for p in path) and any(w == flag or w.startswith(flag + "=") for w in words):
            return module
    return None


ALL_FLAGS = cli_flags(build_parser())


@pytest.mark.parametrize("path, flag", ALL_FLAGS, ids=[" ".join((*p, f)) for p, f in ALL_FLAGS])
def test_every_cli_flag_is_run_by_a_test(path, flag):
    if (" ".join(path), flag) in UNRUN_FLAGS:
        assert UNRUN_FLAGS[(" ".join(path), flag)]
        return
    where = flag_is_run(path, flag, _test_modules())
    assert where is not None, f"no test runs `gemma4-harness {' '.join(path)} {flag}`"


def test_unrun_flags_exist():
    """An exemption for a flag that no longer exists is stale."""
    known = {(" ".join(p), f) for p, f in ALL_FLAGS}
    assert set(UNRUN_FLAGS) <= known, set(UNRUN_FLAGS) - known


def test_the_flag_check_can_fail():
    """The checker itself: a flag no module mentions is reported; one that is mentioned is found."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers().add_parser("parity")
    sub.add_argument("--never-tested-flag-xyz")
    sub.add_argument("--tp")
    flags = cli_flags(parser)
    assert flags == [(("parity",), "--never-tested-flag-xyz"), (("parity",), "--tp")]
    modules = {Path("a.py"): frozenset({"parity", "--tp"})}
    assert flag_is_run(("parity",), "--never-tested-flag-xyz", modules) is None
    assert flag_is_run(("parity",), "--tp", modules) == Path("a.py")
    assert flag_is_run(("convert",), "--tp", modules) is None


README_PATH = re.compile(r"\bgemma4\.[a-z_]+(?:\.[a-z_0-9]+)*(?::[A-Za-z_]+)?")


def readme_entry_points() -> list[str]:
    """``gemma4.*`` module / ``module.attr`` / ``module:attr`` paths the README tells users to pass."""
    return sorted(set(README_PATH.findall((REPO / "README.md").read_text())))


def _resolve(path: str) -> object:
    module, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module)
    except ModuleNotFoundError:
        module, _, attr = module.rpartition(".")
        obj = getattr(importlib.import_module(module), attr)
        return obj
    return getattr(obj, attr) if attr else obj


@pytest.mark.parametrize("path", readme_entry_points())
def test_readme_entry_points_import_and_are_tested(path):
    _resolve(path)  # raises if the README names something that does not exist
    words = _test_modules()
    tested = any(names_entry_point(path, i, n, words[p]) for p, (i, n) in _test_references().items())
    assert tested, f"the README tells users to pass {path}; no test names it"


def test_readme_names_entry_points():
    assert len(readme_entry_points()) >= 3


def test_the_entry_point_check_can_fail():
    empty: frozenset[str] = frozenset()
    imports = frozenset({"gemma4.slime", "gemma4.slime.hooks"})
    assert names_entry_point("gemma4.slime.hooks.install", imports, frozenset({"install"}), empty)
    assert not names_entry_point("gemma4.slime.hooks.install", imports, frozenset({"other"}), empty)
    assert not names_entry_point(
        "gemma4.chat.build_chat_mask", imports, frozenset({"build_chat_mask"}), empty
    )
    assert names_entry_point("gemma4.slime.spec", empty, empty, frozenset({"--spec=gemma4.slime.spec"}))


@pytest.mark.parametrize("what", sorted(ENTRY_POINTS))
def test_entry_point_has_its_test(what):
    file, _, func = ENTRY_POINTS[what].partition("::")
    path = REPO / file
    assert path.is_file(), f"{what}: {file} does not exist"
    names = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}
    assert func in names, f"{what}: {file} has no {func}"
