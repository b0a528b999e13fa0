"""Gemma 4 on Megatron-Core: config translation, modules, layer specs and the GPT model subclass."""

import logging
import warnings

# megatron-core warns at import time that Transformer Engine / Apex are absent; on CPU that is expected.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*", category=UserWarning)
warnings.filterwarnings(
    "ignore", message=r".*cuda_graph_scope.*|.*full scope is deprecated.*", category=UserWarning
)


class _DropUnknownMlpNotice(logging.Filter):
    """TransformerLayer logs "Unknown MLP type" for any MLP spec it does not special-case, including our
    MoE block (which takes its process groups from Megatron's defaults); the notice is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("Unknown MLP type")


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_DropUnknownMlpNotice())
