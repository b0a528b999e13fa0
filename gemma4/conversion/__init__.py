"""HF <-> Megatron weight conversion for Gemma 4 (single source of truth: :mod:`gemma4.conversion.mapping`)."""
