"""Implementations under test other than this repo's own model (see ``harness/parity/impl.py``)."""
