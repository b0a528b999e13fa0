"""Loading a standard HF tokenizer folder offline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gemma4.errors import InvalidInputError


def load_tokenizer(directory: str | os.PathLike[str]) -> Any:
    """Load the tokenizer in ``directory`` (``tokenizer.json``, ``tokenizer_config.json``, optionally
    ``chat_template.jinja``) with transformers, from local files only. Errors name the directory."""
    path = Path(directory)
    if not path.is_dir():
        raise InvalidInputError(f"{path}: tokenizer directory not found")
    if not (path / "tokenizer.json").is_file():
        raise InvalidInputError(f"{path}: no tokenizer.json (a fast Hugging Face tokenizer folder is needed)")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # any loader failure is a problem with the folder
        first = exc
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    except Exception:
        raise InvalidInputError(f"{path}: transformers cannot load this tokenizer: {first}") from None
