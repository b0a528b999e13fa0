"""Checking machinery: HF reference runner, tolerance policy, parity comparison, presets, CLI."""
