"""``gemma4-harness convert``: HF <-> Megatron checkpoints, and a bit-exact round-trip check.

* ``hf-to-mcore --hf-checkpoint DIR --out DIR [--tp N] [--ep N]``: write a Megatron checkpoint (per-rank safetensors
  + ``gemma4_mcore.json``).
* ``mcore-to-hf --mcore DIR --out DIR [--for hf|sglang]``: export it as a ``Gemma4ForCausalLM`` directory, or
  (``--for sglang``) as a text-only ``Gemma4ForConditionalGeneration`` one that SGLang 0.5.23 starts from.
* ``roundtrip --hf-checkpoint DIR [--tp N] [--ep N]``: HF -> Megatron -> HF in a scratch directory; exit 0 iff every
  text tensor comes back with the same name, shape, dtype and bytes.

Exit 2 (one line, no traceback, nothing left behind) for invalid input: the message names the file, tensor,
field or flag.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from harness.commands.result import Result


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``convert`` and its three directions."""
    from harness.cli_paths import IN_DIR, IN_FILE, OUT_DIR, OUT_FILE, declare
    from harness.commands._options import add_hf_checkpoint

    p = sub.add_parser("convert", help="convert Gemma 4 weights between HF and Megatron checkpoints")
    directions = p.add_subparsers(dest="direction", required=True, parser_class=type(p))

    a = directions.add_parser("hf-to-mcore", help="HF directory -> Megatron checkpoint")
    add_hf_checkpoint(
        a, required=True, help="HF checkpoint directory (config.json + safetensors)", old="--hf"
    )
    a.add_argument("--out", type=Path, required=True, help="new (or empty) output directory")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size to shard for")
    a.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models only)")
    a.add_argument(
        "--format",
        choices=["safetensors", "torch_dist"],
        default="safetensors",
        help="per-rank safetensors (default, streamed) or Megatron torch_dist (for --load; whole model in memory)",
    )
    a.add_argument("--json", type=Path, help="write the report as JSON")
    a.set_defaults(func=run_hf_to_mcore, io_paths=declare(hf_checkpoint=IN_DIR, out=OUT_DIR, json=OUT_FILE))

    b = directions.add_parser("mcore-to-hf", help="Megatron checkpoint -> HF directory (Gemma4ForCausalLM)")
    b.add_argument("--mcore", type=Path, required=True, help="checkpoint written by hf-to-mcore")
    b.add_argument("--out", type=Path, required=True, help="new (or empty) output directory")
    b.add_argument(
        "--hf-config", type=Path, help="config.json of the model (torch_dist checkpoints saved by Megatron)"
    )
    b.add_argument(
        "--for",
        dest="target",
        choices=["hf", "sglang"],
        default="hf",
        help="hf: Gemma4ForCausalLM (gemma4_text); sglang: text-only Gemma4ForConditionalGeneration (gemma4 "
        "wrapper, weights under model.language_model.), the form SGLang 0.5.23 starts from",
    )
    b.add_argument("--json", type=Path, help="write the report as JSON")
    b.set_defaults(
        func=run_mcore_to_hf, io_paths=declare(mcore=IN_DIR, hf_config=IN_FILE, out=OUT_DIR, json=OUT_FILE)
    )

    c = directions.add_parser("roundtrip", help="HF -> Megatron -> HF; exit 0 iff bit-exact")
    add_hf_checkpoint(c, required=True, help="HF checkpoint directory", old="--hf")
    c.add_argument("--tp", type=int, default=1)
    c.add_argument("--ep", type=int, default=1)
    c.add_argument("--format", choices=["safetensors", "torch_dist"], default="safetensors")
    c.add_argument("--workdir", type=Path, help="scratch space (default: the system temp directory)")
    c.add_argument("--json", type=Path, help="write the report as JSON")
    c.set_defaults(func=run_roundtrip, io_paths=declare(hf_checkpoint=IN_DIR, workdir=OUT_DIR, json=OUT_FILE))


def _text(head: str, report: dict[str, Any], tail: list[str] | None = None) -> str:
    return "\n".join([head, *(f"  note: {n}" for n in report.get("notes", [])), *(tail or [])])


def run_hf_to_mcore(args: argparse.Namespace) -> Result:
    """``convert hf-to-mcore``."""
    from gemma4.conversion.convert import hf_to_mcore_dir

    report = hf_to_mcore_dir(args.hf_checkpoint, args.out, tp=args.tp, ep=args.ep, fmt=args.format)
    head = (
        f"wrote Megatron checkpoint {report['out']} ({report['format']}, tp={report['tp']} ep={report['ep']} "
        f"{report['dtype']}, {report['hf_tensors']} HF tensors) in {report['seconds']:.2f} s"
    )
    return Result(report, _text(head, report))


def run_mcore_to_hf(args: argparse.Namespace) -> Result:
    """``convert mcore-to-hf``."""
    from gemma4.conversion.convert import mcore_to_hf_dir

    report = mcore_to_hf_dir(args.mcore, args.out, hf_config=args.hf_config, target=args.target)
    head = (
        f"wrote HF checkpoint {report['out']} ({report['hf_tensors']} tensors, {report['dtype']}) "
        f"in {report['seconds']:.2f} s"
    )
    return Result(report, _text(head, report))


def run_roundtrip(args: argparse.Namespace) -> Result:
    """``convert roundtrip``: exit 0 iff bit-exact, 1 otherwise."""
    from gemma4.conversion.convert import roundtrip

    report = roundtrip(args.hf_checkpoint, tp=args.tp, ep=args.ep, workdir=args.workdir, fmt=args.format)
    verdict = "bit-exact" if report["identical"] else f"{len(report['differences'])} differences"
    head = (
        f"roundtrip {args.hf_checkpoint} ({report['format']}) tp={report['tp']} ep={report['ep']} "
        f"{report['dtype']}: {report['tensors']} tensors, {verdict}"
    )
    tail = [f"  - {d}" for d in report["differences"][:20]] + ["PASS" if report["identical"] else "FAIL"]
    return Result.verdict(report, _text(head, report, tail), report["identical"])
