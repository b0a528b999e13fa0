"""Gemma 4 chat-template loss masks (SFT and multi-turn RL), checked against the real templates.

Heavy dependencies (transformers) are imported lazily; the ``mask`` command lives in ``harness.commands.mask``.
"""

from gemma4.chat.mask import (
    ChatMask,
    MaskIssue,
    RenderMismatchError,
    RenderMismatchWarning,
    build_chat_mask,
    gemma4_loss_mask,
)
from gemma4.chat.slime import Gemma4LossMaskGenerator, RolloutMask, rollout_loss_mask

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
