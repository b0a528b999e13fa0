"""Peak memory and time of one sliding-window attention layer on CPU: blockwise path vs dense-mask path.

Each measurement runs in a fresh subprocess (so peak RSS is its own): forward + backward of the core
attention (``gemma4.model.core_attention.attend``) for a sliding layer with Gemma 4 31B's window (1024) and
head dim (256), one query and one KV head, fp32. Reported: bytes saved for backward (exact, via
``saved_tensors_hooks``), peak RSS above the process baseline, and wall time (1 thread).

    python benchmarks/attention_memory.py            # runs the table and prints Markdown
    python benchmarks/attention_memory.py --one blockwise 4096
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

WINDOW, HEAD_DIM = 1024, 256
CASES = [
    ("blockwise", 4096),
    ("blockwise", 8192),
    ("blockwise", 16384),
    ("blockwise", 32768),
    ("dense", 4096),
    ("dense", 8192),
    ("dense", 16384),
]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure(backend: str, seq: int) -> dict:
    import torch

    from gemma4.model.core_attention import attend
    from gemma4.model.sequence_layout import make_layout

    torch.set_num_threads(1)
    layout = make_layout(seq)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(seq, 1, 1, HEAD_DIM, generator=gen, requires_grad=True)
    k = torch.randn(seq, 1, 1, HEAD_DIM, generator=gen, requires_grad=True)
    v = torch.randn(seq, 1, 1, HEAD_DIM, generator=gen, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(t):  # exact activation memory: bytes of distinct storages saved for backward
        if t.untyped_storage().data_ptr() not in (
            q.untyped_storage().data_ptr(),
            k.untyped_storage().data_ptr(),
            v.untyped_storage().data_ptr(),
        ):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    base = _rss_mb()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = attend(q, k, v, layout, WINDOW, backend=backend)
    out.sum().backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "backend": backend,
        "seq": seq,
        "saved_mb": round(sum(saved.values()) / 2**20, 1),
        "peak_mb_above_base": round(peak - base, 1),
        "seconds": round(seconds, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=2, metavar=("BACKEND", "SEQ"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]))))
        return 0
    rows = []
    for backend, seq in CASES:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", backend, str(seq)], capture_output=True, text=True, check=True
        )
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr)
    print("| path | tokens | saved for backward (MB) | peak RSS above baseline (MB) | fwd+bwd time (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['seq']} | {r['saved_mb']} | {r['peak_mb_above_base']} | {r['seconds']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
