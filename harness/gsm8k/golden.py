"""The e2e gate bounds, kept as a golden: ``goldens/gsm8k/gates.json`` (provenance + sha256).

Only ``python -m harness.gsm8k.golden record`` writes the file (atomically); :func:`load_bounds` refuses a
missing file, an unknown schema, a wrong checksum or a missing field with :class:`GoldenError` naming the file,
and the e2e stage then fails. ``python -m harness.gsm8k.golden check`` verifies it.

The bounds and their reasons:

* ``ppo_kl_step0_max_abs`` (1e-8): at step 0 the policy that produced the rollout *is* the trained policy
  (same weights, recomputed by Megatron), so PPO's KL is 0 up to float summation; anything larger means
  old and new log-probs were computed differently within Megatron (e.g. a stateful or nondeterministic
  path, a mask applied to one side only).
* ``train_rollout_logprob_abs_diff_max``: the mean |log p_Megatron − log p_SGLang| over response tokens,
  much tighter than slime's default alarm of 0.1 (see ``why`` in the file).
* ``raw_reward_min`` per variant: GSM8K accuracy the instruct checkpoints must keep over a 3-rollout smoke
  (a collapse to ~0 means broken weights in SGLang after a weight sync, a wrong chat template or a wrong
  reward key). ``null`` for ``tiny``, whose random weights earn nothing (reported, not gated).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gemma4.atomic_io import atomic_write_text

REPO = Path(__file__).resolve().parents[2]
GATES_FILE = REPO / "goldens" / "gsm8k" / "gates.json"
SCHEMA_VERSION = 1
SLIME_DEFAULT_LOGPROB_ALARM = 0.1

DEFAULT_LOGPROB_BOUND = 2.0**-5
DEFAULT_LOGPROB_WHY = (
    "Provisional, not yet measured on a GPU run (replace it with `record --from-report` after the first one). "
    "Megatron and SGLang compute the same bf16 model with different kernels, so per-token log-probs differ by "
    "bf16 rounding; the mean over response tokens reported for matched dense bf16 implementations in public RL "
    "stacks is 0.005-0.02. 2^-5 = 0.031 leaves room over that and is 3x tighter than slime's alarm of 0.1, "
    "which lets real porting bugs through. Measured here (CPU, bf16, HF vs our model with the planted-bug "
    "mutants of tests/unit/test_planted_bugs.py, mean |d log p| of the next token over 2 x 48 tokens, "
    "tiny-31b / tiny-12b; 0.0 without a bug): erf instead of tanh GELU 0.126 / 0.062, Python-float sqrt(H) "
    "embedding scale 0.000 / 0.081 (0 when sqrt(H) is exact), proportional RoPE as rotary_percent 1.74 / 0.45, "
    "sliding window off by one 2.52 / 1.19, dropped layer_scalar 6.96 / 1.63, missing softcap 7.92 / 13.4. "
    "The GELU and embedding-scale bugs sit between 2^-5 and 0.1: slime's alarm misses them, this bound does not."
)
PPO_KL_BOUND = 1e-8
PPO_KL_WHY = (
    "At step 0 the rollout policy and the trained policy have the same weights and Megatron recomputes both "
    "log-probs with the same code, so PPO's KL is 0 up to summation order (~1e-12); slime's --ci-test "
    "expects exactly 0. Anything above 1e-8 means the two recomputations differ."
)
REWARD_FLOORS: dict[str, float | None] = {"31b": 0.5, "26b-a4b": 0.5, "12b": 0.4, "tiny": None}
REWARD_WHY = (
    "Minimum of rollout/raw_reward (the GSM8K math reward, mean over the rollout's samples) over the 3 "
    "rollouts. Instruction-tuned Gemma 4 models solve most GSM8K problems (published GSM8K accuracy of "
    "comparable open models is 0.8-0.95); with 32 samples per rollout the standard error is ~0.07, so a "
    "healthy run stays far above the floor while a collapse (garbage weights in SGLang after weight sync, a "
    "wrong chat template, the wrong label key) falls to ~0. 12B gets a lower floor. tiny: random weights "
    "earn 0, so its reward is reported, not gated."
)


class GoldenError(Exception):
    """The gates golden is missing, corrupt or of an unknown schema; the message names the file."""


@dataclass(frozen=True)
class GateBounds:
    """The bounds the gates apply (from the golden)."""

    ppo_kl_step0_max_abs: float
    logprob_abs_diff_max: float
    raw_reward_min: dict[str, float | None]
    source: str

    def reward_floor(self, variant: str) -> float | None:
        if variant not in self.raw_reward_min:
            raise GoldenError(f"{self.source}: raw_reward_min has no entry for variant {variant!r}")
        return self.raw_reward_min[variant]


def _canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def payload_sha256(payload: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything but the ``sha256`` field."""
    return hashlib.sha256(_canonical({k: v for k, v in payload.items() if k != "sha256"})).hexdigest()


def load_bounds(path: Path = GATES_FILE) -> GateBounds:
    """Read and verify the golden; every problem raises :class:`GoldenError` naming ``path``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise GoldenError(
            f"{path}: gates golden is missing (record it: python -m harness.gsm8k.golden record)"
        ) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GoldenError(f"{path}: gates golden is unreadable or corrupt ({exc})") from exc
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise GoldenError(
            f"{path}: unknown schema_version {data.get('schema_version') if isinstance(data, dict) else None!r}"
        )
    if data.get("sha256") != payload_sha256(data):
        raise GoldenError(f"{path}: sha256 mismatch: the file was edited by hand or is corrupt; re-record it")
    try:
        gates = data["gates"]
        kl = float(gates["ppo_kl_step0_max_abs"]["value"])
        lp = float(gates["train_rollout_logprob_abs_diff_max"]["value"])
        floors = {
            str(k): (None if v is None else float(v)) for k, v in gates["raw_reward_min"]["value"].items()
        }
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise GoldenError(f"{path}: gates golden lacks a field or has a bad value ({exc!r})") from exc
    if not (0 < kl and 0 < lp < SLIME_DEFAULT_LOGPROB_ALARM):
        raise GoldenError(f"{path}: bounds out of range (ppo_kl {kl}, logprob diff {lp} must be in (0, 0.1))")
    return GateBounds(kl, lp, floors, str(path))


def measured_from_report(report_path: Path) -> dict[str, Any]:
    """The largest ``train/train_rollout_logprob_abs_diff`` of a passing e2e report, with its context."""
    try:
        report = json.loads(Path(report_path).read_text())
        steps = report["metrics"]["series"]["step"]
        values = [float(rec["train/train_rollout_logprob_abs_diff"]) for rec in steps.values()]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GoldenError(f"{report_path}: not an e2e-gsm8k report with logprob diffs ({exc!r})") from exc
    if not values:
        raise GoldenError(f"{report_path}: the report has no train/train_rollout_logprob_abs_diff values")
    return {
        "max": max(values),
        "values": values,
        "variant": report.get("variant"),
        "report": str(report_path),
        "report_sha256": hashlib.sha256(Path(report_path).read_bytes()).hexdigest(),
    }


def build_payload(
    logprob_bound: float, logprob_why: str, measured: dict[str, Any] | None, command: str
) -> dict[str, Any]:
    """The golden's content (without its checksum)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "description": (
            "Bounds of the e2e GSM8K smoke gates (harness/gsm8k/gates.py). Written only by "
            "`python -m harness.gsm8k.golden record`; the sha256 covers every other field."
        ),
        "gates": {
            "ppo_kl_step0_max_abs": {"value": PPO_KL_BOUND, "why": PPO_KL_WHY},
            "train_rollout_logprob_abs_diff_max": {
                "value": logprob_bound,
                "why": logprob_why,
                "slime_default_alarm": SLIME_DEFAULT_LOGPROB_ALARM,
                "measured": measured,
                "status": "measured" if measured else "provisional",
            },
            "raw_reward_min": {"value": dict(REWARD_FLOORS), "why": REWARD_WHY},
        },
        "provenance": {
            "command": command,
            "recorded_at": datetime.now(UTC).replace(microsecond=0).isoformat(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }


def record(
    path: Path, logprob_bound: float, logprob_why: str, measured: dict[str, Any] | None, command: str
) -> dict[str, Any]:
    """Write the golden atomically; returns what was written."""
    if not 0 < logprob_bound < SLIME_DEFAULT_LOGPROB_ALARM:
        raise GoldenError(f"--logprob-bound {logprob_bound} must be in (0, {SLIME_DEFAULT_LOGPROB_ALARM})")
    payload = build_payload(logprob_bound, logprob_why, measured, command)
    payload["sha256"] = payload_sha256(payload)
    atomic_write_text(Path(path), json.dumps(payload, indent=1, sort_keys=True) + "\n")
    return payload


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.gsm8k.golden {record,check}``."""
    parser = argparse.ArgumentParser(
        prog="python -m harness.gsm8k.golden", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="action", required=True)
    rec = sub.add_parser("record", help="write goldens/gsm8k/gates.json")
    rec.add_argument("--path", type=Path, default=GATES_FILE)
    src = rec.add_mutually_exclusive_group()
    src.add_argument("--logprob-bound", type=float, help="explicit bound (with --why)")
    src.add_argument(
        "--from-report", type=Path, help="a passing e2e report: bound = 2x its largest logprob diff"
    )
    rec.add_argument("--why", help="the reason for an explicit --logprob-bound")
    chk = sub.add_parser("check", help="verify the golden")
    chk.add_argument("--path", type=Path, default=GATES_FILE)
    args = parser.parse_args(argv)
    command = "python -m harness.gsm8k.golden " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        if args.action == "check":
            bounds = load_bounds(args.path)
            print(f"{args.path}: OK ({bounds})")
            return 0
        measured = None
        if args.from_report is not None:
            measured = measured_from_report(args.from_report)
            bound = float(f"{2 * measured['max']:.2g}")
            why = (
                f"Measured: 2x the largest step value ({measured['max']:.3g}) of a passing "
                f"{measured['variant']} run ({measured['report']}). " + DEFAULT_LOGPROB_WHY.split(". ", 1)[1]
            )
        elif args.logprob_bound is not None:
            if not args.why:
                parser.error("--logprob-bound needs --why")
            bound, why = args.logprob_bound, args.why
        else:
            bound, why = DEFAULT_LOGPROB_BOUND, DEFAULT_LOGPROB_WHY
        record(args.path, bound, why, measured, command)
        print(f"wrote {args.path} (logprob diff bound {bound:g})")
        return 0
    except GoldenError as exc:
        print(f"gsm8k golden: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
