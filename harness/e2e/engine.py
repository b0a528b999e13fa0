"""The rollout engine: an HF ``Gemma4ForCausalLM`` that generates and takes weights only by name.

It plays SGLang's part in slime: it decodes with a KV cache (greedy, or sampled at temperature 1 with
no top-k / top-p, so the sampler draws from exactly the policy whose log-probs are reported), returns
the log-prob of every generated token as computed at generation time, and receives new weights through
:meth:`RolloutEngine.load_weights` as ``(hf_name, tensor)`` pairs, bucket by bucket, the way SGLang's
``update_weights_from_tensor`` does. Experts arrive under the only per-expert names SGLang 0.5.23 routes,
``layers.{L}.experts.{e}.{gate,up,down}_proj.weight`` (``(out, in)``; see
:mod:`gemma4.conversion.streaming`): ``gate_proj`` / ``up_proj`` are written into rows ``:I`` / ``I:`` of
expert ``e`` of the fused ``experts.gate_up_proj``, ``down_proj`` into expert ``e`` of ``experts.down_proj``,
as SGLang's FusedMoE ``weight_loader`` (shards ``w1`` / ``w3`` / ``w2``, ``expert_id``) does. Any other
expert name (e.g. ``experts.{e}.gate_up_proj``, which SGLang skips) is an unknown tensor here.

With a router (:class:`harness.e2e.sglang_route.SGLangRouter`, what ``e2e-mini`` uses whenever SGLang 0.5.23
is importable), the buckets go into SGLang's own ``load_weights`` instead, and at :meth:`end_sync` the model
receives SGLang's loaded parameters, read back under HF names through the same strict intake; SGLang's
skipped names, double writes and unwritten regions are the sync's errors.

Generation-time log-probs come from the model's own logits (captured by a forward hook at each decoding
step, in the run dtype): ``generate`` hands the sampler an fp32 copy of them, which would cap an fp64
comparison at fp32 rounding. Both are recorded; the sampler's must equal the policy's fp32 logits exactly.

Every sync is bracketed by :meth:`begin_sync` / :meth:`end_sync`, which report what arrived: tensors
never received, tensors received twice, unknown names, shape or dtype mismatches, and how far the
weights moved.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

_EXPERT_SLICE = re.compile(
    r"^(?P<head>.*\.experts)\.(?P<e>\d+)\.(?P<kind>gate_proj|up_proj|down_proj)\.weight$"
)


@dataclass
class Generation:
    """One decoded response: token ids (stop token included), their generation-time log-probs."""

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: torch.Tensor  # [len(response_ids)], fp64 for fp64 runs, fp32 otherwise
    greedy: bool
    finished: bool  # stopped by a stop token (else cut at max_new_tokens)
    sampler_deviation: float  # max |sampler logits - fp32(policy logits)| over the response


@dataclass
class SyncRecord:
    """What the engine received in one weight sync."""

    index: int
    buckets: int = 0
    hf_tensors: int = 0
    megatron_params: int = 0
    bytes: int = 0
    max_change: float = 0.0
    missing: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON form (lists cut to their first 10 names)."""
        return {
            "index": self.index,
            "buckets": self.buckets,
            "hf_tensors": self.hf_tensors,
            "megatron_params": self.megatron_params,
            "bytes": self.bytes,
            "rollout_weights_max_change": self.max_change,
            "missing": self.missing[:10],
            "num_missing": len(self.missing),
            "errors": self.errors[:10],
            "num_errors": len(self.errors),
        }


class RolloutEngine:
    """HF Gemma 4 for generation; its weights come only through :meth:`load_weights`.

    ``initial_seed`` draws the engine's starting weights (deliberately not the trainer's: the first sync
    is what makes them equal, as slime syncs before the first rollout).
    """

    def __init__(
        self,
        hf_text_config: Any,
        dtype: torch.dtype,
        *,
        initial_seed: int,
        stop_token_ids: Sequence[int],
        pad_token_id: int,
        router: Any = None,
    ) -> None:
        from harness.reference import build_reference_model

        self.dtype = dtype
        self.model = build_reference_model(hf_text_config, dtype, seed=initial_seed)
        self.stop_token_ids = tuple(int(t) for t in stop_token_ids)
        self.pad_token_id = int(pad_token_id)
        tied = bool(self.model.config.tie_word_embeddings)
        self._targets: dict[str, torch.Tensor] = {
            k: v
            for k, v in self.model.state_dict(keep_vars=True).items()
            if not (tied and k == "lm_head.weight")
        }
        #: (fused or plain HF name, expert, part): part is gate_proj / up_proj / down_proj for experts
        self._expected: set[tuple[str, int | None, str | None]] = set()
        for name, t in self._targets.items():
            if name.endswith("experts.gate_up_proj"):
                self._expected.update(
                    (name, e, k) for e in range(t.shape[0]) for k in ("gate_proj", "up_proj")
                )
            elif name.endswith("experts.down_proj"):
                self._expected.update((name, e, "down_proj") for e in range(t.shape[0]))
            else:
                self._expected.add((name, None, None))
        self._current: SyncRecord | None = None
        self._received: set[tuple[str, int | None, str | None]] = set()
        self.syncs: list[SyncRecord] = []
        #: :class:`harness.e2e.sglang_route.SGLangRouter` or None (the converter's names are taken directly)
        self.router = router
        if router is not None:
            router.bind({k: tuple(v.shape) for k, v in self._targets.items()})

    # ---- weights ---------------------------------------------------------------------------------------

    def begin_sync(self, index: int) -> None:
        """Start receiving the weights of sync ``index``."""
        self._current = SyncRecord(index)
        self._received = set()
        if self.router is not None:
            self.router.begin()

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Receive one bucket of ``(hf_name, tensor)`` pairs (absolute HF names): into SGLang's
        ``load_weights`` when routed (the model is written at :meth:`end_sync`), else into the model."""
        rec = self._current
        if rec is None:
            raise RuntimeError("load_weights outside begin_sync/end_sync")
        rec.buckets += 1
        if self.router is not None:
            self.router.load(named_tensors)
            return
        self._intake(rec, named_tensors)

    def _intake(self, rec: SyncRecord, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Write ``(hf_name, tensor)`` pairs into the model, refusing (named) what does not fit it."""
        with torch.no_grad():
            for name, tensor in named_tensors:
                m = _EXPERT_SLICE.match(name)
                key: tuple[str, int | None, str | None]
                if m is not None:
                    kind, e = m.group("kind"), int(m.group("e"))
                    fused = f"{m.group('head')}.{'down_proj' if kind == 'down_proj' else 'gate_up_proj'}"
                    key = (fused, e, kind)
                    target = self._targets.get(fused)
                    if target is not None and e >= target.shape[0]:
                        target = None
                    dst = None if target is None else target[e]
                    if dst is not None and kind != "down_proj":  # rows [gate; up] of gate_up_proj[e]
                        dst = dst.chunk(2, dim=0)[0 if kind == "gate_proj" else 1]
                else:
                    key = (name, None, None)
                    dst = self._targets.get(name)
                if dst is None:
                    rec.errors.append(f"unknown tensor {name!r}")
                    continue
                if key in self._received:
                    rec.errors.append(f"tensor {name!r} received twice")
                    continue
                if tuple(tensor.shape) != tuple(dst.shape):
                    rec.errors.append(
                        f"tensor {name!r}: shape {tuple(tensor.shape)}, the engine holds {tuple(dst.shape)}"
                    )
                    continue
                if tensor.dtype != dst.dtype:
                    rec.errors.append(f"tensor {name!r}: dtype {tensor.dtype}, the engine runs {dst.dtype}")
                    continue
                self._received.add(key)
                rec.max_change = max(
                    rec.max_change, float((dst - tensor).abs().max()) if dst.numel() else 0.0
                )
                dst.copy_(tensor)
                rec.hf_tensors += 1
                rec.bytes += tensor.numel() * tensor.element_size()

    def end_sync(self, megatron_params: int) -> SyncRecord:
        """Close the sync: record what never arrived and return the record."""
        rec = self._current
        if rec is None:
            raise RuntimeError("end_sync without begin_sync")
        if self.router is not None:  # the model receives what SGLang loaded, read back under HF names
            tensors, errors = self.router.finish()
            rec.errors += errors
            self._intake(rec, tensors)
        rec.megatron_params = megatron_params
        rec.missing = sorted(
            name if e is None else f"{name}[{e}]" + ("" if kind == "down_proj" else f".{kind}")
            for name, e, kind in self._expected - self._received
        )
        self.syncs.append(rec)
        self._current = None
        return rec

    # ---- generation ------------------------------------------------------------------------------------

    def generate(
        self, prompt_ids: Sequence[int], n: int, *, greedy: bool, seed: int, max_new_tokens: int
    ) -> list[Generation]:
        """``n`` responses to one prompt (same length, so no padding), sampled with ``seed`` or greedy."""
        captured: list[torch.Tensor] = []
        hook = self.model.register_forward_hook(
            lambda mod, args, out: captured.append(out.logits[:, -1].detach().clone())
        )
        ids = torch.tensor([list(prompt_ids)] * n, dtype=torch.long)
        try:
            torch.manual_seed(seed)
            with torch.no_grad():
                out = self.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=not greedy,
                    temperature=1.0 if not greedy else None,
                    top_k=0 if not greedy else None,
                    top_p=1.0 if not greedy else None,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=list(self.stop_token_ids),
                    pad_token_id=self.pad_token_id,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
        finally:
            hook.remove()
        prompt_len = ids.shape[1]
        new = out.sequences[:, prompt_len:]
        steps = new.shape[1]
        if len(captured) != steps or len(out.scores) != steps:
            raise RuntimeError(f"captured {len(captured)} logit steps for {steps} generated tokens")
        cdt = torch.promote_types(self.dtype, torch.float32)
        policy = torch.stack(captured, dim=1).to(cdt)  # [n, steps, V]
        sampler = torch.stack(out.scores, dim=1)  # what generate sampled from (fp32)
        logprobs = torch.log_softmax(policy, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        result = []
        for i in range(n):
            row = new[i].tolist()
            stop = next((j for j, t in enumerate(row) if t in self.stop_token_ids), None)
            length = steps if stop is None else stop + 1
            dev = (
                (sampler[i, :length] - policy[i, :length].float()).abs().max()
                if length
                else torch.tensor(0.0)
            )
            result.append(
                Generation(
                    prompt_ids=list(prompt_ids),
                    response_ids=row[:length],
                    logprobs=logprobs[i, :length].clone(),
                    greedy=greedy,
                    finished=stop is not None,
                    sampler_deviation=float(dev),
                )
            )
        return result
