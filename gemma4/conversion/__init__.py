"""HF <-> Megatron weight conversion for Gemma 4 (single source of truth: :mod:`gemma4.conversion.mapping`).

Modules: ``mapping`` (the table and tensor transforms), ``sharding`` (TP/EP layouts), ``safetensors_io``
(streaming reader/writer), ``hf_io`` (validated HF directories), ``mcore_io`` (our per-rank Megatron layout),
``torch_dist`` (Megatron dist checkpoints), ``convert`` (whole-checkpoint conversion), ``streaming`` (the
per-parameter Megatron -> HF converter behind slime's weight sync, :mod:`gemma4.slime.weight_sync`). Test
support (checkpoint builders and checks) is :mod:`harness.testing.conversion`.
"""
