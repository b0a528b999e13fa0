"""The full e2e command: every process the run starts, with its arguments and environment.

Two steps (``--dry-run`` prints both, runs neither):

1. ``prepare`` (unless ``--mcore-checkpoint`` names one): ``python -m harness.gsm8k.prepare`` converts the HF
   checkpoint into a Megatron ``torch_dist`` load directory (``<workdir>/ref/release`` plus Megatron's
   ``latest_checkpointed_iteration.txt``) with this project's converter; it is the run's ``--ref-load``.
2. ``train``: ``python -m harness.gsm8k.driver`` starts a private local Ray cluster (node address, dashboard
   and GCS on 127.0.0.1, its own temp dir) and runs slime's ``train.py`` in-process with the model flags of
   ``scripts/models/gemma4-<variant>.sh``, the plugin flags, a short GSM8K GRPO run (``--rm-type math``,
   ``--num-rollout 3``, small rollout batch) and ``--ci-test``.

The environment points every address at 127.0.0.1 and keeps the hub offline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from harness.gsm8k.model_args import read_model_args, script_path
from harness.gsm8k.variants import VARIANTS, RunSettings, Variant

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Options:
    """What the user chose (CLI flags or ``GEMMA4_*`` environment variables)."""

    variant: str
    checkpoint: Path | None = None
    dataset: Path | None = None
    eval_dataset: Path | None = None
    slime_dir: Path | None = None
    megatron_dir: Path | None = None
    workdir: Path | None = None
    mcore_checkpoint: Path | None = None
    settings: RunSettings = field(default_factory=RunSettings)
    timeout_s: int | None = None
    stall_timeout_s: int = 900
    python: str = sys.executable
    seed: int = 1234


@dataclass
class Step:
    """One process of the run."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path

    def shell(self) -> str:
        """The step as one shell line (environment overrides first)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"cd {shlex.quote(str(self.cwd))} && {env} {shlex.join(self.argv)}"


@dataclass
class Plan:
    """Everything the run will do, resolved."""

    variant: Variant
    settings: RunSettings
    options: Options
    workdir: Path
    ref_load: Path
    slime_dir: Path | None
    steps: list[Step]
    unset: list[str]
    timeout_s: int


def default_slime_dir() -> Path | None:
    """The checkout holding the importable ``slime`` package, if its ``train.py`` is there (no import)."""
    try:
        spec = importlib.util.find_spec("slime")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]).parent
    return root if (root / "train.py").is_file() else None


def _placeholder(flag: str) -> str:
    return f"<{flag}>"


def run_environment(options: Options) -> dict[str, str]:
    """Environment overrides of the train step (merged over the caller's environment)."""
    paths = [str(REPO)]
    if options.megatron_dir is not None:
        paths.append(str(options.megatron_dir))
    if options.slime_dir is not None:
        paths.append(str(options.slime_dir))
    return {
        "PYTHONPATH": os.pathsep.join(paths) + os.pathsep + "${PYTHONPATH}",
        "PYTHONUNBUFFERED": "1",
        "MASTER_ADDR": "127.0.0.1",
        "NCCL_SOCKET_IFNAME": "lo",
        "GLOO_SOCKET_IFNAME": "lo",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        "GEMMA4_SLIME_HOOKS": "1",
    }


def train_arguments(
    plan_variant: Variant, settings: RunSettings, options: Options, ref_load: str
) -> list[str]:
    """slime's ``train.py`` arguments (model flags from the variant's script first)."""
    v, s = plan_variant, settings
    ckpt = str(options.checkpoint) if options.checkpoint else _placeholder("--hf-checkpoint")
    data = str(options.dataset) if options.dataset else _placeholder("--dataset")
    args = list(read_model_args(script_path(v.name)))
    args += ["--hf-checkpoint", ckpt, "--ref-load", ref_load, "--load", ref_load]
    args += ["--finetune", "--no-load-optim", "--no-load-rng", "--bf16"]
    args += ["--actor-num-nodes", "1", "--actor-num-gpus-per-node", str(v.gpus), "--colocate"]
    args += [
        "--tensor-model-parallel-size", str(v.tp),
        *(["--sequence-parallel"] if v.sequence_parallel else []),
        "--pipeline-model-parallel-size", "1",
        "--context-parallel-size", "1",
        "--expert-model-parallel-size", str(v.ep),
        "--expert-tensor-parallel-size", "1",
        "--use-dynamic-batch-size",
        "--max-tokens-per-gpu", str(v.max_tokens_per_gpu),
        "--accumulate-allreduce-grads-in-fp32",
        "--attention-softmax-in-fp32",
    ]  # fmt: skip
    args += [
        "--prompt-data", data,
        "--input-key", s.input_key,
        "--label-key", s.label_key,
        "--apply-chat-template",
        "--rollout-shuffle",
        "--rm-type", "math",
        "--num-rollout", str(s.num_rollout),
        "--rollout-batch-size", str(s.rollout_batch_size),
        "--n-samples-per-prompt", str(s.n_samples_per_prompt),
        "--rollout-max-response-len", str(v.max_response_len),
        "--rollout-temperature", f"{s.rollout_temperature:g}",
        "--global-batch-size", str(s.global_batch_size),
    ]  # fmt: skip
    args += [
        "--advantage-estimator", "grpo",
        "--use-kl-loss", "--kl-loss-coef", "0.0", "--kl-loss-type", "low_var_kl",
        "--entropy-coef", "0.0",
        "--eps-clip", "0.2", "--eps-clip-high", "0.28",
        "--optimizer", "adam", "--lr", f"{s.lr:g}", "--lr-decay-style", "constant",
        "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.98",
        "--rollout-num-gpus-per-engine", str(v.rollout_gpus_per_engine),
        "--sglang-mem-fraction-static", "0.5",
        "--seed", str(options.seed),
    ]  # fmt: skip
    if options.eval_dataset is not None:
        args += [
            "--eval-interval", str(s.num_rollout),
            "--eval-prompt-data", "gsm8k", str(options.eval_dataset),
            "--n-samples-per-eval-prompt", "1",
            "--eval-max-response-len", str(v.max_response_len),
            "--eval-top-k", "1",
        ]  # fmt: skip
    return args + ["--ci-test"]


def ray_temp_dir(workdir: Path) -> str:
    """A short per-run Ray temp dir (Ray's socket paths must stay under ~107 characters)."""
    return f"/tmp/g4ray-{hashlib.sha256(str(workdir).encode()).hexdigest()[:10]}"


def build_plan(options: Options) -> Plan:
    """Resolve ``options`` into the steps of the run; unset required values stay as ``<--flag>``."""
    variant = VARIANTS[options.variant]
    settings = options.settings
    workdir = options.workdir or (Path.cwd() / "e2e-gsm8k" / variant.name)
    slime_dir = options.slime_dir or default_slime_dir()
    options = Options(**{**vars(options), "slime_dir": slime_dir})
    unset = [
        flag
        for flag, value in (("--hf-checkpoint", options.checkpoint), ("--dataset", options.dataset))
        if value is None
    ]
    if slime_dir is None:
        unset.append("--slime-dir")
    ref_load = options.mcore_checkpoint or (workdir / "ref")
    steps: list[Step] = []
    if options.mcore_checkpoint is None:
        steps.append(
            Step(
                "prepare",
                [
                    options.python,
                    "-m",
                    "harness.gsm8k.prepare",
                    "--hf-checkpoint",
                    str(options.checkpoint) if options.checkpoint else _placeholder("--hf-checkpoint"),
                    "--out",
                    str(ref_load),
                ],  # fmt: skip
                {"PYTHONPATH": f"{REPO}{os.pathsep}${{PYTHONPATH}}", "PYTHONUNBUFFERED": "1"},
                REPO,
            )
        )
    train_py = str(slime_dir / "train.py") if slime_dir else _placeholder("--slime-dir") + "/train.py"
    driver = [
        options.python, "-m", "harness.gsm8k.driver",
        "--num-gpus", str(variant.gpus),
        "--ray-temp-dir", ray_temp_dir(workdir),
        "--",
        train_py,
    ]  # fmt: skip
    steps.append(
        Step(
            "train",
            driver + train_arguments(variant, settings, options, str(ref_load)),
            run_environment(options),
            slime_dir or REPO,
        )
    )
    timeout = options.timeout_s or variant.timeout_s
    return Plan(variant, settings, options, workdir, Path(ref_load), slime_dir, steps, unset, timeout)


def resolved_env(step: Step, base: dict[str, str] | None = None) -> dict[str, str]:
    """The step's full environment: ``base`` (default: ours) with the overrides, ``${VAR}`` expanded."""
    env = dict(os.environ if base is None else base)
    for key, value in step.env.items():
        value = value.replace(f"${{{key}}}", env.get(key, ""))
        env[key] = value.rstrip(os.pathsep) if key == "PYTHONPATH" else value
    return env


def render_plan(plan: Plan, gates_text: str) -> str:
    """The ``--dry-run`` text: configuration, gates and every command, nothing run."""
    v, s = plan.variant, plan.settings
    lines = [
        f"e2e-gsm8k --variant {v.name} (dry run: nothing is started)",
        f"  model        {v.description}",
        f"  model args   {script_path(v.name).relative_to(REPO)}",
        f"  gpus         {v.gpus} x >= {v.min_gpu_memory_gib:g} GiB (tp {v.tp}, ep {v.ep}, "
        f"sequence parallel {'on' if v.sequence_parallel else 'off'}, sglang engine {v.rollout_gpus_per_engine} GPUs)",
        f"  rollouts     {s.num_rollout} x {s.rollout_batch_size} prompts x {s.n_samples_per_prompt} samples, "
        f"max response {v.max_response_len} tokens, global batch {s.global_batch_size}",
        f"  workdir      {plan.workdir}",
        f"  ref-load     {plan.ref_load}",
        f"  limits       timeout {plan.timeout_s} s, stall (no output) {plan.options.stall_timeout_s} s",
        f"  gates        {gates_text}",
    ]
    if plan.unset:
        lines.append(f"  unset        {', '.join(plan.unset)} (required for a real run)")
    for i, step in enumerate(plan.steps, 1):
        lines.append(f"step {i}/{len(plan.steps)}: {step.name}")
        lines.append(f"  cwd  {step.cwd}")
        lines += [f"  env  {k}={v}" for k, v in sorted(step.env.items())]
        lines.append("  argv " + " \\\n       ".join(_chunks(step.argv)))
    return "\n".join(lines)


def _chunks(argv: list[str]) -> list[str]:
    """Group ``argv`` into ``--flag value...`` chunks for display (quoted for a shell)."""
    out: list[list[str]] = []
    for word in argv:
        if word.startswith("--") or not out:
            out.append([word])
        else:
            out[-1].append(word)
    return [shlex.join(c) for c in out]
