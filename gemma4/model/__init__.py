"""Gemma 4 on Megatron-Core: config translation, modules, layer specs and the GPT model subclass."""
