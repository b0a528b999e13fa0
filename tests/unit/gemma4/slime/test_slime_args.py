"""Model argument presets and the flag checks: every script describes its checkpoint; every mismatch is named."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from gemma4.config import text_spec_from_any
from gemma4.errors import InvalidInputError
from gemma4.slime.args import check_args, require_matching_args
from harness.gsm8k.model_args import SCRIPTS, read_model_args, script_path
from harness.gsm8k.variants import tiny_e2e_config
from harness.presets import PRESETS, preset_config_dict
from harness.testing.slime import flags_for_spec, parse_megatron_flags


def _config(variant, released):
    return tiny_e2e_config() if variant == "tiny" else released(variant)


@pytest.mark.parametrize("variant", sorted(SCRIPTS))
def test_each_script_matches_its_model(variant, released):
    """Catches: a wrong size/head/KV flag, a dropout left at Megatron's 0.1, --swiglu, a missing --qk-layernorm."""
    args = parse_megatron_flags(read_model_args(script_path(variant)))
    assert check_args(args, text_spec_from_any(_config(variant, released))) == []


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_python_reading_of_the_scripts_equals_bash():
    """The launcher reads MODEL_ARGS without bash; it must see exactly what `source` + "${MODEL_ARGS[@]}" gives."""
    for variant in SCRIPTS:
        path = script_path(variant)
        out = subprocess.run(
            ["bash", "-c", f'source "{path}" && printf "%s\\n" "${{MODEL_ARGS[@]}}"'],
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.splitlines() == read_model_args(path), variant


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_generated_flags_match_every_preset(preset):
    spec = text_spec_from_any(preset_config_dict(preset))
    assert check_args(parse_megatron_flags(flags_for_spec(spec)), spec) == []


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        ({"num_layers": 59}, "--num-layers"),
        ({"hidden_size": 5120}, "--hidden-size"),
        ({"ffn_hidden_size": 21500}, "--ffn-hidden-size"),
        ({"num_query_groups": 4}, "--num-query-groups"),
        ({"group_query_attention": False}, "--num-query-groups"),
        ({"kv_channels": 512}, "--kv-channels"),
        ({"norm_epsilon": 1e-5}, "--norm-epsilon"),
        ({"normalization": "LayerNorm"}, "--normalization"),
        ({"qk_layernorm": False}, "--qk-layernorm"),
        ({"add_bias_linear": True}, "--disable-bias-linear"),
        ({"swiglu": True}, "--swiglu"),
        ({"apply_layernorm_1p": True}, "--apply-layernorm-1p"),
        ({"untie_embeddings_and_output_weights": True}, "--untie-embeddings-and-output-weights"),
        ({"attention_dropout": 0.1}, "--attention-dropout"),
        ({"hidden_dropout": 0.1}, "--hidden-dropout"),
        ({"window_size": (1023, 0)}, "--window-size"),
        ({"num_experts": 8}, "--num-experts"),
        ({"vocab_size": 262145, "padded_vocab_size": None}, "--vocab-size"),
    ],
)
def test_each_disagreement_names_its_flag(change, flag, released):
    args = parse_megatron_flags(read_model_args(script_path("31b")))
    for k, v in change.items():
        setattr(args, k, v)
    problems = check_args(args, text_spec_from_any(released("31b")))
    assert len(problems) == 1 and flag in problems[0].split(":")[0], problems


def test_moe_flags_are_checked(released):
    spec = text_spec_from_any(released("26b-a4b"))
    args = parse_megatron_flags(read_model_args(script_path("26b-a4b")))
    args.moe_router_topk, args.moe_ffn_hidden_size = 2, 1408
    assert [p.split(":")[0] for p in check_args(args, spec)] == ["--moe-router-topk", "--moe-ffn-hidden-size"]


def test_padding_the_vocabulary_is_refused(released):
    """Megatron pads the vocabulary to a multiple of 128 x TP; a padded row HF and SGLang lack must not appear."""
    spec = text_spec_from_any(preset_config_dict("tiny-12b"))  # vocab 320
    flags = flags_for_spec(spec)
    flags[flags.index("--make-vocab-size-divisible-by") + 1] = "128"
    args = parse_megatron_flags(flags)
    assert args.padded_vocab_size == 384
    with pytest.raises(InvalidInputError, match="vocab-size.*384.*320"):
        require_matching_args(args, spec)


def test_every_problem_is_listed_at_once(released):
    args = parse_megatron_flags(
        ["--num-layers", "2", "--hidden-size", "8", "--num-attention-heads", "2", "--ffn-hidden-size", "4"]
    )
    with pytest.raises(InvalidInputError) as info:
        require_matching_args(args, text_spec_from_any(released("12b")))
    for flag in ("--num-layers", "--hidden-size", "--normalization", "--attention-dropout", "--qk-layernorm"):
        assert flag in str(info.value)


#: Checked attributes Megatron-LM derives (validate_args) rather than parses: the message names the flag that
#: drives them.
DERIVED_ATTRS = {"padded_vocab_size"}


@pytest.fixture
def megatron_lm(require_reference):
    """Megatron-LM core_v0.16.1's own ``megatron.training`` (the parser slime's actors run)."""
    from harness.compat.megatron_training import megatron_training

    with megatron_training(root=require_reference("megatron-lm")):
        yield


def _real_args(tokens):
    from harness.compat.megatron_training import parse_megatron_args

    tokens = list(tokens)
    if "--custom-model-provider-path" in tokens:  # slime's own flag, not Megatron-LM's
        i = tokens.index("--custom-model-provider-path")
        tokens = tokens[:i] + tokens[i + 2 :]
    return parse_megatron_args(tokens)


def test_every_check_names_a_flag_megatron_lm_accepts(megatron_lm, released):
    """Each check's message names a flag of Megatron-LM's own parser (core_v0.16.1 ``add_megatron_arguments``)
    and reads the attribute that flag sets: a typo'd or stale flag in a refusal sends the user to a flag that
    does not exist (issue 17: a mutated flag name survived), and a check reading an attribute the parser never
    sets compares the default forever (``--apply-layernorm-1p`` sets ``layernorm_zero_centered_gamma``)."""
    import argparse

    from megatron.training.arguments import add_megatron_arguments

    from gemma4.slime.args import ARG_DESTS, expected_values

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    dest_of = {opt: a.dest for a in parser._actions for opt in a.option_strings}
    checks = [check for check, _ in expected_values(text_spec_from_any(released("26b-a4b"))).values()]
    checks += [check for check, _ in expected_values(text_spec_from_any(released("31b"))).values()]
    assert len(checks) > 20
    wrong = []
    for check in checks:
        flags = check.flag.split()
        read = set(ARG_DESTS.get(check.attr, (check.attr,)))
        unknown = [f for f in flags if f not in dest_of]
        if unknown or not (read & {dest_of[f] for f in flags} or check.attr in DERIVED_ATTRS):
            wrong.append(f"{check.attr}: {check.flag} (sets {[dest_of.get(f) for f in flags]})")
    assert wrong == []


@pytest.mark.parametrize("variant", sorted(SCRIPTS))
def test_scripts_pass_the_check_through_megatron_lms_own_parser(megatron_lm, variant, released):
    """Before: slime's ``--spec`` path (``get_gemma4_spec`` -> ``require_matching_args``) raised "slime args have
    no 'norm_epsilon'" on every run, because Megatron-LM core_v0.16 parses ``--norm-epsilon`` into
    ``layernorm_epsilon``; the tests parsed the scripts with a model of Megatron's parser instead."""
    args = _real_args(read_model_args(script_path(variant)))
    assert check_args(args, text_spec_from_any(_config(variant, released))) == []


@pytest.mark.parametrize(
    "flags, named",
    [(["--apply-layernorm-1p"], "--apply-layernorm-1p"), (["--norm-epsilon", "1e-5"], "--norm-epsilon")],
)
def test_disagreements_are_seen_through_megatron_lms_own_parser(megatron_lm, released, flags, named):
    """``--apply-layernorm-1p`` (a ``1 + w`` norm: a silently different model) was never seen: the check read
    ``args.apply_layernorm_1p``, which Megatron-LM core_v0.16 does not set."""
    args = _real_args([*read_model_args(script_path("31b")), *flags])
    problems = check_args(args, text_spec_from_any(released("31b")))
    assert len(problems) == 1 and named in problems[0].split(":")[0], problems
