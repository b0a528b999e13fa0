"""Run slime's ``train.py`` on a private local Ray cluster bound to 127.0.0.1.

``python -m harness.gsm8k.driver --num-gpus N --ray-temp-dir DIR -- /path/to/slime/train.py ARGS...``

Ray is started here, by this process (``ray.init(address="local")``: GCS, raylet and dashboard are its
children, tied to its life), with the node address and the dashboard on 127.0.0.1 and a temp dir of its
own, so the run never joins or stops another user's cluster and nothing is killed by name. ``train.py`` then
runs in this process as ``__main__``; its own ``ray.init(...)`` calls (if any) reuse this cluster. The
cluster is shut down when ``train.py`` returns or raises. The launcher runs this module in a new process
group and kills that group (and only it) on timeout.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Start Ray, run ``train.py`` with its arguments, stop Ray; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m harness.gsm8k.driver")
    parser.add_argument("--num-gpus", type=int, required=True)
    parser.add_argument("--ray-temp-dir", required=True)
    parser.add_argument("script", type=Path)
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if not args.script.is_file():
        print(f"driver: {args.script}: slime's train.py not found", file=sys.stderr)
        return 2

    import ray

    ray.init(
        address="local",
        num_gpus=args.num_gpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        _temp_dir=args.ray_temp_dir,
    )
    original_init = ray.init

    def reuse_cluster(*a, **k):  # train.py's ray.init(...) joins the cluster started above
        k["ignore_reinit_error"] = True
        return original_init(*a, **k)

    ray.init = reuse_cluster
    code = 0
    try:
        sys.argv = [str(args.script), *args.script_args]
        sys.path.insert(0, str(args.script.parent))
        runpy.run_path(str(args.script), run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        ray.init = original_init
        ray.shutdown()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
