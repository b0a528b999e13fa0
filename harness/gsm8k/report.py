"""The e2e summary: ``report.json`` (everything) and a short text summary (printed, ``summary.md``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gemma4.atomic_io import atomic_write_text
from harness.gsm8k.gates import Gate, RunOutcome, passed
from harness.gsm8k.metrics import ParsedMetrics
from harness.tolerances import GateBounds

LABEL = {True: "PASS", False: "FAIL", None: "REPORTED"}
HEADLINE = ("train/ppo_kl", "train/train_rollout_logprob_abs_diff", "train/loss", "train/grad_norm")


def build_report(
    variant: str,
    gates: list[Gate],
    outcome: RunOutcome,
    metrics: ParsedMetrics,
    bounds: GateBounds,
    commands: list[str],
    logs: list[str],
) -> dict[str, Any]:
    """JSON-ready report of one run (or one parsed log)."""
    return {
        "pass": passed(gates),
        "variant": variant,
        "gates": [g.to_json() for g in gates],
        "outcome": outcome.to_json(),
        "bounds": {
            "source": bounds.source,
            "ppo_kl_step0_max_abs": bounds.ppo_kl_step0_max_abs,
            "train_rollout_logprob_abs_diff_max": bounds.logprob_abs_diff_max,
            "raw_reward_min": bounds.raw_reward_min.get(variant),
        },
        "metrics": metrics.to_json(),
        "commands": commands,
        "logs": logs,
    }


def render_summary(report: dict[str, Any]) -> str:
    """A few lines: verdict, every gate, the headline metrics per step and the reward per rollout."""
    out = report["outcome"]
    lines = [
        f"e2e-gsm8k {report['variant']}: {'PASS' if report['pass'] else 'FAIL'} "
        f"({out['reason']}, exit {out['exit_code']}, {out['duration_s']:.0f} s)"
    ]
    for g in report["gates"]:
        lines.append(f"  {LABEL[g['passed']]:<8} {g['name']:<17} {g['message']}")
    series = report["metrics"]["series"]
    for index, rec in series["step"].items():
        shown = ", ".join(
            f"{k.split('/', 1)[1]}={rec[k]:.4g}" for k in HEADLINE if isinstance(rec.get(k), float)
        )
        lines.append(f"  step {index}: {shown}")
    for index, rec in series["rollout"].items():
        if "rollout/raw_reward" in rec:
            lines.append(f"  rollout {index}: raw_reward={rec['rollout/raw_reward']}")
    for log in report["logs"]:
        lines.append(f"  log: {log}")
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` atomically (see :mod:`gemma4.atomic_io`)."""
    atomic_write_text(Path(path), text)


def write_report(report: dict[str, Any], json_path: Path, summary_path: Path | None = None) -> None:
    """``report.json`` and (optionally) the text summary, each atomically."""
    write_atomic(json_path, json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    if summary_path is not None:
        write_atomic(summary_path, render_summary(report) + "\n")
