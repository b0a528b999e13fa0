"""Gemma 4 text models on Megatron-Core, with HF weight mapping and chat-template loss masks."""

__version__ = "0.1.0"
