"""CLI subcommands. Each module exposes ``add_parser(subparsers)``; keep module imports light
(argparse only): heavy imports (torch, megatron, transformers) happen inside the command's run."""
