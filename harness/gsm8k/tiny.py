"""A random-weight checkpoint for ``--variant tiny``: ``python -m harness.gsm8k.tiny --out DIR --tokenizer TOK``.

The model is :func:`harness.gsm8k.variants.tiny_e2e_config` (the ``tiny-31b`` structure with Gemma 4's
262144-token vocabulary) with the reference builder's seeded non-trivial weights, saved by transformers in
bf16 as a ``Gemma4ForCausalLM``. The tokenizer files of ``TOK`` (a Gemma 4 tokenizer directory: its vocabulary
must have 262144 entries) are copied beside it. It earns no reward; it exercises weight sync and the
Megatron/SGLang log-prob agreement on one GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def write_tiny_checkpoint(out: Path, tokenizer_dir: Path, seed: int = 0) -> list[str]:
    """Write the checkpoint into the new (or empty) directory ``out``; returns the files written."""
    import torch

    from gemma4.config import hf_text_config_from_any
    from gemma4.errors import InvalidInputError
    from harness.gsm8k.variants import tiny_e2e_config
    from harness.reference import build_reference_model

    out, tokenizer_dir = Path(out), Path(tokenizer_dir)
    if out.exists() and any(out.iterdir()):
        raise InvalidInputError(f"--out {out}: directory exists and is not empty")
    present = [n for n in TOKENIZER_FILES if (tokenizer_dir / n).is_file()]
    if not any(n in present for n in ("tokenizer.json", "tokenizer.model")):
        raise InvalidInputError(f"--tokenizer {tokenizer_dir}: no tokenizer.json or tokenizer.model")
    cfg = tiny_e2e_config()
    model = build_reference_model(hf_text_config_from_any(cfg), torch.float32, seed=seed).to(torch.bfloat16)
    model.config.architectures = ["Gemma4ForCausalLM"]
    model.save_pretrained(out)
    for name in present:
        shutil.copy2(tokenizer_dir / name, out / name)
    (out / "gemma4_tiny_e2e.json").write_text(json.dumps({"seed": seed, "config": cfg}, indent=1) + "\n")
    return sorted(p.name for p in out.iterdir())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.gsm8k.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True, help="a Gemma 4 tokenizer directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from gemma4.errors import InvalidInputError

    try:
        files = write_tiny_checkpoint(args.out, args.tokenizer, args.seed)
    except InvalidInputError as exc:
        print(f"tiny: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
