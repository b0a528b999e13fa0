"""The e2e gate bounds are policy in harness/tolerances.py: the values of the former gates golden, each with its
reason; no file is read, and the former --gates flag is gone."""

from __future__ import annotations

import pytest

from harness import tolerances
from harness.cli import main


def test_bounds_are_the_policy_with_reasons_and_tighter_than_slime():
    bounds = tolerances.GSM8K_GATES
    assert bounds is tolerances.GSM8K_GATES and bounds.source == "harness.tolerances.GSM8K_GATES"
    # The values goldens/gsm8k/gates.json held (sha256 a0406bf1...) before the bounds moved into code.
    assert bounds.ppo_kl_step0_max_abs == 1e-8
    assert bounds.logprob_abs_diff_max == 0.03125 <= tolerances.SLIME_DEFAULT_LOGPROB_ALARM / 3
    assert bounds.raw_reward_min == {"31b": 0.5, "26b-a4b": 0.5, "12b": 0.4, "tiny": None}
    assert tolerances.GSM8K_LOGPROB_STATUS in ("provisional", "measured")
    assert all(len(why) > 100 for why in bounds.why().values())
    assert bounds.reward_floor("12b") == 0.4 and bounds.reward_floor("tiny") is None


def test_the_gates_flag_is_gone(tmp_path, capsys):
    path = tmp_path / "gates.json"
    path.write_text("{}")
    assert main(["e2e-gsm8k", "--variant", "tiny", "--dry-run", "--gates", str(path)]) == 2
    assert "unrecognized arguments: --gates" in capsys.readouterr().err


def test_unknown_variant_has_no_floor():
    with pytest.raises(Exception, match="no entry for variant 'huge'"):
        tolerances.GSM8K_GATES.reward_floor("huge")
