"""Gemma 4 chat-template loss masks (SFT and multi-turn RL), checked against the real templates.

Heavy dependencies (transformers) are imported lazily; the ``mask`` command lives in ``harness.commands.mask``.
The slime-shaped ``Gemma4LossMaskGenerator``, ``RolloutMask`` and ``rollout_loss_mask`` live in
:mod:`gemma4.slime.loss_mask` and are re-exported here (resolved on first access: that module imports this
package).
"""

from typing import Any

from gemma4.chat.mask import (
    ChatMask,
    MaskIssue,
    RenderMismatchError,
    RenderMismatchWarning,
    build_chat_mask,
    gemma4_loss_mask,
)

_FROM_SLIME = ("Gemma4LossMaskGenerator", "RolloutMask", "rollout_loss_mask")

__all__ = [
    "ChatMask",
    "Gemma4LossMaskGenerator",
    "MaskIssue",
    "RenderMismatchError",
    "RenderMismatchWarning",
    "RolloutMask",
    "build_chat_mask",
    "gemma4_loss_mask",
    "rollout_loss_mask",
]


def __getattr__(name: str) -> Any:
    if name in _FROM_SLIME:
        from gemma4.slime import loss_mask

        return getattr(loss_mask, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
