"""Golden references: what the HF reference computed, frozen with provenance, and checked on every run.

``goldens/`` holds one ``manifest.json`` and, per case, content-addressed files (safetensors for tensors, JSON
for checksums and chat renders). The manifest records, per case, what the case is (preset, dtype and seed; or
template and conversation), its config and inputs, the tolerance name, the sha256 of every file, the producer
versions (:func:`harness.provenance.producer_versions`), the platform and the command that recorded it. Only
:func:`harness.goldens.record.record_goldens` writes goldens: ``gemma4-harness goldens record`` and the
pytest option ``--goldens-update``.

``goldens check`` recomputes every case twice: with our Megatron model (against the golden: a difference is a
*regression*) and with today's HF transformers (against the golden: a difference is *HF drift*). Exit codes
are in :mod:`harness.goldens.outcome`. Modules:

* :mod:`~harness.goldens.store`: manifest schema, file naming, sha256, atomic writes, integrity errors.
* :mod:`~harness.goldens.registry`: case families and the case list (``--only`` selection).
* :mod:`~harness.goldens.forward`, :mod:`~harness.goldens.rope`, :mod:`~harness.goldens.weights`,
  :mod:`~harness.goldens.router` (MoE presets only), :mod:`~harness.goldens.chat` (chat renders and loss
  masks; needs the released templates): the families.
* :mod:`~harness.goldens.record`, :mod:`~harness.goldens.check`: the two commands' logic.
"""
