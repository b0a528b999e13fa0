"""Test support: builders, fixtures and checks shared by the tests, the planted-bug tests, the benchmarks and
the harness's own smoke runs. Nothing in the product (``gemma4/``) imports it.

Modules: ``conversion`` (HF checkpoint builders and round-trip / logits checks), ``slime`` (Megatron flag
parsing and a slime-style provider model), ``chat`` (the deterministic Gemma 4-like test tokenizer) and
``chat_corpus`` (the chat conversations the mask tests and chat goldens use). The ``scripts/models/*.sh``
reader is production harness code (the e2e stage builds its launch command from it):
:mod:`harness.gsm8k.model_args`.
"""
