"""``sharding.check_tp`` checks every TP split of a real-size model on meta tensors: nothing is allocated.

Measured (2-core CPU, released 31B config, TP 2): 1.6 s and +0.1 GB peak RSS on meta tensors; with the
tensors allocated on the CPU instead (the surviving mutant of issue 17) 178 s and +1.8 GB, before a byte of
the checkpoint is read. Catches: ``device="meta"`` dropped, or a check that materialises weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RELEASED = Path(__file__).resolve().parents[1] / "slime" / "conftest.py"  # the released configs (facts §4)

PROBE = """
import importlib.util, json, resource, sys
spec = importlib.util.spec_from_file_location("released", sys.argv[1])
released = importlib.util.module_from_spec(spec); spec.loader.exec_module(released)
from gemma4.config import text_spec_from_any
from gemma4.conversion import sharding
model = text_spec_from_any(released.released_config("31b"))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sharding.check_tp(model, 2)
print(json.dumps({"grew_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def test_check_tp_on_the_released_31b_allocates_nothing():
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(RELEASED)], capture_output=True, text=True, timeout=900, check=True
    )
    grew = json.loads(out.stdout.strip().splitlines()[-1])["grew_mb"]
    # the model's weights are ~62 GB in fp32; one layer's QKV alone is > 100 MB
    assert grew < 500, f"check_tp grew the peak RSS by {grew:.0f} MB: it allocates weights"
