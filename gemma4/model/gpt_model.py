"""``Gemma4Model``: Megatron's ``GPTModel`` with Gemma 4's embedding scale, dual RoPE and logit softcap.

* Embedding: ``E[ids] * sqrt(H)``, the scale rounded like HF's buffer (an fp32 tensor of sqrt(H) cast to
  the weight dtype, so bf16 models multiply by bf16(sqrt(H)), e.g. 73.5 for H = 5376; facts §2.1).
* RoPE: ``position_embedding_type="none"`` for Megatron; this model computes the angles of both layer
  types once per forward and hands them to every layer as ``rotary_pos_emb`` (see ``gemma4.model.rope``).
* Sequence layout: every forward builds a :class:`Gemma4SeqLayout` (documents of a packed row from
  ``packed_seq_params.cu_seqlens_q[_padded]``, this rank's zig-zag chunks under context parallelism) and
  passes it to the layers as ``packed_seq_params``. RoPE positions restart per document and follow the CP
  chunks; caller-given ``position_ids`` are honoured only for plain (unpacked, CP 1) batches.
* Sequence layout: every forward builds a :class:`Gemma4SeqLayout` (documents of a packed row from
  ``packed_seq_params.cu_seqlens_q[_padded]``, this rank's zig-zag chunks under context parallelism) and
  passes it to the layers as ``packed_seq_params``. RoPE positions restart per document and follow the CP
  chunks; caller-given ``position_ids`` are honoured only for plain (unpacked, CP 1) batches.
* Padding row: HF's embedding is ``nn.Embedding(padding_idx=pad_token_id)``, so the lookup of a pad token
  sends no gradient into that row; we cut the same gradient (the forward value is unchanged).
* Head: tied output layer (Megatron's ``share_embeddings_and_output_weights``), then
  ``c * tanh(logits / c)`` applied once, before any loss (facts §6.12).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_model import GPTModel

from gemma4.model import rope
from gemma4.model.sequence_layout import Gemma4SeqLayout, make_layout
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

    def sequence_layout(self, input_ids: torch.Tensor, packed_seq_params=None) -> Gemma4SeqLayout:
        """Layout of this rank's ``[b, s_local]`` tokens (documents, positions, CP chunks)."""
        if isinstance(packed_seq_params, Gemma4SeqLayout):
            return packed_seq_params
        cp = parallel_state.get_context_parallel_world_size()
        cu = None
        if packed_seq_params is not None:
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = packed_seq_params.cu_seqlens_q if cu is None else cu
            if input_ids.shape[0] != 1:
                raise ValueError(f"packed sequences need batch size 1, got {input_ids.shape[0]}")
        return make_layout(
            input_ids.shape[1],
            cu_seqlens=cu,
            cp_size=cp,
            cp_rank=parallel_state.get_context_parallel_rank() if cp > 1 else 0,
            cp_group=parallel_state.get_context_parallel_group() if cp > 1 else None,
            device=input_ids.device,
            base=packed_seq_params,
        )

    def _preprocess(self, input_ids, position_ids, decoder_input=None, packed_seq_params=None, **kwargs):
        scale_embeddings = decoder_input is None and self.pre_process
        out = list(
            super()._preprocess(
                input_ids,
                position_ids,
                decoder_input=decoder_input,
                packed_seq_params=packed_seq_params,
                **kwargs,
            )
        )
        if scale_embeddings:
            weight_dtype = self.embedding.word_embeddings.weight.dtype
            emb = out[0] * embedding_scale(self.config.hidden_size, weight_dtype)
            out[0] = self._cut_padding_gradient(emb, input_ids)
        layout = packed_seq_params
        if position_ids is None or layout.packed or layout.cp_size > 1:
            position_ids = layout.q_pos.unsqueeze(0).expand(input_ids.shape[0], -1)
        out[1] = rope.rope_angles(self.gemma4, position_ids, self.config.params_dtype)
        return tuple(out)

    def _cut_padding_gradient(self, emb: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """``emb`` is ``[s(/tp under SP), b, h]``; positions holding ``pad_token_id`` get a detached value."""
        pad = self.gemma4.pad_token_id
        if pad is None or not emb.requires_grad:
            return emb
        is_pad = (input_ids == pad).transpose(0, 1)  # [s, b]
        if self.config.sequence_parallel:
            chunk = emb.shape[0]
            rank = parallel_state.get_tensor_model_parallel_rank()
            is_pad = is_pad[rank * chunk : (rank + 1) * chunk]
        if not bool(is_pad.any()):
            return emb
        return torch.where(is_pad.unsqueeze(-1), emb.detach(), emb)

    def forward(
        self,
        input_ids,
        position_ids=None,
        attention_mask=None,
        decoder_input=None,
        labels=None,
        packed_seq_params=None,
        **kwargs,
    ):
        """Like ``GPTModel.forward``; logits come back ``[b, s, V]`` softcapped, or the loss ``[b, s]``.

        ``input_ids`` are this rank's tokens (already zig-zag sharded under CP, as slime shards them);
        ``packed_seq_params`` (THD, batch 1) describes packed documents by ``cu_seqlens_q[_padded]``.
        """
        layout = self.sequence_layout(input_ids, packed_seq_params)
        output = super().forward(
            input_ids,
            position_ids,
            attention_mask,
            decoder_input=decoder_input,
            labels=None,
            packed_seq_params=layout,
            **kwargs,
        )
        if not self.post_process:
            return output
        logits = softcap(output, self.gemma4.final_logit_softcapping)
        if labels is None:
            return logits
        return self.compute_language_model_loss(labels, logits.transpose(0, 1).contiguous())
