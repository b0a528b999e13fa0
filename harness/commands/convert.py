"""``gemma4-harness convert``: HF <-> Megatron checkpoints, and a bit-exact round-trip check.

* ``hf-to-mcore --hf-checkpoint DIR --out DIR [--tp N] [--ep N]``: write a Megatron checkpoint (per-rank safetensors
  + ``gemma4_mcore.json``).
* ``mcore-to-hf --mcore DIR --out DIR [--for hf|sglang]``: export it as a ``Gemma4ForCausalLM`` directory, or
  (``--for sglang``) as a text-only ``Gemma4ForConditionalGeneration`` one that SGLang 0.5.23 starts from.
* ``roundtrip --hf-checkpoint DIR [--tp N] [--ep N]``: HF -> Megatron -> HF in a scratch directory; exit 0 iff every
  text tensor comes back with the same name, shape, dtype and bytes.
* ``relayout --mcore DIR --out DIR --to megatron-bridge|ours``: move a Megatron checkpoint between our layout and
  Megatron-Bridge 0.6.2's (:mod:`gemma4.conversion.megatron_bridge`).

``--layout megatron-bridge`` on ``hf-to-mcore`` / ``mcore-to-hf`` / ``roundtrip`` writes / reads / checks a
Megatron-Bridge 0.6.2 layout checkpoint (TP = 1 state dict in its names) instead of ours. A checkpoint of one
layout given where the other is expected is refused naming the difference. ``--discard-unused`` lets a
Bridge checkpoint whose runtime-unused slots (V copy of K=V layers, K/V of KV-shared layers, vocabulary
padding) are not canonical be read, dropping them with a note.

Exit 2 (one line, no traceback, nothing left behind) for invalid input: the message names the file, tensor,
field or flag.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gemma4.errors import InvalidInputError
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
    _add_layout(a)
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
    _add_layout(b)
    _add_discard(b)
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
    _add_layout(c)
    c.add_argument("--json", type=Path, help="write the report as JSON")
    c.set_defaults(func=run_roundtrip, io_paths=declare(hf_checkpoint=IN_DIR, workdir=OUT_DIR, json=OUT_FILE))

    d = directions.add_parser(
        "relayout",
        help="Megatron checkpoint: our layout <-> Megatron-Bridge 0.6.2's (same weights, bit-exact)",
    )
    d.add_argument("--mcore", type=Path, required=True, help="Megatron checkpoint in the other layout")
    d.add_argument("--out", type=Path, required=True, help="new (or empty) output directory")
    d.add_argument(
        "--to",
        choices=["megatron-bridge", "ours"],
        required=True,
        help="megatron-bridge: read ours (any TP/EP, or torch_dist), write Megatron-Bridge's TP=1 layout; "
        "ours: read a Megatron-Bridge layout checkpoint, write ours for --tp/--ep",
    )
    d.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the output (--to ours)")
    d.add_argument("--ep", type=int, default=1, help="expert-parallel size of the output (--to ours)")
    d.add_argument("--hf-config", type=Path, help="config.json of the model (input without our manifest)")
    _add_discard(d)
    d.add_argument("--json", type=Path, help="write the report as JSON")
    d.set_defaults(
        func=run_relayout, io_paths=declare(mcore=IN_DIR, hf_config=IN_FILE, out=OUT_DIR, json=OUT_FILE)
    )


def _add_layout(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--layout",
        choices=["ours", "megatron-bridge"],
        default="ours",
        help="Megatron checkpoint layout: ours (default) or Megatron-Bridge 0.6.2's (TP=1 state dict in its "
        "names: V slot = K on K=V layers, zero K/V on KV-shared layers, shared_experts/TE names on MoE layers)",
    )


def _add_discard(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--discard-unused",
        action="store_true",
        help="Megatron-Bridge input: drop runtime-unused slots (V copy on K=V layers, K/V and k_layernorm of "
        "KV-shared layers, vocabulary padding) even when they differ from their canonical value (default: refuse)",
    )


def _text(head: str, report: dict[str, Any], tail: list[str] | None = None) -> str:
    return "\n".join([head, *(f"  note: {n}" for n in report.get("notes", [])), *(tail or [])])


def run_hf_to_mcore(args: argparse.Namespace) -> Result:
    """``convert hf-to-mcore``."""
    from gemma4.conversion.convert import hf_to_mcore_dir

    if args.layout == "megatron-bridge":
        from gemma4.conversion.megatron_bridge import hf_to_bridge_dir

        _bridge_tp1(args)
        if args.format != "safetensors":
            raise InvalidInputError("--format: --layout megatron-bridge writes safetensors only")
        report = hf_to_bridge_dir(args.hf_checkpoint, args.out)
    else:
        report = hf_to_mcore_dir(args.hf_checkpoint, args.out, tp=args.tp, ep=args.ep, fmt=args.format)
    layout = " Megatron-Bridge layout" if args.layout == "megatron-bridge" else ""
    head = (
        f"wrote{layout} Megatron checkpoint {report['out']} ({report['format']}, tp={report['tp']} "
        f"ep={report['ep']} {report['dtype']}, {report['hf_tensors']} HF tensors) in {report['seconds']:.2f} s"
    )
    return Result(report, _text(head, report))


def run_mcore_to_hf(args: argparse.Namespace) -> Result:
    """``convert mcore-to-hf``."""
    from gemma4.conversion.convert import mcore_to_hf_dir

    if args.layout == "megatron-bridge":
        from gemma4.conversion.megatron_bridge import bridge_to_hf_dir

        report = bridge_to_hf_dir(
            args.mcore,
            args.out,
            hf_config=args.hf_config,
            target=args.target,
            discard_unused=args.discard_unused,
        )
    else:
        if args.discard_unused:
            raise InvalidInputError("--discard-unused applies to --layout megatron-bridge input only")
        report = mcore_to_hf_dir(args.mcore, args.out, hf_config=args.hf_config, target=args.target)
    head = (
        f"wrote HF checkpoint {report['out']} ({report['hf_tensors']} tensors, {report['dtype']}) "
        f"in {report['seconds']:.2f} s"
    )
    return Result(report, _text(head, report))


def run_roundtrip(args: argparse.Namespace) -> Result:
    """``convert roundtrip``: exit 0 iff bit-exact, 1 otherwise."""
    from gemma4.conversion.convert import roundtrip

    if args.layout == "megatron-bridge":
        from gemma4.conversion.megatron_bridge import bridge_roundtrip

        _bridge_tp1(args)
        if args.format != "safetensors":
            raise InvalidInputError("--format: --layout megatron-bridge writes safetensors only")
        report = bridge_roundtrip(args.hf_checkpoint, workdir=args.workdir)
    else:
        report = roundtrip(args.hf_checkpoint, tp=args.tp, ep=args.ep, workdir=args.workdir, fmt=args.format)
    verdict = "bit-exact" if report["identical"] else f"{len(report['differences'])} differences"
    head = (
        f"roundtrip {args.hf_checkpoint} ({report['format']}{', megatron-bridge layout' if args.layout == 'megatron-bridge' else ''}) tp={report['tp']} ep={report['ep']} "
        f"{report['dtype']}: {report['tensors']} tensors, {verdict}"
    )
    tail = [f"  - {d}" for d in report["differences"][:20]] + ["PASS" if report["identical"] else "FAIL"]
    return Result.verdict(report, _text(head, report, tail), report["identical"])


def _bridge_tp1(args: argparse.Namespace) -> None:
    if args.tp != 1 or args.ep != 1:
        raise InvalidInputError(
            "--tp/--ep: --layout megatron-bridge writes a TP=1, EP=1 state dict (Megatron-Bridge reshards at load)"
        )


def run_relayout(args: argparse.Namespace) -> Result:
    """``convert relayout``: our Megatron layout <-> Megatron-Bridge 0.6.2's."""
    from gemma4.conversion.megatron_bridge import relayout_dir

    report = relayout_dir(
        args.mcore,
        args.out,
        args.to,
        hf_config=args.hf_config,
        tp=args.tp,
        ep=args.ep,
        discard_unused=args.discard_unused,
    )
    which = "Megatron-Bridge 0.6.2 layout" if args.to == "megatron-bridge" else "our layout"
    head = (
        f"wrote {which} checkpoint {report['out']} (tp={report['tp']} ep={report['ep']}, {report['tensors']} "
        f"tensors) in {report['seconds']:.2f} s"
    )
    return Result(report, _text(head, report))
