"""Golden references: what the HF reference computed, frozen with provenance, and checked on every run.

``goldens/`` holds one ``manifest.json`` and, per case, content-addressed files (safetensors for tensors, JSON
for checksums). The manifest records, per case, the preset and its HF config, seed, inputs, dtype, tolerance
name, the sha256 of every file, the producer versions (python, torch, transformers, megatron-core), the
platform and the command that recorded it. Only ``gemma4-harness goldens record`` writes goldens.

``goldens check`` recomputes every case twice: with our Megatron model (against the golden: a difference is a
*regression*) and with today's HF transformers (against the golden: a difference is *HF drift*). Exit codes
are in :mod:`harness.goldens.outcome`. Modules:

* :mod:`~harness.goldens.store`: manifest schema, file naming, sha256, atomic writes, integrity errors.
* :mod:`~harness.goldens.registry`: case families and the case list (``--only`` selection).
* :mod:`~harness.goldens.forward`, :mod:`~harness.goldens.rope`, :mod:`~harness.goldens.weights`,
  :mod:`~harness.goldens.router` (MoE presets only): the families this package computes;
  :mod:`~harness.goldens.chat` delegates to ``gemma4.chat.goldens``.
* :mod:`~harness.goldens.record`, :mod:`~harness.goldens.check`: the two commands' logic.
"""
