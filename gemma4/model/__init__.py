"""Gemma 4 on Megatron-Core: config translation, modules, layer specs and the GPT model subclass."""

import warnings

# megatron-core warns at import time that Transformer Engine / Apex are absent; on CPU that is expected.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*", category=UserWarning)
warnings.filterwarnings(
    "ignore", message=r".*cuda_graph_scope.*|.*full scope is deprecated.*", category=UserWarning
)
