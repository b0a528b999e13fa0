"""The loss-mask hook: ``--loss-mask-type gemma4`` in slime's ``MultiTurnLossMaskGenerator``.

slime builds ``MultiTurnLossMaskGenerator(tokenizer, tokenizer_type=args.loss_mask_type)`` and calls
``get_loss_mask(messages, tools=None) -> (token_ids, loss_mask)``, ``get_response_lengths(loss_masks)`` and
``get_text_from_loss_mask(token_ids, loss_masks)``. For ``tokenizer_type="gemma4"`` the generator is
:class:`gemma4.chat.slime.Gemma4LossMaskGenerator` (render-offset masks on the tokenizer's own Gemma 4 chat
template, checked token for token against ``apply_chat_template``); other types stay slime's.
"""

from __future__ import annotations

from typing import Any

from gemma4.chat.slime import TOKENIZER_TYPE, Gemma4LossMaskGenerator


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
