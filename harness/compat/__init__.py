"""Generic pieces any Megatron-Core Gemma 4 implementation needs to run on a CPU without its GPU stack.

* :mod:`harness.compat.te_local`: rewrite a ``ModuleSpec`` tree (and a module's globals) so Transformer Engine
  classes become Megatron's local equivalents; rename TE parameter names to the local ones.
* :mod:`harness.compat.megatron_training`: the real ``megatron.training`` (``get_args``,
  ``core_transformer_config_from_args``) from ``shared/reference/megatron-lm``, installed only within a
  context manager, with an args namespace built by its own parser.
* :mod:`harness.compat.flash_cpu`: a plain-torch ``flash_attn_varlen_func`` (THD, per document, exact window).
* :mod:`harness.compat.old_schema`: a view of a transformers >= 5.15 ``Gemma4TextConfig`` that answers the
  pre-5.15 attribute names (``global_head_dim`` ...).
"""
