"""The end-to-end GSM8K smoke stage: preflight, a short slime RL run with the Gemma 4 plugin, metric gates.

Modules: :mod:`variants` (what each ``--variant`` runs on), :mod:`preflight` (every missing piece, listed),
:mod:`command` (the full command; ``--dry-run`` prints it), :mod:`launcher` (the run, in a process group it
owns, with timeouts), :mod:`metrics` (slime's ``step N:`` / ``rollout N:`` / ``eval N:`` lines -> JSON),
:mod:`gates` (pass/fail against :mod:`golden` bounds), :mod:`report`, :mod:`cli`. Importing any of them needs
only the standard library; slime, SGLang and Ray are used by the launched process alone.
"""
