"""The e2e loop: sync, roll out, check train/rollout agreement, step; repeat; gate.

One run, with ``steps`` optimizer steps, does ``steps + 1`` iterations ``k = 0 .. steps``:

1. sync ``k``: the trainer's weights go to the rollout engine through the streaming converter
   (:mod:`harness.e2e.sync`; sync 0 happens before the first rollout, as slime does) and, when SGLang 0.5.23
   is importable, through SGLang's own ``load_weights`` name routing (:mod:`harness.e2e.sglang_route`; the
   result's ``weight_routing`` says which);
2. rollout (rank 0, HF engine): per prompt, ``group_size`` sampled responses (GRPO group) and one
   greedy response (evaluated, not trained), each with its generation-time log-probs;
3. the batch goes to every rank; the trainer computes its own log-probs of the same tokens and the
   per-token gap, the KL to the reference, and checks the loss mask against the engine's lengths;
4. ``k < steps``: one GRPO step (loss, backward, Adam), checked to have changed weights and log-probs.

Layouts: TP = EP = 1 runs in this process; otherwise the trainer runs on ``tp x ep`` forked gloo ranks
(:func:`harness.distributed.run_distributed`) and the engine lives on rank 0. Under EP the ranks split the
batch rows (data parallel); MoE under TP uses sequence parallelism (Megatron requires it).

Vocabulary: the tiny presets' 256-token vocabulary cannot hold a real tokenizer, so the run builds the
deterministic Gemma-4-like test tokenizer (:func:`harness.testing.chat.build_test_tokenizer`, the Gemma 4
special-token ids) and sets the preset's ``vocab_size`` to its size (576). Prompts come from the reference
chat template (``add_generation_prompt``, thinking off).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from gemma4.atomic_io import temp_dir
from gemma4.errors import InvalidInputError
from harness.e2e import gates
from harness.e2e.batch import grpo_advantages, make_sample, pack
from harness.e2e.sglang_route import make_router
from harness.e2e.sync import sync_weights
from harness.e2e.tasks import make_problems, reward
from harness.provenance import software_versions

DTYPES = {"float64": torch.float64, "float32": torch.float32}
STOP_TOKENS = ("<turn|>", "<eos>")  # the end of a model turn, and the tokenizer's eos


@dataclass(frozen=True)
class E2EConfig:
    """Everything that determines a run (same config + same versions = same numbers)."""

    preset: str = "tiny-31b"
    dtype: str = "float64"
    steps: int = 2
    tp: int = 1
    ep: int = 1
    prompts: int = 2
    group_size: int = 8
    max_new_tokens: int = 16
    seed: int = 0
    lr: float = 1e-4
    kl_coef: float = 0.01
    clip_eps: float = 0.2
    grad_clip: float = 1.0
    bucket_bytes: int = 256 * 1024
    timeout: float | None = None  # rank deadline; None: $GEMMA4_RANK_DEADLINE_S or the runner default

    @property
    def rows(self) -> int:
        """Rollouts per iteration: a GRPO group and one greedy response per prompt."""
        return self.prompts * (self.group_size + 1)


@dataclass
class _Setup:
    """What every rank needs (inherited through fork)."""

    cfg: E2EConfig
    dtype: torch.dtype
    spec: Any
    hf_config: Any
    checkpoint: str
    full_weights: dict[str, torch.Tensor]
    prompt_ids: list[list[int]]
    answers: list[int]
    stop_ids: list[int]
    pad_id: int
    sequence_parallel: bool
    router: Any = None  # harness.e2e.sglang_route.SGLangRouter (built before any rank is forked) or None
    routing: str = ""  # sglang-0.5.23, or strict engine (SGLang not importable: reason)


def validate(cfg: E2EConfig, spec: Any) -> bool:
    """Refuse what cannot run, naming the flag; returns whether sequence parallelism is used."""
    from harness.parity import RunLayout, validate_layout

    if cfg.dtype not in DTYPES:
        raise InvalidInputError(f"--dtype {cfg.dtype!r}: choose from {sorted(DTYPES)}")
    for flag, value, low in (
        ("--steps", cfg.steps, 1),
        ("--prompts", cfg.prompts, 1),
        ("--group-size", cfg.group_size, 2),
        ("--max-new-tokens", cfg.max_new_tokens, 1),
    ):
        if value < low:
            raise InvalidInputError(f"{flag} must be >= {low}, got {value}")
    if not cfg.lr > 0:
        raise InvalidInputError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.bucket_bytes < 1:
        raise InvalidInputError(f"--bucket-kib must be > 0, got {cfg.bucket_bytes / 1024:g}")
    if cfg.ep > 1 and cfg.rows % cfg.ep:
        raise InvalidInputError(
            f"--ep {cfg.ep}: expert-parallel ranks split the {cfg.rows} rollouts per iteration "
            f"(--prompts x (--group-size + 1)); choose sizes that --ep divides"
        )
    sp = cfg.tp > 1 and spec.enable_moe
    layout = RunLayout(tp=cfg.tp, ep=cfg.ep, sequence_parallel=sp)
    validate_layout(spec, layout, batch=cfg.rows, seq_len=2 * cfg.tp)
    if spec.enable_moe and cfg.tp > 1 and spec.moe_intermediate_size % cfg.tp:
        raise InvalidInputError(
            f"--tp {cfg.tp} does not divide moe_intermediate_size = {spec.moe_intermediate_size}"
        )
    return sp


def prepare(cfg: E2EConfig, workdir: Path) -> _Setup:
    """Tokenizer + config "checkpoint" in ``workdir``, initial weights, prompts."""
    from gemma4.chat.tokenizer import load_tokenizer
    from gemma4.config import hf_text_config_from_any, text_spec_from_hf
    from gemma4.conversion.mapping import hf_to_mcore
    from harness.assets import load_gemma4_chat_template
    from harness.presets import preset_config_dict
    from harness.reference import build_reference_model, hf_text_state_dict
    from harness.testing.chat import build_test_tokenizer

    # The project's own Gemma 4-format template (package data): e2e-mini needs no reference data.
    template = load_gemma4_chat_template()
    checkpoint = build_test_tokenizer(workdir / "checkpoint", chat_template=template)
    tokenizer = load_tokenizer(checkpoint)
    config = preset_config_dict(cfg.preset)
    config["vocab_size"] = len(tokenizer)
    if config.get("hidden_size_per_layer_input"):  # E-series: the per-layer embedding table has its own vocab
        config["vocab_size_per_layer_input"] = len(tokenizer)
    (checkpoint / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    hf_config = hf_text_config_from_any(config)
    spec = text_spec_from_hf(hf_config)
    sp = validate(cfg, spec)
    dtype = DTYPES[cfg.dtype]
    initial = hf_text_state_dict(build_reference_model(hf_config, dtype, seed=cfg.seed))
    # The reference draw's N(0, 1) embeddings give a tied head logits of std ~sqrt(H): after the softcap a
    # nearly deterministic policy whose sampled responses are all alike (no GRPO signal). Scale them to
    # std H^-1/2 so that the initial policy has entropy; every other weight is the reference draw.
    initial["embed_tokens.weight"] = initial["embed_tokens.weight"] * spec.hidden_size**-0.5
    full_weights = hf_to_mcore(initial, spec)
    problems = make_problems(cfg.prompts, cfg.seed)
    prompt_ids = []
    for problem in problems:
        messages = [{"role": "user", "content": problem.question + " Give the final number after ####."}]
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        prompt_ids.append([int(t) for t in ids])
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    return _Setup(
        cfg=cfg,
        dtype=dtype,
        spec=spec,
        hf_config=hf_config,
        checkpoint=str(checkpoint),
        full_weights=full_weights,
        prompt_ids=prompt_ids,
        answers=[p.answer for p in problems],
        stop_ids=stop_ids,
        pad_id=int(tokenizer.pad_token_id),
        sequence_parallel=sp,
    )


# ---- rank 0: rollouts ------------------------------------------------------------------------------------


def collect_rollouts(
    engine: Any, tokenizer: Any, setup: _Setup, iteration: int
) -> tuple[list, dict[str, Any]]:
    """Samples of one iteration (per prompt: the GRPO group, then the greedy response) and their stats."""
    cfg = setup.cfg
    samples, deviation = [], 0.0
    for p, prompt in enumerate(setup.prompt_ids):
        seed = cfg.seed * 1_000_003 + iteration * 1009 + p
        sampled = engine.generate(
            prompt, cfg.group_size, greedy=False, seed=seed, max_new_tokens=cfg.max_new_tokens
        )
        greedy = engine.generate(prompt, 1, greedy=True, seed=seed, max_new_tokens=cfg.max_new_tokens)
        group = []
        for g in sampled + greedy:
            s = make_sample(
                p,
                g.prompt_ids,
                g.response_ids,
                g.logprobs,
                greedy=g.greedy,
                finished=g.finished,
                vocab_size=setup.spec.vocab_size,
            )
            text = tokenizer.decode(g.response_ids, skip_special_tokens=True)
            s.reward, s.exact_match, s.format_reward = reward(text, setup.answers[p])
            deviation = max(deviation, g.sampler_deviation)
            group.append(s)
        train = [s for s in group if not s.greedy]
        for s, a in zip(train, grpo_advantages([s.reward for s in train])):
            s.advantage = a
        samples += group
    train = [s for s in samples if not s.greedy]
    greedy = [s for s in samples if s.greedy]
    digest = hashlib.sha256(json.dumps([s.token_ids for s in samples]).encode()).hexdigest()[:16]
    stats = {
        "reward_mean": sum(s.reward for s in train) / len(train),
        "exact_match_sampled": sum(s.exact_match for s in train) / len(train),
        "exact_match_greedy": sum(s.exact_match for s in greedy) / len(greedy),
        "format_reward_mean": sum(s.format_reward for s in train) / len(train),
        "advantage_abs_mean": sum(abs(s.advantage) for s in train) / len(train),
        "nonzero_advantages": sum(1 for s in train if s.advantage != 0.0),
        "response_length_mean": sum(s.response_length for s in samples) / len(samples),
        "finished": sum(1 for s in samples if s.finished),
        "sampler_deviation": deviation,
        "rollout_digest": digest,
    }
    return samples, stats


_BATCH_KEYS = (
    ("input_ids", torch.long),
    ("loss_mask", torch.long),
    ("prompt_length", torch.long),
    ("response_length", torch.long),
    ("rollout_logprobs", None),
    ("advantages", None),
    ("train", torch.bool),
)


def broadcast_batch(
    batch: dict[str, torch.Tensor] | None, rows: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Rank 0's batch on every rank (tensors only: a shape header, then each tensor)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return batch
    header = torch.zeros(1, dtype=torch.long)
    if batch is not None:
        header[0] = batch["input_ids"].shape[1]
    dist.broadcast(header, src=0)
    length = int(header[0])
    shapes = {
        "input_ids": (rows, length),
        "loss_mask": (rows, length),
        "prompt_length": (rows,),
        "response_length": (rows,),
        "rollout_logprobs": (rows, length - 1),
        "advantages": (rows,),
        "train": (rows,),
    }
    out = {}
    for key, kdtype in _BATCH_KEYS:
        t = batch[key].contiguous() if batch is not None else torch.empty(shapes[key], dtype=kdtype or dtype)
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
            dist.broadcast(t, src=0)
            t = t.bool()
        else:
            dist.broadcast(t, src=0)
        out[key] = t
    return out


# ---- every rank ------------------------------------------------------------------------------------------


def rank_main(rank: int, world: int, setup: _Setup) -> list[dict[str, Any]] | None:
    """The whole loop on one rank; rank 0 returns the per-iteration records."""
    import types

    from gemma4.chat.tokenizer import load_tokenizer
    from harness.e2e.engine import RolloutEngine
    from harness.e2e.trainer import Trainer

    cfg = setup.cfg
    trainer = Trainer(
        setup.spec,
        setup.dtype,
        setup.full_weights,
        tp=cfg.tp,
        ep=cfg.ep,
        sequence_parallel=setup.sequence_parallel,
        lr=cfg.lr,
        kl_coef=cfg.kl_coef,
        clip_eps=cfg.clip_eps,
        grad_clip=cfg.grad_clip,
    )
    engine = tokenizer = None
    if rank == 0:
        engine = RolloutEngine(
            setup.hf_config,
            setup.dtype,
            initial_seed=cfg.seed + 7919,
            stop_token_ids=setup.stop_ids,
            pad_token_id=setup.pad_id,
            router=setup.router,
        )
        tokenizer = load_tokenizer(setup.checkpoint)
    args = types.SimpleNamespace(hf_checkpoint=setup.checkpoint)  # slime's --hf-checkpoint
    multiple = cfg.tp if setup.sequence_parallel else 1
    records: list[dict[str, Any]] = []
    sync_weights(trainer.actor, engine, args, cfg.bucket_bytes, index=0)
    for k in range(cfg.steps + 1):
        t0 = time.perf_counter()
        batch, rec = None, {"iteration": k}
        if engine is not None:
            last = engine.syncs[-1] if engine.syncs else None
            rec["sync"] = None if last is None else last.to_json()
            samples, stats = collect_rollouts(engine, tokenizer, setup, k)
            rec.update(stats)
            batch = pack(samples, setup.pad_id, multiple, setup.dtype)
        t1 = time.perf_counter()
        batch = broadcast_batch(batch, cfg.rows, setup.dtype)
        update = k < cfg.steps
        rec.update(trainer.iteration(batch, update))
        t2 = time.perf_counter()
        if update:
            sync_weights(trainer.actor, engine, args, cfg.bucket_bytes, index=k + 1)
        rec["timings_s"] = {"rollout": t1 - t0, "train": t2 - t1, "sync": time.perf_counter() - t2}
        records.append(rec)
    return records if rank == 0 else None


def run_e2e(cfg: E2EConfig) -> dict[str, Any]:
    """Run the smoke; returns the JSON-ready result (``pass``, ``failures``, ``max_logprob_gap``, ``steps``)."""
    import os

    from harness.distributed import Parallelism, run_distributed

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer is used again after fork
    t0 = time.perf_counter()
    with temp_dir("gemma4-e2e-") as tmp:
        setup = prepare(cfg, Path(tmp))
        config = json.loads((Path(setup.checkpoint) / "config.json").read_text())
        setup.router, setup.routing = make_router(config, setup.dtype)  # before forking: see sglang_route
        world = cfg.tp * cfg.ep
        if world == 1:
            from gemma4.runtime import init_single_process

            init_single_process()
            records = rank_main(0, 1, setup)
        else:
            par = Parallelism(tp=cfg.tp, ep=cfg.ep, sequence_parallel=setup.sequence_parallel)
            records = run_distributed(rank_main, par, setup, timeout=cfg.timeout)[0]
    failures = gates.evaluate(records, setup.dtype, cfg.steps)
    bound = gates.gap_bound(setup.dtype)
    return {
        "pass": not failures,
        "failures": failures,
        "preset": cfg.preset,
        "dtype": cfg.dtype,
        "layout": {
            "tp": cfg.tp,
            "ep": cfg.ep,
            "sequence_parallel": setup.sequence_parallel,
            "world_size": cfg.tp * cfg.ep,
            "rollout_engine": (
                "HF Gemma4ForCausalLM in this process" if world == 1 else "HF Gemma4ForCausalLM on rank 0"
            )
            + f"; weights routed by {setup.routing}",
        },
        "weight_routing": setup.routing,
        "num_steps": cfg.steps,
        "max_logprob_gap": max(r["logprob_gap_max"] for r in records),
        "step0_kl": records[0]["kl_ref_max"],
        "tolerance": {
            "logprob_gap": bound,
            "logprob_gap_why": gates.GAP_WHY,
            "step0_kl": gates.KL0_BOUND,
            "detectable_factor": gates.DETECTABLE_FACTOR,
        },
        "steps": records,
        "config": asdict(cfg) | {"vocab_size": setup.spec.vocab_size},
        "notes": [
            f"weight routing: {setup.routing}"
            + (
                " (every synced tensor went through SGLang's own Gemma4ForCausalLM.load_weights; the engine "
                "holds what it loaded)"
                if setup.router is not None
                else ""
            ),
            f"vocab_size overridden to the test tokenizer's {setup.spec.vocab_size} tokens"
            + (" (and vocab_size_per_layer_input)" if setup.spec.ple_dim else ""),
            "initial embeddings = the reference draw scaled by hidden_size^-1/2 (an initial policy with entropy)",
            "reward = exact match on the final number + 0.1 x fraction of answer characters (format reward)",
        ],
        "timings_s": {"total": time.perf_counter() - t0},
        "versions": software_versions(),
    }
