"""The e2e gates: a run passes only if it ran to the end and every gate holds.

=====================  ===================================================================================
gate                   fails when
=====================  ===================================================================================
``process``            the run did not exit 0 by itself (non-zero exit, timeout, hang, never started)
``ran``                step 0 or fewer than ``num_rollout`` steps / rollouts were logged (never pass
                       without running)
``finite``             any logged metric is NaN, ±inf or not a number, or a metric line is unreadable
``ppo_kl_step0``       ``|train/ppo_kl|`` at step 0 is missing or not below the golden bound (1e-8)
``logprob_abs_diff``   ``train/train_rollout_logprob_abs_diff`` is missing at a step or above the golden
                       bound at any step
``raw_reward``         ``rollout/raw_reward`` is missing or below the variant's floor at any rollout
                       (variants without a floor report it)
``localhost``          a process of the run listened on a non-loopback address (reported; gated with
                       ``--strict-localhost``)
=====================  ===================================================================================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from harness.gsm8k.metrics import ParsedMetrics, is_finite_number
from harness.tolerances import GateBounds

PPO_KL = "train/ppo_kl"
LOGPROB_DIFF = "train/train_rollout_logprob_abs_diff"
RAW_REWARD = "rollout/raw_reward"


@dataclass
class RunOutcome:
    """How the launched run ended."""

    exit_code: int | None
    reason: str  # "exited", "timeout", "hang", "not-started", "interrupted"
    duration_s: float = 0.0
    detail: str = ""
    localhost_violations: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Gate:
    """One gate's verdict: ``passed`` is True, False, or None (reported, not gated)."""

    name: str
    passed: bool | None
    message: str
    value: Any = None
    bound: Any = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _process_gate(outcome: RunOutcome) -> Gate:
    if outcome.reason == "exited" and outcome.exit_code == 0:
        return Gate("process", True, "exited 0", outcome.exit_code, 0)
    what = {
        "exited": f"exited with code {outcome.exit_code}",
        "timeout": "killed: the run exceeded its time limit",
        "hang": "killed: no output for longer than the stall limit (hang)",
        "not-started": "the run never started",
        "interrupted": "interrupted",
    }.get(outcome.reason, outcome.reason)
    detail = f" ({outcome.detail})" if outcome.detail else ""
    return Gate("process", False, what + detail, outcome.exit_code, 0)


def _ran_gate(metrics: ParsedMetrics, num_rollout: int) -> Gate:
    steps, rollouts = metrics.series["step"], metrics.series["rollout"]
    count = {"steps": len(steps), "rollouts": len(rollouts)}
    if 0 not in steps:
        return Gate("ran", False, "no 'step 0:' metric line was logged", count, num_rollout)
    if len(steps) < num_rollout or len(rollouts) < num_rollout:
        return Gate(
            "ran",
            False,
            f"logged {len(steps)} steps and {len(rollouts)} rollouts; the run has {num_rollout} rollouts",
            count,
            num_rollout,
        )
    return Gate("ran", True, f"{len(steps)} steps, {len(rollouts)} rollouts", count, num_rollout)


def _finite_gate(metrics: ParsedMetrics) -> Gate:
    bad = [
        f"{kind} {index}: {key} = {value!r}"
        for kind, records in metrics.series.items()
        for index, record in sorted(records.items())
        for key, value in record.items()
        if not is_finite_number(value)
    ]
    problems = bad + metrics.problems
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        return Gate("finite", False, "; ".join(problems[:5]) + more, len(problems), 0)
    total = sum(len(r) for records in metrics.series.values() for r in records.values())
    return Gate("finite", True, f"{total} values, all finite", 0, 0)


def _ppo_kl_gate(metrics: ParsedMetrics, bound: float) -> Gate:
    value = metrics.get("step", 0, PPO_KL)
    if value is None:
        return Gate("ppo_kl_step0", False, f"{PPO_KL} missing at step 0", None, bound)
    if not is_finite_number(value) or abs(value) >= bound:
        return Gate("ppo_kl_step0", False, f"|{PPO_KL}| at step 0 = {value!r}, not < {bound:g}", value, bound)
    return Gate("ppo_kl_step0", True, f"|{PPO_KL}| at step 0 = {abs(value):.3g} < {bound:g}", value, bound)


def _logprob_gate(metrics: ParsedMetrics, bound: float) -> Gate:
    steps = metrics.series["step"]
    missing = [i for i in sorted(steps) if LOGPROB_DIFF not in steps[i]]
    if not steps or missing:
        return Gate(
            "logprob_abs_diff", False, f"{LOGPROB_DIFF} missing at steps {missing or 'all'}", None, bound
        )
    values = metrics.values("step", LOGPROB_DIFF)
    worst_step, worst = max(values, key=lambda iv: iv[1] if is_finite_number(iv[1]) else float("inf"))
    if not all(is_finite_number(v) and v <= bound for _, v in values):
        return Gate(
            "logprob_abs_diff",
            False,
            f"{LOGPROB_DIFF} = {worst!r} at step {worst_step} > {bound:g} (slime's default alarm: 0.1)",
            worst,
            bound,
        )
    return Gate("logprob_abs_diff", True, f"max {LOGPROB_DIFF} = {worst:.3g} <= {bound:g}", worst, bound)


def _reward_gate(metrics: ParsedMetrics, floor: float | None) -> Gate:
    values = metrics.values("rollout", RAW_REWARD)
    rollouts = metrics.series["rollout"]
    missing = [i for i in sorted(rollouts) if RAW_REWARD not in rollouts[i]]
    if not rollouts or missing:
        return Gate("raw_reward", False, f"{RAW_REWARD} missing at rollouts {missing or 'all'}", None, floor)
    low_index, low = min(values, key=lambda iv: iv[1] if is_finite_number(iv[1]) else float("-inf"))
    if floor is None:
        return Gate(
            "raw_reward", None, f"min {RAW_REWARD} = {low!r} (reported: no floor for this variant)", low, None
        )
    if not all(is_finite_number(v) and v >= floor for _, v in values):
        return Gate(
            "raw_reward",
            False,
            f"{RAW_REWARD} = {low!r} at rollout {low_index} < floor {floor:g} (collapse)",
            low,
            floor,
        )
    return Gate("raw_reward", True, f"min {RAW_REWARD} = {low:.3g} >= {floor:g}", low, floor)


def _localhost_gate(outcome: RunOutcome, strict: bool) -> Gate:
    if not outcome.localhost_violations:
        return Gate("localhost", True, "no listener outside 127.0.0.0/8 and ::1 was seen", [], None)
    message = "listening outside loopback: " + "; ".join(outcome.localhost_violations[:5])
    return Gate("localhost", False if strict else None, message, outcome.localhost_violations, None)


def evaluate(
    metrics: ParsedMetrics,
    outcome: RunOutcome,
    bounds: GateBounds,
    variant: str,
    num_rollout: int,
    strict_localhost: bool = False,
) -> list[Gate]:
    """Every gate, in the order of the module docstring."""
    return [
        _process_gate(outcome),
        _ran_gate(metrics, num_rollout),
        _finite_gate(metrics),
        _ppo_kl_gate(metrics, bounds.ppo_kl_step0_max_abs),
        _logprob_gate(metrics, bounds.logprob_abs_diff_max),
        _reward_gate(metrics, bounds.reward_floor(variant)),
        _localhost_gate(outcome, strict_localhost),
    ]


def passed(gates: list[Gate]) -> bool:
    """True iff no gate failed and at least one passed."""
    return any(g.passed is True for g in gates) and not any(g.passed is False for g in gates)
