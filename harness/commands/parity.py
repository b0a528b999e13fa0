"""``gemma4-harness parity``: our Megatron model (or the implementation named by ``--impl``) against HF on a
preset, a config or a checkpoint. The summary's first lines name the implementation checked (``impl=...``).

Exit 0 when parity holds, 1 when it does not, 2 for invalid input (also: a config or layout the
implementation declares it cannot run).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from gemma4.atomic_io import atomic_write_bytes

if TYPE_CHECKING:
    from harness.parity.result import ParityResult, ParityTensors


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``parity`` subcommand."""
    from harness.cli_paths import IN_DIR, IN_FILE, OUT_DIR, OUT_FILE, declare
    from harness.commands._options import add_budget, add_seed, bounded_int, preset_help, preset_name
    from harness.exit_codes import epilog
    from harness.impls import impl_help

    p = sub.add_parser(
        "parity",
        help="compare our Megatron-Core Gemma 4 with HF transformers",
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", type=preset_name, help=preset_help())
    src.add_argument("--hf-config", type=Path, help="HF config.json; weights are random (seeded)")
    src.add_argument("--hf-checkpoint", type=Path, help="HF directory: config.json + safetensors")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32", "bfloat16"])
    p.add_argument("--batch", type=bounded_int("--batch", 1), default=2)
    p.add_argument("--seq-len", type=bounded_int("--seq-len", 2), default=24)
    add_seed(p)
    p.add_argument("--grads", action="store_true", help="also compare every parameter's gradient")
    p.add_argument(
        "--packed",
        help="one packed row of documents with these lengths, e.g. 8,12,4 "
        "(our model runs them packed; the reference runs each document alone)",
    )
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (forked gloo processes)")
    p.add_argument(
        "--cp", type=int, default=1, help="context parallel size (zig-zag, 2*cp chunks per sequence)"
    )
    p.add_argument("--ep", type=int, default=1, help="expert parallel size (MoE; EP ranks split the batch)")
    p.add_argument("--sequence-parallel", action="store_true", help="sequence parallelism (needs --tp > 1)")
    p.add_argument("--impl", metavar="NAME|module:attr", default=None, help=impl_help())
    p.add_argument("--dump", type=Path, help="write inputs/megatron/hf safetensors into this directory")
    p.add_argument("--json", type=Path, help="write the result as JSON")
    add_budget(p)
    p.set_defaults(
        func=run,
        io_paths=declare(hf_config=IN_FILE, hf_checkpoint=IN_DIR, dump=OUT_DIR, json=OUT_FILE),
    )


def write_dump(directory: Path, tensors: ParityTensors) -> None:
    """``inputs.safetensors`` (input_ids, and cu_seqlens for a packed row), ``megatron.safetensors`` and
    ``hf.safetensors`` (logits, run dtype)."""
    from safetensors.torch import save

    inputs = {"input_ids": tensors.input_ids}
    if tensors.cu_seqlens is not None:
        inputs["cu_seqlens"] = tensors.cu_seqlens
    files = {
        "inputs.safetensors": inputs,
        "megatron.safetensors": {"logits": tensors.megatron_logits},
        "hf.safetensors": {"logits": tensors.hf_logits},
    }
    for name, content in files.items():
        atomic_write_bytes(directory / name, save({k: v.contiguous() for k, v in content.items()}))


def run(args: argparse.Namespace) -> ParityResult:
    """Run the parity check; exit code 0/1 (2 is raised as InvalidInputError)."""
    import torch

    from gemma4.errors import InvalidInputError
    from harness.parity import DTYPES, RunLayout, resolve_source, run_parity

    packed = None
    if args.packed is not None:
        try:
            packed = tuple(int(x) for x in args.packed.split(","))
        except ValueError:
            raise InvalidInputError(
                f"--packed expects comma-separated lengths like 8,12,4, got {args.packed!r}"
            ) from None
    layout = RunLayout(
        tp=args.tp, cp=args.cp, ep=args.ep, sequence_parallel=args.sequence_parallel, packed=packed
    )
    from harness.impls import resolve_impl

    impl = resolve_impl(args.impl)
    source = resolve_source(args.preset, args.hf_config, args.hf_checkpoint)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    result = run_parity(
        source,
        DTYPES[args.dtype],
        batch=args.batch,
        seq_len=args.seq_len,
        seed=args.seed,
        grads=args.grads,
        layout=layout,
        timeout=args.deadline,
        force=args.force,
        impl=impl,
    )
    if args.dump:
        write_dump(args.dump, result.tensors)
    return result  # the CLI prints result.summary() and writes result.to_json() to --json
