"""The rollout engine's weights pass through SGLang 0.5.23's real name routing.

Every ``(hf_name, tensor)`` the streaming converter emits in a sync goes, bucket by bucket, into SGLang's own
``Gemma4ForCausalLM.load_weights`` (:mod:`harness.testing.sglang_cpu`: SGLang's real model module on CPU,
every ``weight_loader`` call recorded), on an SGLang model built once per run in the run dtype. At the end of
the sync the engine receives SGLang's loaded parameters, unpacked back to HF names by the inverse of SGLang's
packing (:func:`~harness.testing.sglang_cpu.hf_sources_in_sglang`: ``qkv_proj`` rows, ``gate_up_proj``
halves, ``w13`` / ``w2`` per expert, ``moe.per_expert_scale``), and nothing else. So whatever SGLang would do
with a name is what the rollouts see, and the sync reports, naming the tensor:

* an emitted name SGLang skipped (its ``if name not in params_dict: continue``; e.g. the per-expert fused
  ``experts.{e}.gate_up_proj`` the converter once emitted);
* a ``weight_loader`` slot (parameter, shard, expert) written twice in one sync (e.g. EP ranks' experts sent
  under their rank-local index: expert ``i`` of every rank lands in slot ``i``);
* a region of an SGLang parameter that the engine needs and no loader wrote in this sync (the parameters are
  NaN-filled before each sync; such a region is not handed to the engine, which then reports it missing);
* a tensor in another dtype than the run's (SGLang's loaders would cast it silently), or a loader that raised.

Process layout: SGLang's model and its (world-1, gloo) parallel groups are built in the process that runs
:func:`harness.e2e.run.run_e2e`, before any trainer rank is forked: rank 0 (the engine's rank) inherits the
built model, and SGLang's loaders make no collective call at TP = EP = 1 (SGLang's own groups need
``new_group`` on every rank of a world, so they cannot be created on rank 0 of the trainer's world).

When SGLang is not importable, :func:`make_router` returns no router and the reason: the engine then takes the
converter's names itself, strictly (:class:`harness.e2e.engine.RolloutEngine`), and the run says so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from harness.testing import sglang_cpu

#: The routing label of runs whose weights went through SGLang's ``load_weights``.
SGLANG_ROUTING = f"sglang-{sglang_cpu.SGLANG_VERSION}"
_WHO = f"SGLang {sglang_cpu.SGLANG_VERSION}"


def strict_routing(reason: str) -> str:
    """The routing label of runs without SGLang (``reason``: why it is not importable)."""
    return f"strict engine (SGLang not importable: {reason})"


class SGLangRouter:
    """SGLang's ``Gemma4ForCausalLM`` for one run's config and dtype, fed every synced tensor.

    Use: :meth:`bind` (once, the engine's HF tensor shapes), then per sync :meth:`begin`, :meth:`load` per
    bucket, :meth:`finish` -> the engine's tensors and the routing errors."""

    def __init__(self, text_config: dict[str, Any], dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.model = sglang_cpu.build_sglang_model(text_config, "causal", dtype=dtype)
        self.state = dict(self.model.named_parameters())
        self.state.update(dict(self.model.named_buffers()))
        self.sources: dict[str, tuple[str, sglang_cpu.RowSlice]] = {}
        self.record = sglang_cpu.LoadRecord()
        self.errors: list[str] = []

    def bind(self, hf_shapes: dict[str, tuple[int, ...]]) -> None:
        """Where each of the engine's HF tensors lives in SGLang's model (raises naming one it has not)."""
        self.sources = sglang_cpu.hf_sources_in_sglang(self.model, hf_shapes)

    def begin(self) -> None:
        """Start a sync: NaN-fill the parameters the engine reads, forget the previous sync's record."""
        sglang_cpu.poison(self.model, {sg for sg, _ in self.sources.values()})
        self.record = sglang_cpu.LoadRecord()
        self.errors = []

    def load(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """One bucket through SGLang's real ``load_weights`` (recorded; a loader that raises is an error)."""
        last: list[str] = []

        def checked() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in named_tensors:
                last.append(name)
                if tensor.is_floating_point() and tensor.dtype != self.dtype:
                    self.errors.append(
                        f"{name!r}: dtype {tensor.dtype}, the run is {self.dtype} ({_WHO} would cast it)"
                    )
                yield name, tensor

        # SGLang logs every parameter a load_weights call left unloaded: every bucket is a partial load
        log = logging.getLogger(sglang_cpu.import_sglang_gemma4()["causal"].__name__)
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            rec = sglang_cpu.run_load_weights(self.model, checked())
        except Exception as exc:  # noqa: BLE001 - reported as a sync error naming the tensor
            at = last[-1] if last else "?"
            self.errors.append(f"{_WHO} load_weights raised at {at!r}: {type(exc).__name__}: {exc}")
            return
        finally:
            log.setLevel(level)
        self.record.calls += rec.calls
        self.record.skipped += rec.skipped

    def finish(self) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
        """End a sync: the engine's tensors under HF names (experts per expert, ``experts.{e}.{gate,up,down}
        _proj.weight``), read back from SGLang's parameters, and the errors (routing first). A region no
        loader wrote is left out (the engine reports it missing)."""
        errors = [f"{_WHO}: {f}" for f in sglang_cpu.routing_failures(self.record)] + self.errors
        out: list[tuple[str, torch.Tensor]] = []
        for hf_name, (sg, rows) in self.sources.items():
            full = self.state[sg].detach()
            view = full if rows is None else full[rows[0] : rows[1]]
            where = sg if rows is None else f"{sg}[{rows[0]}:{rows[1]}]"
            if hf_name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                head = hf_name.rsplit(".", 1)[0]
                for e in range(view.shape[0]):
                    if hf_name.endswith("down_proj"):
                        parts = [("down_proj", view[e], f"{where} expert {e}")]
                    else:
                        gate, up = view[e].chunk(2, dim=0)
                        parts = [
                            ("gate_proj", gate, f"{where} expert {e} (w1)"),
                            ("up_proj", up, f"{where} expert {e} (w3)"),
                        ]
                    for kind, t, region in parts:
                        self._emit(out, errors, f"{head}.{e}.{kind}.weight", t, region)
            else:
                self._emit(out, errors, hf_name, view, where)
        return out, errors

    @staticmethod
    def _emit(
        out: list[tuple[str, torch.Tensor]], errors: list[str], name: str, t: torch.Tensor, region: str
    ) -> None:
        if t.is_floating_point() and bool(t.isnan().any()):
            errors.append(f"{_WHO}: {region} never written in this sync (the engine's {name})")
            return
        out.append((name, t.clone()))


def make_router(text_config: dict[str, Any], dtype: torch.dtype) -> tuple[SGLangRouter | None, str]:
    """SGLang's router for a run, and the routing label (:data:`SGLANG_ROUTING`, or :func:`strict_routing`
    with the reason when SGLang 0.5.23 is not importable here)."""
    try:
        return SGLangRouter(text_config, dtype), SGLANG_ROUTING
    except sglang_cpu.SGLangUnavailable as exc:
        return None, strict_routing(str(exc))
