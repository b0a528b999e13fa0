"""Peak RSS and wall time of ``convert hf-to-mcore`` / ``mcore-to-hf`` at real Gemma 4 layer shapes.

Synthesises bf16 checkpoints with two decoder layers (one sliding, one K=V full) of the released shapes
(facts §3.2/§4) and the full 262144-token vocabulary, converts them at TP 1 and 2, checks the round trip is
bit-exact, and writes ``benchmarks/RESULTS-conversion.md``. Each conversion runs in a fresh interpreter
(``python -m harness convert ...``) whose ``VmHWM`` (/proc/self/status) is its peak RSS; a child that only imports the
converter gives the baseline. 26B-A4B layers are full MoE layers: dense MLP (2112) beside 128 routed experts
(704 wide), i.e. ``experts.gate_up_proj`` [128, 1408, 2816] + ``down_proj`` [128, 2816, 704] per layer.

    python benchmarks/conversion_bench.py --model 31b       # ~2 min, < 4 GB RSS
    python benchmarks/conversion_bench.py --model 26b-a4b   # ~2 min; results of both kept in the table

Needs ~25 GB of free disk in --workdir (default: the system temp directory); deletes what it writes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gemma4.config import text_spec_from_any
from gemma4.conversion.convert import compare_hf
from gemma4.conversion.hf_io import open_hf_checkpoint
from gemma4.conversion.mcore_io import hf_plan
from gemma4.conversion.safetensors_io import ShardedWriter

S, F = "sliding_attention", "full_attention"
REPO = Path(__file__).resolve().parents[1]
COMMON = {
    "model_type": "gemma4_text",
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "final_logit_softcapping": 30.0,
    "hidden_size_per_layer_input": 0,
    "num_kv_shared_layers": 0,
    "attention_k_eq_v": True,
    "tie_word_embeddings": True,
    "head_dim": 256,
    "global_head_dim": 512,
    "num_hidden_layers": 2,
    "layer_types": [S, F],
    "sliding_window": 1024,
    "max_position_embeddings": 262144,
    "rope_parameters": {
        S: {"rope_type": "default", "rope_theta": 10000.0},
        F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    },
}
MODELS = {
    "31b": COMMON
    | {
        "vocab_size": 262144,
        "hidden_size": 5376,
        "intermediate_size": 21504,
        "num_attention_heads": 32,
        "num_key_value_heads": 16,
        "num_global_key_value_heads": 4,
    },
    "26b-a4b": COMMON
    | {
        "vocab_size": 262144,
        "hidden_size": 2816,
        "intermediate_size": 2112,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "num_global_key_value_heads": 2,
        "enable_moe_block": True,
        "num_experts": 128,
        "top_k_experts": 8,
        "moe_intermediate_size": 704,
    },
}
# (tp, ep) per model: EP repeats the non-expert tensors in every EP rank's directory (each rank's file is
# its whole state dict), so EP runs write more than the checkpoint size.
RUNS = {"31b": [(1, 1), (2, 1)], "26b-a4b": [(1, 1), (2, 2)]}


def synthesise(directory: Path, config: dict) -> int:
    """Write config.json + sharded bf16 safetensors of random bits; returns the bytes written."""
    spec = text_spec_from_any(config)
    entries = hf_plan(spec, torch.bfloat16)
    writer = ShardedWriter(directory, entries, max_shard_bytes=2 * 1024**3)
    gen = torch.Generator().manual_seed(0)
    for e in entries:
        n = 1
        for s in e.shape:
            n *= s
        bits = torch.randint(-(2**15), 2**15 - 1, (n,), dtype=torch.int16, generator=gen)
        bits &= ~0x4000  # clear the top exponent bit: finite values (|x| < 2), no NaN/inf
        writer.write(e.name, bits.view(torch.bfloat16).reshape(e.shape))
        del bits
    writer.finish()
    (directory / "config.json").write_text(json.dumps(config | {"dtype": "bfloat16"}))
    return sum(e.nbytes for e in entries)


def child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it must print one JSON line; adds its peak RSS and wall time."""
    wrapper = (
        "import json, sys, time\n"
        "extra = {}\n"
        "t0 = time.perf_counter()\n"
        f"{code}\n"
        "seconds = time.perf_counter() - t0\n"
        # VmHWM is this process's own peak RSS; ru_maxrss would include the forked parent's RSS (Linux
        # carries it across exec).
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
        "print(json.dumps({'seconds': seconds, 'peak_rss_mb': int(hwm) / 1024, 'rc': rc, **extra}))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper], cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_seconds"] = time.perf_counter() - t0
    return out


def convert(argv: list[str]) -> dict:
    return child(f"from harness.cli import main\nrc = main({argv!r})\nassert rc == 0, rc")


def fmt_gb(mb: float) -> str:
    return f"{mb / 1024:.2f}"


def run_model(name: str, runs: list[tuple[int, int]], work: Path) -> list[dict]:
    rows = []
    cfg = MODELS[name]
    hf = work / f"{name}-hf"
    t0 = time.perf_counter()
    size = synthesise(hf, cfg)
    print(f"[{name}] synthesised {size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", flush=True)
    for tp, ep in runs:
        mc, back = work / f"{name}-mc-tp{tp}-ep{ep}", work / f"{name}-back-tp{tp}-ep{ep}"
        argv = ["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(mc), "--tp", str(tp), "--ep", str(ep)]
        a = convert(argv)
        written = sum(p.stat().st_size for p in mc.rglob("*.safetensors"))
        b = convert(["convert", "mcore-to-hf", "--mcore", str(mc), "--out", str(back)])
        diffs = compare_hf(open_hf_checkpoint(hf), open_hf_checkpoint(back))
        row = {"model": name, "tp": tp, "ep": ep, "bytes": size, "mcore_bytes": written}
        rows.append(row | {"hf_to_mcore": a, "mcore_to_hf": b, "bit_exact": not diffs})
        print(
            f"[{name}] tp={tp} ep={ep}: hf-to-mcore {a}; mcore-to-hf {b}; bit-exact={not diffs}", flush=True
        )
        shutil.rmtree(mc)
        shutil.rmtree(back)
    shutil.rmtree(hf)
    return rows


def write_results(path: Path, rows: list[dict], baseline: dict) -> None:
    lines = [
        "# Weight conversion benchmark (`benchmarks/conversion_bench.py`)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared), Python {platform.python_version()}, "
        f"torch {torch.__version__}; one thread per process; local disk. bf16 checkpoints with **two decoder "
        "layers** (one sliding, one K=V full) of the released shapes and the full 262144-token vocabulary "
        "(tied embedding = 2.82 GB for 31B, 1.48 GB for 26B-A4B). 26B-A4B layers are complete MoE layers: "
        "dense MLP (2112) beside 128 routed experts, `experts.gate_up_proj` [128, 1408, 2816] (1.02 GB) + "
        "`down_proj` [128, 2816, 704] per layer.",
        "",
        f"Baseline RSS of a process that only imports the converter: {fmt_gb(baseline['peak_rss_mb'])} GB.",
        "",
        "| model (2 layers) | HF checkpoint | TP | EP | Megatron files | hf-to-mcore wall | hf-to-mcore peak RSS "
        "| mcore-to-hf wall | mcore-to-hf peak RSS | round trip |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r["hf_to_mcore"], r["mcore_to_hf"]
        lines.append(
            f"| {r['model']} | {r['bytes'] / 1e9:.2f} GB | {r['tp']} | {r['ep']} | {r['mcore_bytes'] / 1e9:.2f} GB | "
            f"{a['seconds']:.1f} s | {fmt_gb(a['peak_rss_mb'])} GB | {b['seconds']:.1f} s | "
            f"{fmt_gb(b['peak_rss_mb'])} GB | {'bit-exact' if r['bit_exact'] else 'DIFFERS'} |"
        )
    lines += [
        "",
        "Wall is the conversion inside the process (after imports); peak RSS is the process's `VmHWM`. "
        "The converter holds one table rule at a time (a layer's q/k/v, the fc1 halves, or the embedding), "
        "so peak RSS is set by the largest tensor and stays flat in the number of layers: a 60-layer 31B "
        "(61.4 GB) should convert with the same ~3 GB peak (not measured here). mcore-to-hf writes row-sharded "
        "tensors (embedding) shard by shard instead of concatenating them. With EP > 1 every EP rank's file "
        "repeats the non-expert tensors (each rank file is that rank's whole state dict), hence the larger "
        "Megatron files.",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=[*MODELS, "all"], default="31b")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS-conversion.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    names = list(MODELS) if args.model == "all" else [args.model]
    baseline = child("import gemma4.conversion.convert, harness.cli\nrc = 0")
    with tempfile.TemporaryDirectory(prefix="gemma4-conv-bench-", dir=args.workdir) as work:
        rows = [r for name in names for r in run_model(name, RUNS[name], Path(work))]
    # Rows of models not run this time are kept from the previous run (one model per run stays < 3 min).
    store = args.results.with_suffix(".json")
    previous = json.loads(store.read_text()) if store.is_file() else {"rows": []}
    rows = [r for r in previous["rows"] if r["model"] not in names] + rows
    rows.sort(key=lambda r: (list(MODELS).index(r["model"]), r["tp"], r["ep"]))
    store.write_text(json.dumps({"rows": rows, "baseline": baseline}, indent=2) + "\n")
    write_results(args.results, rows, baseline)
    print(f"wrote {args.results}")
    return 0 if all(r["bit_exact"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
