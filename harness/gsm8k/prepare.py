"""Make the run's ``--ref-load``: an HF checkpoint -> a Megatron-LM load directory (``torch_dist``).

``python -m harness.gsm8k.prepare --hf-checkpoint DIR --out REF`` writes ``REF/release/`` with this project's
converter (``gemma4-harness convert hf-to-mcore --format torch_dist``: per-layer keys, which our model
provider loads with ``hetereogenous_dist_checkpoint=True``) and then Megatron-LM's tracker file
``REF/latest_checkpointed_iteration.txt`` = ``release``, last and atomically, so an interrupted prepare
leaves no directory Megatron would load. An existing complete ``REF`` is reused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gemma4.atomic_io import atomic_write_text

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"


def prepare(hf_dir: Path, out: Path) -> str:
    """Convert unless ``out`` is already complete; returns what was done."""
    out = Path(out)
    if (out / TRACKER).is_file() and (out / RELEASE).is_dir():
        return f"reusing {out} (tracker and {RELEASE}/ present)"
    from gemma4.conversion.convert import hf_to_mcore_dir

    out.mkdir(parents=True, exist_ok=True)
    report = hf_to_mcore_dir(Path(hf_dir), out / RELEASE, fmt="torch_dist")
    atomic_write_text(out / TRACKER, RELEASE)
    return f"converted {hf_dir} -> {out / RELEASE} ({report['dtype']}) in {report['seconds']:.1f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.gsm8k.prepare", description=__doc__.splitlines()[0]
    )
    from harness.commands._options import add_hf_checkpoint

    add_hf_checkpoint(parser, required=True, help="HF checkpoint directory", old="--hf")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from gemma4.errors import InvalidInputError

    try:
        print(prepare(args.hf_checkpoint, args.out), flush=True)
    except InvalidInputError as exc:
        print(f"prepare: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
