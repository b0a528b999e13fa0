"""slime-facing loss masks: ``--loss-mask-type gemma4`` in slime's ``MultiTurnLossMaskGenerator``, and the
token-in/token-out mask of multi-turn agentic rollouts.

slime builds ``MultiTurnLossMaskGenerator(tokenizer, tokenizer_type=args.loss_mask_type)`` and calls
``get_loss_mask(messages, tools=None) -> (token_ids, loss_mask)``, ``get_response_lengths(loss_masks)`` and
``get_text_from_loss_mask(token_ids, loss_masks)``. :class:`Gemma4LossMaskGenerator` has that shape for
``tokenizer_type="gemma4"`` (render-offset masks on the tokenizer's own Gemma 4 chat template, checked token
for token against ``apply_chat_template``, :mod:`gemma4.chat.mask`); other types stay slime's
(:func:`make_loss_mask_generator`, :func:`dispatching_class`). :func:`rollout_loss_mask` masks a rollout kept
as tokens. ``gemma4.chat`` re-exports ``Gemma4LossMaskGenerator``, ``RolloutMask`` and ``rollout_loss_mask``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gemma4.chat.mask import build_chat_mask
from gemma4.errors import InvalidInputError

__all__ = [
    "add_arguments",
    "generate_rollout",
    "TOKENIZER_TYPE",
    "Gemma4LossMaskGenerator",
    "RolloutMask",
    "dispatching_class",
    "make_loss_mask_generator",
    "rollout_loss_mask",
]

TOKENIZER_TYPE = "gemma4"
MODEL_SPAN = "model"
ENV_SPANS = ("env", "tool")


class Gemma4LossMaskGenerator:
    """Multi-turn SFT loss masks for Gemma 4, with the interface of slime's ``MultiTurnLossMaskGenerator``.

    ``chat_template`` (template text) overrides the tokenizer's; ``enable_thinking`` and ``on_mismatch`` apply
    to every conversation (see :mod:`gemma4.chat.mask` for the policy).
    """

    def __init__(
        self,
        tokenizer: Any,
        tokenizer_type: str = TOKENIZER_TYPE,
        *,
        chat_template: str | None = None,
        enable_thinking: bool = False,
        on_mismatch: str = "warn",
    ) -> None:
        if tokenizer_type != TOKENIZER_TYPE:
            raise InvalidInputError(
                f"tokenizer_type: {tokenizer_type!r} is not supported here (only {TOKENIZER_TYPE!r})"
            )
        self.tokenizer = tokenizer
        self.tokenizer_type = tokenizer_type
        self.chat_template = chat_template
        self.enable_thinking = enable_thinking
        self.on_mismatch = on_mismatch

    def get_loss_mask(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> tuple[list[int], list[int]]:
        """``(token_ids, loss_mask)`` of one conversation, 1 on the model's trainable tokens."""
        result = build_chat_mask(
            self.tokenizer,
            messages,
            tools,
            enable_thinking=self.enable_thinking,
            chat_template=self.chat_template,
            on_mismatch=self.on_mismatch,
        )
        return result.input_ids, result.loss_mask

    def get_response_lengths(self, loss_masks: list[list[int]]) -> list[int]:
        """Per mask, the length from its first trainable token to the end (0 if none), as slime defines it."""
        return [len(mask) - mask.index(1) if 1 in mask else 0 for mask in loss_masks]

    def get_text_from_loss_mask(self, token_ids: list[int], loss_masks: list[int]) -> list[str]:
        """The decoded text of each maximal run of trainable tokens."""
        if len(token_ids) != len(loss_masks):
            raise InvalidInputError(
                f"loss_masks: length {len(loss_masks)} != token_ids length {len(token_ids)}"
            )
        texts: list[str] = []
        run: list[int] = []
        for token_id, flag in zip(token_ids, loss_masks):
            if flag:
                run.append(token_id)
            elif run:
                texts.append(self.tokenizer.decode(run))
                run = []
        if run:
            texts.append(self.tokenizer.decode(run))
        return texts


@dataclass(frozen=True)
class RolloutMask:
    """Token ids of a rollout (prompt + appended spans) and a mask that is 1 exactly on model tokens."""

    token_ids: list[int]
    loss_mask: list[int]
    prompt_length: int

    @property
    def response_length(self) -> int:
        """Tokens after the prompt (model and environment), slime's ``Sample.response_length``."""
        return len(self.token_ids) - self.prompt_length

    @property
    def response_loss_mask(self) -> list[int]:
        """The mask over the response only, slime's ``Sample.loss_mask``."""
        return self.loss_mask[self.prompt_length :]


def _token_ids(values: Any, where: str, vocab_size: int | None) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise InvalidInputError(f"{where}: expected a list of token ids, got {type(values).__name__}")
    ids = []
    for k, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise InvalidInputError(f"{where}[{k}]: {value!r} is not a token id")
        if vocab_size is not None and value >= vocab_size:
            raise InvalidInputError(f"{where}[{k}]: token id {value} >= vocab size {vocab_size}")
        ids.append(int(value))
    return ids


def rollout_loss_mask(
    prompt_ids: Sequence[int], spans: Sequence[tuple[str, Sequence[int]]], *, vocab_size: int | None = None
) -> RolloutMask:
    """Mask of a multi-turn agentic rollout kept as tokens (token-in, token-out, never re-tokenized).

    ``spans`` are the pieces appended after the prompt in order, each ``("model", ids)`` for tokens the policy
    generated (trained, including thinking and stop tokens exactly as sampled) or ``("env", ids)`` /
    ``("tool", ids)`` for tokens the environment inserted (tool responses, next-turn headers; not trained).
    """
    prompt = _token_ids(prompt_ids, "prompt_ids", vocab_size)
    token_ids = list(prompt)
    loss_mask = [0] * len(prompt)
    if isinstance(spans, (str, bytes)) or not isinstance(spans, Sequence):
        raise InvalidInputError(
            f"spans: expected a list of (kind, token_ids) pairs, got {type(spans).__name__}"
        )
    for j, span in enumerate(spans):
        if not isinstance(span, Sequence) or isinstance(span, (str, bytes)) or len(span) != 2:
            raise InvalidInputError(f"spans[{j}]: expected a (kind, token_ids) pair")
        kind, ids = span
        if kind != MODEL_SPAN and kind not in ENV_SPANS:
            raise InvalidInputError(
                f"spans[{j}]: unknown kind {kind!r}; expected {MODEL_SPAN!r} or one of {list(ENV_SPANS)}"
            )
        ids = _token_ids(ids, f"spans[{j}][1]", vocab_size)
        token_ids.extend(ids)
        loss_mask.extend([1 if kind == MODEL_SPAN else 0] * len(ids))
    return RolloutMask(token_ids, loss_mask, len(prompt))


def make_loss_mask_generator(tokenizer: Any, tokenizer_type: str = TOKENIZER_TYPE, **kwargs: Any) -> Any:
    """Ours for ``gemma4``; slime's own ``MultiTurnLossMaskGenerator`` (imported lazily) for other types."""
    if tokenizer_type == TOKENIZER_TYPE:
        return Gemma4LossMaskGenerator(tokenizer, tokenizer_type, **kwargs)
    from slime.utils.mask_utils import MultiTurnLossMaskGenerator as SlimeGenerator

    return SlimeGenerator(tokenizer, tokenizer_type=tokenizer_type, **kwargs)


def dispatching_class(original: type) -> type:
    """A subclass of slime's generator class whose construction with ``tokenizer_type="gemma4"`` returns
    :class:`Gemma4LossMaskGenerator` (other types construct slime's class unchanged)."""

    class MultiTurnLossMaskGenerator(original):  # type: ignore[misc, valid-type]
        gemma4_hook = True

        def __new__(cls, tokenizer: Any = None, tokenizer_type: str = "qwen", *args: Any, **kwargs: Any):
            if tokenizer_type == TOKENIZER_TYPE:
                return Gemma4LossMaskGenerator(tokenizer, tokenizer_type)
            return super().__new__(cls)

    MultiTurnLossMaskGenerator.__qualname__ = original.__qualname__
    MultiTurnLossMaskGenerator.__module__ = original.__module__
    return MultiTurnLossMaskGenerator


LOSS_MASK_FLAG = "--loss-mask-type"


def add_arguments(parser: Any) -> Any:
    """For ``slime.utils.arguments.parse_args(add_custom_arguments=add_arguments)`` (slime runs it before its
    own arguments): makes ``--loss-mask-type gemma4`` a valid choice on this parser. slime (commit 624b824a8,
    ``slime/utils/arguments.py:1416``) defines the flag with fixed ``choices`` and registers it after the
    custom hook, so the hook cannot add the flag itself (argparse would refuse the duplicate); it extends
    the choices of that one ``add_argument`` call on this parser instance instead (no global patch)."""
    original = parser.add_argument

    def add_argument(*names: Any, **kwargs: Any) -> Any:
        choices = kwargs.get("choices")
        if LOSS_MASK_FLAG in names and choices is not None and TOKENIZER_TYPE not in choices:
            kwargs["choices"] = [*choices, TOKENIZER_TYPE]
        return original(*names, **kwargs)

    parser.add_argument = add_argument
    return parser


def generate_rollout(args: Any, rollout_id: int, data_buffer: Any, evaluation: bool = False) -> Any:
    """slime's SFT rollout (``slime.rollout.sft_rollout.generate_rollout``) with Gemma 4 loss masks:
    ``--rollout-function-path gemma4.slime.loss_mask.generate_rollout``. slime builds SFT masks in the
    rollout actor, where our model provider (and so :func:`gemma4.slime.hooks.install`) never runs; this
    function is loaded there by slime itself, installs the hook into the loaded slime modules, and runs
    slime's own function with ``loss_mask_type = "gemma4"`` (slime's stock parser refuses that value, so
    ``--loss-mask-type`` is not read here)."""
    import copy

    from slime.rollout import sft_rollout

    from gemma4.slime.hooks import install

    install(import_known=False)
    gemma_args = copy.copy(args)
    gemma_args.loss_mask_type = TOKENIZER_TYPE
    return sft_rollout.generate_rollout(gemma_args, rollout_id, data_buffer, evaluation)
