"""Everything the e2e run needs, checked before anything starts; every missing piece is listed.

* GPUs: enough of them (``CUDA_VISIBLE_DEVICES`` honoured), each with enough memory (``nvidia-smi``).
* Python packages, probed with the run's own environment (``PYTHONPATH`` included) in a short subprocess
  that only looks them up (``importlib.util.find_spec``): slime, sglang, ray, Megatron-LM
  (``megatron.training``), megatron-core, torch, transformers and this project (``gemma4``).
* slime's ``train.py``; the HF checkpoint (``config.json`` of a Gemma 4 model whose sizes match the variant's
  model flags, safetensors weights, a tokenizer); the GSM8K data (JSONL rows with the input and label keys,
  or a Parquet file); an existing ``--mcore-checkpoint`` (Megatron's tracker file); the gates golden;
  a writable work directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from gemma4.config import CONFIG_FILE, read_hf_config
from gemma4.errors import InvalidInputError
from harness.gsm8k.command import Plan, resolved_env
from harness.gsm8k.model_args import read_model_args, script_path

MODULES = {
    "slime": "slime (THUDM/slime checkout on PYTHONPATH or pip install -e)",
    "sglang": "sglang (slime's rollout engine)",
    "ray": "ray",
    "megatron.training": "Megatron-LM (megatron.training; --megatron-dir or PYTHONPATH)",
    "megatron.core": "megatron-core",
    "torch": "torch",
    "transformers": "transformers",
    "gemma4": "this project (gemma4; the repository root on PYTHONPATH)",
}
GEMMA4_MODEL_TYPES = ("gemma4", "gemma4_text", "gemma4_unified")


@dataclass(frozen=True)
class Problem:
    """One missing or wrong piece."""

    what: str
    detail: str

    def __str__(self) -> str:
        return f"{self.what}: {self.detail}"


def gpu_inventory(timeout_s: float = 20.0) -> tuple[list[tuple[str, float]] | None, str]:
    """Visible GPUs as ``(name, memory GiB)``, or None and why (``nvidia-smi`` missing or failing)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None, "nvidia-smi not found (no NVIDIA driver on this machine)"
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"nvidia-smi failed ({exc})"
    if out.returncode != 0:
        return None, f"nvidia-smi exited {out.returncode}: {out.stderr.strip()[:200]}"
    gpus = []
    for row in out.stdout.strip().splitlines():
        parts = [p.strip() for p in row.split(",")]
        if len(parts) >= 3:
            try:
                gpus.append((parts[0], parts[1], float(parts[2]) / 1024.0))
            except ValueError:
                continue
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        keep = {v.strip() for v in visible.split(",") if v.strip()}
        gpus = [g for g in gpus if g[0] in keep]
    return [(name, mem) for _, name, mem in gpus], ""


def check_gpus(need: int, min_gib: float, inventory=None) -> list[Problem]:
    """GPU count and memory against the variant's needs."""
    gpus, why = inventory if inventory is not None else gpu_inventory()
    if gpus is None:
        return [Problem("GPUs", f"need {need} x >= {min_gib:g} GiB; {why}")]
    problems = []
    if len(gpus) < need:
        problems.append(
            Problem("GPUs", f"need {need}, {len(gpus)} visible ({', '.join(n for n, _ in gpus) or 'none'})")
        )
    small = [f"{n} ({m:.0f} GiB)" for n, m in gpus[:need] if m < min_gib]
    if small:
        problems.append(Problem("GPU memory", f"need >= {min_gib:g} GiB each; too small: {', '.join(small)}"))
    return problems


_PROBE = (
    "import importlib.util, json, sys\n"
    "out = {}\n"
    "for name in sys.argv[1:]:\n"
    "    try:\n"
    "        out[name] = importlib.util.find_spec(name) is not None\n"
    "    except Exception:\n"
    "        out[name] = False\n"
    "print(json.dumps(out))\n"
)


def check_modules(python: str, env: dict[str, str], timeout_s: float = 60.0) -> list[Problem]:
    """Look the run's packages up in the run's interpreter and environment."""
    try:
        out = subprocess.run(
            [python, "-c", _PROBE, *MODULES],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
            check=False,
        )
        found = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return [Problem("python", f"cannot probe packages with {python} ({exc})")]
    return [Problem("package", f"{MODULES[m]} is not importable") for m in MODULES if not found.get(m)]


def _flag(tokens: list[str], flag: str) -> str | None:
    return tokens[tokens.index(flag) + 1] if flag in tokens else None


def check_checkpoint(path: Path | None, variant: str) -> list[Problem]:
    """An HF Gemma 4 checkpoint whose sizes match the variant's model flags."""
    if path is None:
        return [Problem("checkpoint", "not given (--hf-checkpoint DIR or GEMMA4_E2E_CHECKPOINT)")]
    path = Path(path)
    if not path.is_dir():
        return [Problem("checkpoint", f"{path}: directory not found")]
    problems = []
    config_path = path / CONFIG_FILE
    try:
        config = read_hf_config(config_path)  # the product's one config.json reader (no model built here)
    except InvalidInputError as exc:
        why = str(exc).removeprefix(f"{config_path}: ")
        return [Problem("checkpoint", f"{config_path}: missing or unreadable ({why})")]
    raw, text = config.raw, config.text
    model_type = raw.get("model_type")
    if model_type not in GEMMA4_MODEL_TYPES:
        problems.append(
            Problem("checkpoint", f"{path / 'config.json'}: model_type {model_type!r} is not Gemma 4")
        )
    tokens = read_model_args(script_path(variant))
    for flag, key in (
        ("--num-layers", "num_hidden_layers"),
        ("--hidden-size", "hidden_size"),
        ("--num-attention-heads", "num_attention_heads"),
        ("--vocab-size", "vocab_size"),
        ("--num-experts", "num_experts"),
    ):
        want = _flag(tokens, flag)
        have = text.get(key)
        if want is not None and str(have) != want:
            problems.append(
                Problem(
                    "checkpoint",
                    f"{path}: config.json {key} = {have!r}, but the {variant} model flags say {flag} {want}",
                )
            )
    if not (
        (path / "model.safetensors").is_file()
        or (path / "model.safetensors.index.json").is_file()
        or any(path.glob("*.safetensors"))
    ):
        problems.append(Problem("checkpoint", f"{path}: no safetensors weights"))
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        problems.append(Problem("checkpoint", f"{path}: no tokenizer (tokenizer.json or tokenizer.model)"))
    return problems


def check_dataset(
    path: Path | None, what: str, input_key: str, label_key: str, required: bool = True
) -> list[Problem]:
    """GSM8K prompts: JSONL rows with ``input_key`` and ``label_key``, or a Parquet file."""
    if path is None:
        return [Problem(what, "not given (--dataset FILE or GEMMA4_GSM8K_DATA)")] if required else []
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return [Problem(what, f"{path}: file not found or empty")]
    if path.suffix == ".parquet":
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(-4, os.SEEK_END)
            tail = f.read(4)
        return (
            [] if head == tail == b"PAR1" else [Problem(what, f"{path}: not a Parquet file (no PAR1 magic)")]
        )
    if path.suffix not in (".jsonl", ".json"):
        return [Problem(what, f"{path}: unsupported format {path.suffix!r} (use .jsonl or .parquet)")]
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return [Problem(what, f"{path}: first line is not JSON ({exc})")]
    if not isinstance(first, dict):
        return [Problem(what, f"{path}: rows must be JSON objects")]
    missing = [k for k in (input_key, label_key) if k not in first]
    return [Problem(what, f"{path}: first row lacks {missing} (--input-key/--label-key)")] if missing else []


def preflight(plan: Plan, inventory=None, check_packages: bool = True) -> list[Problem]:
    """Every problem that would stop or spoil the run (empty list: go)."""
    v, o, s = plan.variant, plan.options, plan.settings
    problems = check_gpus(v.gpus, v.min_gpu_memory_gib, inventory)
    train = plan.steps[-1]
    if check_packages:
        problems += check_modules(o.python, resolved_env(train))
    if plan.slime_dir is None:
        problems.append(
            Problem("slime", "train.py not found (--slime-dir DIR or GEMMA4_SLIME_DIR: a slime checkout)")
        )
    elif not (plan.slime_dir / "train.py").is_file():
        problems.append(Problem("slime", f"{plan.slime_dir / 'train.py'}: not found"))
    if o.megatron_dir is not None and not (Path(o.megatron_dir) / "megatron" / "training").is_dir():
        problems.append(Problem("Megatron-LM", f"{o.megatron_dir}: no megatron/training inside"))
    problems += check_checkpoint(o.checkpoint, v.name)
    problems += check_dataset(o.dataset, "dataset", s.input_key, s.label_key)
    problems += check_dataset(o.eval_dataset, "eval dataset", s.input_key, s.label_key, required=False)
    if (
        o.mcore_checkpoint is not None
        and not (Path(o.mcore_checkpoint) / "latest_checkpointed_iteration.txt").is_file()
    ):
        problems.append(
            Problem(
                "mcore checkpoint",
                f"{o.mcore_checkpoint}: no latest_checkpointed_iteration.txt (Megatron load dir)",
            )
        )
    try:
        plan.workdir.mkdir(parents=True, exist_ok=True)
        probe = plan.workdir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        problems.append(Problem("workdir", f"{plan.workdir}: not writable ({exc})"))
    return problems
