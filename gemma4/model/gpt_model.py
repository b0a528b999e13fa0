"""``Gemma4Model``: Megatron's ``GPTModel`` with Gemma 4's embedding scale, dual RoPE and logit softcap.

* Embedding: ``E[ids] * sqrt(H)``, the scale rounded like HF's buffer (an fp32 tensor of sqrt(H) cast to
  the weight dtype, so bf16 models multiply by bf16(sqrt(H)), e.g. 73.5 for H = 5376; facts §2.1).
* RoPE: ``position_embedding_type="none"`` for Megatron; this model computes the angles of both layer
  types once per forward and hands them to every layer as ``rotary_pos_emb`` (see ``gemma4.model.rope``).
* Padding row: HF's embedding is ``nn.Embedding(padding_idx=pad_token_id)``, so the lookup of a pad token
  sends no gradient into that row; we cut the same gradient (the forward value is unchanged).
* Head: tied output layer (Megatron's ``share_embeddings_and_output_weights``), then
  ``c * tanh(logits / c)`` applied once, before any loss (facts §6.12).
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_model import GPTModel

from gemma4.model import rope
from gemma4.model.spec import get_gemma4_decoder_block_spec


def embedding_scale(hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    """HF's ``embed_scale``: ``torch.tensor(sqrt(H))`` (fp32) cast to the embedding weight dtype."""
    return torch.tensor(hidden_size**0.5, dtype=torch.float32).to(dtype)


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(logits / cap)`` in HF's op order; identity when ``cap`` is None."""
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


class Gemma4Model(GPTModel):
    """Gemma 4 text decoder as a Megatron ``GPTModel``. ``config`` is a ``Gemma4TransformerConfig``."""

    def __init__(
        self,
        config,
        transformer_layer_spec=None,
        vocab_size: int | None = None,
        max_sequence_length: int | None = None,
        pre_process: bool = True,
        post_process: bool = True,
        parallel_output: bool = True,
        share_embeddings_and_output_weights: bool | None = None,
        vp_stage: int | None = None,
        **kwargs,
    ) -> None:
        spec = config.gemma4
        if transformer_layer_spec is None:
            transformer_layer_spec = get_gemma4_decoder_block_spec(config, vp_stage=vp_stage)
        if share_embeddings_and_output_weights is None:
            share_embeddings_and_output_weights = spec.tie_word_embeddings
        super().__init__(
            config,
            transformer_layer_spec,
            vocab_size=vocab_size or spec.vocab_size,
            max_sequence_length=max_sequence_length or spec.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            position_embedding_type="none",
            vp_stage=vp_stage,
            **kwargs,
        )
        self.gemma4 = spec

    def _preprocess(self, input_ids, position_ids, decoder_input=None, **kwargs):
        scale_embeddings = decoder_input is None and self.pre_process
        out = list(super()._preprocess(input_ids, position_ids, decoder_input=decoder_input, **kwargs))
        if scale_embeddings:
            emb = out[0] * embedding_scale(
                self.config.hidden_size, self.embedding.word_embeddings.weight.dtype
            )
            out[0] = self._cut_padding_gradient(emb, input_ids)
        if position_ids is None:
            seq_len = input_ids.shape[1]
            position_ids = torch.arange(seq_len, device=input_ids.device).unsqueeze(0)
        out[1] = rope.rope_angles(self.gemma4, position_ids, self.config.params_dtype)
        return tuple(out)

    def _cut_padding_gradient(self, emb: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """``emb`` is ``[s(/tp under SP), b, h]``; positions holding ``pad_token_id`` get a detached value."""
        pad = self.gemma4.pad_token_id
        if pad is None or not emb.requires_grad:
            return emb
        is_pad = (input_ids == pad).transpose(0, 1)  # [s, b]
        if self.config.sequence_parallel:
            from megatron.core import parallel_state

            chunk = emb.shape[0]
            rank = parallel_state.get_tensor_model_parallel_rank()
            is_pad = is_pad[rank * chunk : (rank + 1) * chunk]
        if not bool(is_pad.any()):
            return emb
        return torch.where(is_pad.unsqueeze(-1), emb.detach(), emb)

    def forward(
        self, input_ids, position_ids=None, attention_mask=None, decoder_input=None, labels=None, **kwargs
    ):
        """Like ``GPTModel.forward``; logits come back ``[b, s, V]`` softcapped, or the loss ``[b, s]``."""
        output = super().forward(
            input_ids, position_ids, attention_mask, decoder_input=decoder_input, labels=None, **kwargs
        )
        if not self.post_process:
            return output
        logits = softcap(output, self.gemma4.final_logit_softcapping)
        if labels is None:
            return logits
        return self.compute_language_model_loss(labels, logits.transpose(0, 1).contiguous())
