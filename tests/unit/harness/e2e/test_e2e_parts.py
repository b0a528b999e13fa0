"""The pieces of the e2e smoke on their own: problems and rewards, GRPO advantages, the loss-mask
alignment, the engine's weight intake (every refusal named), and one sync making the engine equal to HF."""

from __future__ import annotations

import types

import pytest
import torch

from harness.e2e.batch import (
    expected_logit_mask,
    grpo_advantages,
    logit_mask_from_loss_mask,
    make_sample,
    pack,
)
from harness.e2e.tasks import FORMAT_WEIGHT, exact_match, extract_final_number, format_reward, make_problems


def test_problems_are_deterministic_and_their_solutions_check_out():
    a, b = make_problems(12, seed=5), make_problems(12, seed=5)
    assert a == b and make_problems(12, seed=6) != a
    for p in a:
        work, final = p.solution.split("\n")
        lhs, rhs = work.split(" = ")
        assert eval(lhs) == int(rhs) == p.answer  # noqa: S307 - our own "a op b" strings
        assert final == f"#### {p.answer}"
        assert exact_match(p.solution, p.answer) == 1.0


@pytest.mark.parametrize(
    "text,number",
    [
        ("so 3 + 4 = 7\n#### 7", "7"),
        ("I think 12, no, 15", "15"),
        ("#### 1,024", "1024"),
        ("none", None),
        ("#### -3", "-3"),
        ("12 #### x", None),
    ],
)
def test_final_number(text, number):
    assert extract_final_number(text) == number


def test_exact_match_has_no_partial_credit():
    assert exact_match("#### 7", 7) == 1.0
    assert exact_match("#### 7.0", 7) == 1.0
    assert exact_match("#### 8", 7) == 0.0
    assert exact_match("7 apples, #### 70", 7) == 0.0
    assert exact_match("", 7) == 0.0


def test_format_reward_is_bounded_and_graded():
    assert format_reward("") == 0.0
    assert format_reward("#### 42") == pytest.approx(FORMAT_WEIGHT * 6 / 7)
    assert format_reward("abc") == 0.0 < format_reward("a1") < format_reward("11") == FORMAT_WEIGHT


def test_grpo_advantages():
    assert grpo_advantages([0.3, 0.3, 0.3]) == [0.0, 0.0, 0.0]
    adv = torch.tensor(grpo_advantages([1.0, 0.0, 0.5, 0.25]))
    assert abs(float(adv.mean())) < 1e-12
    assert float(adv.std(unbiased=False)) == pytest.approx(1.0, rel=1e-5)
    assert float(adv[0]) > 0 > float(adv[1])


def test_loss_mask_covers_exactly_the_response_on_logit_positions():
    prompt, response = [2, 105, 7, 8, 9], [11, 12, 106]
    lp = torch.tensor([-0.1, -0.2, -0.3], dtype=torch.float64)
    s = make_sample(0, prompt, response, lp, greedy=False, finished=True, vocab_size=576)
    assert s.token_ids == prompt + response and s.loss_mask == [0] * 5 + [1] * 3
    short = make_sample(1, prompt[:3], [13], lp[:1], greedy=True, finished=False, vocab_size=576)
    batch = pack([s, short], pad_id=0, multiple=4, dtype=torch.float64)
    assert batch["input_ids"].shape == (2, 8)  # 8 tokens, already a multiple of 4
    mask = logit_mask_from_loss_mask(batch["loss_mask"])
    expected = expected_logit_mask(batch["prompt_length"], batch["response_length"], 8)
    assert torch.equal(mask, expected)
    assert batch["input_ids"][0, 1:][mask[0]].tolist() == response  # the masked labels are the response
    assert torch.equal(batch["rollout_logprobs"][0][mask[0]], lp)
    assert torch.isnan(batch["rollout_logprobs"][0][~mask[0]]).all()
    assert batch["train"].tolist() == [True, False]
    shifted = batch["loss_mask"][:, :-1].bool()  # the classic off-by-one
    assert not torch.equal(shifted, expected)


@pytest.fixture(scope="module")
def engine():
    from gemma4.config import hf_text_config_from_any
    from harness.e2e.engine import RolloutEngine
    from harness.presets import preset_config_dict

    cfg = hf_text_config_from_any(preset_config_dict("tiny-26b-a4b"))
    return RolloutEngine(cfg, torch.float64, initial_seed=1, stop_token_ids=[106, 1], pad_token_id=0)


def test_engine_names_every_refused_tensor(engine):
    emb = engine.model.model.embed_tokens.weight
    engine.begin_sync(0)
    engine.load_weights(
        [
            ("model.nope.weight", torch.zeros(1, dtype=torch.float64)),
            ("model.embed_tokens.weight", emb.detach().clone()),
            ("model.embed_tokens.weight", emb.detach().clone()),
            ("model.norm.weight", torch.zeros(3, dtype=torch.float64)),
            ("model.layers.0.input_layernorm.weight", torch.zeros(64, dtype=torch.float32)),
            ("model.layers.0.experts.9.down_proj.weight", torch.zeros(64, 16, dtype=torch.float64)),
            ("model.layers.0.experts.2.gate_up_proj", torch.zeros(32, 64, dtype=torch.float64)),
            ("lm_head.weight", emb.detach().clone()),  # tied: never a tensor of its own
            ("model.layers.0.experts.3.down_proj.weight", torch.ones(64, 16, dtype=torch.float64)),
        ]
    )
    rec = engine.end_sync(megatron_params=8)
    errors = "\n".join(rec.errors)
    for needle in (
        "unknown tensor 'model.nope.weight'",
        "'model.embed_tokens.weight' received twice",
        "'model.norm.weight': shape (3,)",
        "dtype torch.float32",
        "unknown tensor 'model.layers.0.experts.9.down_proj.weight'",
        "unknown tensor 'model.layers.0.experts.2.gate_up_proj'",  # the name SGLang skips
        "unknown tensor 'lm_head.weight'",
    ):
        assert needle in errors
    assert rec.hf_tensors == 2 and rec.buckets == 1
    assert torch.equal(
        engine.model.model.layers[0].experts.down_proj[3], torch.ones(64, 16, dtype=torch.float64)
    )
    assert "model.layers.0.experts.down_proj[2]" in rec.missing
    assert "model.layers.0.experts.down_proj[3]" not in rec.missing
    assert "model.layers.0.experts.gate_up_proj[2].up_proj" in rec.missing
    assert "model.embed_tokens.weight" not in rec.missing and "model.norm.weight" in rec.missing
    assert rec.to_json()["num_missing"] == len(rec.missing) > 10


@pytest.mark.parametrize("preset", ["tiny-31b", "tiny-26b-a4b"])
def test_one_sync_makes_the_engine_the_hf_model_bit_for_bit(preset):
    """Megatron weights -> bucketed streaming conversion -> engine: equal to the HF model they came from."""
    from gemma4.config import hf_text_config_from_any, text_spec_from_hf
    from gemma4.conversion.mapping import load_hf_into_mcore
    from gemma4.model.build import build_gemma4_model
    from harness.e2e.engine import RolloutEngine
    from harness.e2e.sync import sync_weights
    from harness.presets import preset_config_dict
    from harness.reference import build_reference_model, hf_text_state_dict

    raw = preset_config_dict(preset)
    cfg = hf_text_config_from_any(raw)
    spec = text_spec_from_hf(cfg)
    source = build_reference_model(cfg, torch.float64, seed=4)
    model = build_gemma4_model(spec, torch.float64)
    load_hf_into_mcore(model, hf_text_state_dict(source), spec)
    engine = RolloutEngine(cfg, torch.float64, initial_seed=5, stop_token_ids=[1], pad_token_id=0)
    rec = sync_weights(model, engine, types.SimpleNamespace(hf_config=raw), bucket_bytes=64 * 1024, index=0)
    assert rec.missing == [] and rec.errors == [] and rec.buckets > 2
    want, got = source.state_dict(), engine.model.state_dict()
    assert sorted(want) == sorted(got)
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
