"""``gemma4-harness mask``: input ids and loss mask of a conversation rendered with a Gemma 4 chat template.

Module level imports argparse only; the work (and transformers) is imported inside :func:`run`.
"""

from __future__ import annotations

import argparse

from harness.commands.result import Result


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``mask`` subcommand."""
    parser = subparsers.add_parser(
        "mask",
        help="input_ids and loss_mask of a conversation under a Gemma 4 chat template",
        description=(
            "Render a conversation with the Gemma 4 chat template (the tokenizer's, or --chat-template) and write "
            '{"input_ids": [...], "loss_mask": [...]}; loss_mask is 1 on the model turns\' trainable tokens.'
        ),
    )
    parser.add_argument(
        "--tokenizer", required=True, metavar="DIR", help="HF tokenizer folder (tokenizer.json, ...)"
    )
    parser.add_argument(
        "--messages",
        required=True,
        metavar="FILE",
        help='JSON list of messages, or {"messages": [...], "tools": [...]}',
    )
    parser.add_argument("--tools", metavar="FILE", help="JSON list of tool declarations")
    parser.add_argument("--enable-thinking", action="store_true", help="render with enable_thinking=True")
    parser.add_argument(
        "--chat-template", metavar="FILE", help="Jinja template file instead of the tokenizer's"
    )
    parser.add_argument("--json", required=True, metavar="OUT", help="output JSON file")
    parser.add_argument(
        "--on-mismatch",
        choices=("warn", "error", "ignore"),
        default="warn",
        help="when the template drops part of a model message (e.g. stripped thinking): warn on stderr "
        "(default), fail with exit code 2, or ignore",
    )
    from harness.cli_paths import IN_DIR, IN_FILE, OUT_FILE, declare

    parser.set_defaults(
        func=run,
        io_paths=declare(
            tokenizer=IN_DIR, messages=IN_FILE, tools=IN_FILE, chat_template=IN_FILE, json=OUT_FILE
        ),
    )


def run(args: argparse.Namespace) -> Result:
    """Run ``mask``; returns the exit code (input errors raise InvalidInputError, mapped to 2 by the CLI)."""
    import sys
    from pathlib import Path

    from gemma4.chat.mask import build_chat_mask
    from gemma4.chat.templates import load_template
    from gemma4.chat.tokenizer import load_tokenizer
    from gemma4.errors import InvalidInputError
    from gemma4.safe_read import read_json

    messages_path = Path(args.messages)
    data = read_json(messages_path, "messages file")
    tools, tools_source = None, "tools"
    if isinstance(data, dict):
        if "messages" not in data:
            raise InvalidInputError(
                f"{messages_path}: expected a JSON list of messages or an object with 'messages'"
            )
        messages = data["messages"]
        if data.get("tools") is not None:
            tools, tools_source = data["tools"], f"{messages_path}: tools"
        source = f"{messages_path}: messages"
    else:
        messages, source = data, str(messages_path)
    if args.tools:
        if tools is not None:
            raise InvalidInputError(f"{messages_path}: has 'tools' and --tools was given too; use one")
        tools_path = Path(args.tools)
        tools, tools_source = read_json(tools_path, "tools file"), str(tools_path)
    template = load_template(args.chat_template) if args.chat_template else None
    tokenizer = load_tokenizer(args.tokenizer)

    result = build_chat_mask(
        tokenizer,
        messages,
        tools,
        enable_thinking=args.enable_thinking,
        chat_template=template,
        on_mismatch="error" if args.on_mismatch == "error" else "ignore",
        source=source,
        tools_source=tools_source,
    )
    if args.on_mismatch == "warn":
        for issue in result.issues:
            print(f"gemma4-harness mask: warning: {issue.describe(source)}", file=sys.stderr)
    payload = {"input_ids": result.input_ids, "loss_mask": result.loss_mask}
    # the CLI writes --json (the command's output) through the one strict atomic writer
    return Result(payload, "")
