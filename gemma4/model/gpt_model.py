"""``Gemma4Model``: Megatron's ``GPTModel`` with Gemma 4's embedding scale, dual RoPE and logit softcap.

* Embedding: ``E[ids] * sqrt(H)``, the scale rounded like HF's buffer (an fp32 tensor of sqrt(H) cast to
  the weight dtype, so bf16 models multiply by bf16(sqrt(H)), e.g. 73.5 for H = 5376; facts §2.1).
* RoPE: ``position_embedding_type="none"`` for Megatron; this model computes the angles of both layer
  types once per forward and hands them to every layer as ``rotary_pos_emb`` (see ``gemma4.model.rope``).
* Sequence layout: every forward builds a :class:`Gemma4SeqLayout` (documents of a packed row from
  ``packed_seq_params.cu_seqlens_q[_padded]``, this rank's zig-zag chunks under context parallelism) and
  passes it to the layers as ``packed_seq_params``. RoPE positions restart per document and follow the CP
  chunks; caller-given ``position_ids`` are honoured only for plain (unpacked, CP 1) batches.
* Padding row: HF's embedding is ``nn.Embedding(padding_idx=pad_token_id)``, so the lookup of a pad token
  sends no gradient into that row; we cut the same gradient (the forward value is unchanged).
* E2B/E4B: the per-layer embeddings (PLE) are computed here from the ids and the scaled embedding and
  handed to the layers, with zeroed slots for shared K/V, in the carry (``gemma4.model.carry``).
* Forward path: only public Megatron APIs, no private ``GPTModel`` method is overridden. ``forward`` embeds
  with ``self.embedding`` (``LanguageModelEmbedding.forward``), scales, builds the layout, the RoPE angles
  and the carry, and calls ``self.decoder`` (``TransformerBlock.forward``) with them as ``rotary_pos_emb``,
  ``packed_seq_params`` and ``context``: arguments the block hands to every layer, also through full
  activation recompute (``TransformerBlock._checkpointed_forward`` checkpoints ``context`` and
  ``rotary_pos_emb`` as inputs). Then ``self.output_layer`` with the tied weight, the softcap, and
  ``compute_language_model_loss``. ``GPTModel.forward`` is not called: it has no argument through which
  per-forward RoPE angles could reach the block (``extra_block_kwargs`` cannot carry ``rotary_pos_emb``,
  which it passes itself).
* Head: tied output layer (Megatron's ``share_embeddings_and_output_weights``), then
  ``c * tanh(logits / c)`` applied once, before any loss (facts §6.12).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)

from gemma4.model import rope
from gemma4.model.carry import carry_layout, needs_carry
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
        if kwargs.get("mtp_block_spec") is not None:
            raise NotImplementedError("Gemma4Model: multi-token prediction (mtp_block_spec) is not supported")
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
        if spec.ple_dim and self.pre_process:
            self._build_per_layer_embeddings(config)

    def _build_per_layer_embeddings(self, config) -> None:
        """PLE (E2B/E4B): a ``[V_ple, L·P]`` table (vocab-parallel: it is the largest tensor of the model),
        the ``H -> L·P`` projection of the scaled embedding (column-parallel, gathered), and its norm."""
        import copy

        from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding

        from gemma4.model.norms import Gemma4RMSNorm

        spec = self.gemma4
        width = spec.num_layers * spec.ple_dim
        self.per_layer_embedding = VocabParallelEmbedding(
            spec.ple_vocab_size, width, init_method=config.init_method, config=config
        )
        no_sp = copy.copy(config)  # fed the full local sequence, also under sequence parallelism
        no_sp.sequence_parallel = False
        self.per_layer_model_projection = ColumnParallelLinear(
            config.hidden_size,
            width,
            config=no_sp,
            init_method=config.init_method,
            bias=False,
            gather_output=True,
        )
        # Also sees the full local sequence on every rank: its gradient is complete, not SP-partial.
        self.per_layer_projection_norm = Gemma4RMSNorm(no_sp, spec.ple_dim, eps=config.layernorm_epsilon)

    def _per_layer_inputs(self, embeddings: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """HF ``get_per_layer_inputs`` + ``project_per_layer_inputs``: ``[s, b, L, P]`` from the scaled main
        embedding (full local sequence) and the token ids."""
        spec = self.gemma4
        s, b = embeddings.shape[:2]
        table = self.per_layer_embedding.weight
        tokens = self.per_layer_embedding(input_ids) * embedding_scale(spec.ple_dim, table.dtype)
        tokens = self._cut_padding_gradient(tokens.transpose(0, 1), input_ids, sequence_sharded=False)
        tokens = tokens.reshape(s, b, spec.num_layers, spec.ple_dim)
        projected, _ = self.per_layer_model_projection(embeddings)
        projected = projected * self.config.hidden_size**-0.5  # HF: a Python float
        projected = self.per_layer_projection_norm(projected.reshape(s, b, spec.num_layers, spec.ple_dim))
        return (projected + tokens) * 2.0**-0.5

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

    def _initial_carry(self, embeddings: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The carry the first layer gets: the PLE inputs, zeros where store layers will put their K/V."""
        tp = parallel_state.get_tensor_model_parallel_world_size()
        s_kv, b = input_ids.shape[1], input_ids.shape[0]
        s_tok = s_kv // tp if self.config.sequence_parallel else s_kv
        layout = carry_layout(self.gemma4, s_tok, s_kv, b, tp)
        carry = torch.zeros(layout.numel, dtype=embeddings.dtype, device=embeddings.device)
        if layout.ple is not None:
            if self.config.sequence_parallel:  # each rank holds the same full copy; backward takes its part
                embeddings = gather_from_sequence_parallel_region(
                    embeddings, tensor_parallel_output_grad=False
                )
            carry = layout.ple.write(carry, self._per_layer_inputs(embeddings, input_ids))
        return carry

    def _cut_padding_gradient(
        self, emb: torch.Tensor, input_ids: torch.Tensor, sequence_sharded: bool = True
    ) -> torch.Tensor:
        """``emb`` is ``[s(/tp under SP), b, h]``; positions holding ``pad_token_id`` get a detached value."""
        pad = self.gemma4.pad_token_id
        if pad is None or not emb.requires_grad:
            return emb
        is_pad = (input_ids == pad).transpose(0, 1)  # [s, b]
        if self.config.sequence_parallel and sequence_sharded:
            chunk = emb.shape[0]
            rank = parallel_state.get_tensor_model_parallel_rank()
            is_pad = is_pad[rank * chunk : (rank + 1) * chunk]
        if not bool(is_pad.any()):
            return emb
        return torch.where(is_pad.unsqueeze(-1), emb.detach(), emb)

    def scaled_embedding(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """``E[ids] * sqrt(H)`` as ``[s(/tp under SP), b, h]`` (``self.embedding``: Megatron's
        ``LanguageModelEmbedding``, which also scatters for sequence parallelism), pad rows' gradient cut."""
        emb = self.embedding(input_ids=input_ids, position_ids=position_ids)
        emb = emb * embedding_scale(self.config.hidden_size, self.embedding.word_embeddings.weight.dtype)
        return self._cut_padding_gradient(emb, input_ids)

    def forward(
        self,
        input_ids,
        position_ids=None,
        attention_mask=None,
        decoder_input=None,
        labels=None,
        inference_context=None,
        packed_seq_params=None,
        extra_block_kwargs: dict | None = None,
        runtime_gather_output: bool | None = None,
        *,
        inference_params=None,
        loss_mask=None,
        padding_mask=None,
    ):
        """``GPTModel.forward``'s arguments; logits come back ``[b, s, V]`` softcapped, or the loss ``[b, s]``.

        ``input_ids`` are this rank's tokens (already zig-zag sharded under CP, as slime shards them);
        ``packed_seq_params`` (THD, batch 1) describes packed documents by ``cu_seqlens_q[_padded]``.
        ``loss_mask`` is accepted and unused (Megatron uses it only for multi-token prediction);
        ``padding_mask`` is handed to the block as ``GPTModel`` hands it (Gemma 4 layers do not use it).
        """
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError(
                "Gemma4Model: KV-cache inference is not implemented (rollouts run in SGLang)"
            )
        if getattr(self.config, "fine_grained_activation_offloading", False):
            self.preprocess_for_fine_grained_offloading()  # as GPTModel.forward does
        layout = self.sequence_layout(input_ids, packed_seq_params)
        if decoder_input is None and self.pre_process:
            decoder_input = self.scaled_embedding(input_ids, position_ids)
            if padding_mask is not None and self.config.sequence_parallel:  # as GPTModel does
                padding_mask = scatter_to_sequence_parallel_region(padding_mask.transpose(0, 1).contiguous())
                padding_mask = padding_mask.transpose(0, 1).contiguous()
        # (pre_process False: the block takes the previous stage's output, see ``set_input_tensor``.)

        if position_ids is None or layout.packed or layout.cp_size > 1:
            position_ids = layout.q_pos.unsqueeze(0).expand(input_ids.shape[0], -1)
        angles = rope.rope_angles(self.gemma4, position_ids, self.config.params_dtype)

        block_kwargs = dict(extra_block_kwargs or {})
        if needs_carry(self.gemma4):
            if block_kwargs.get("context") is not None:
                raise ValueError("Gemma4Model: extra_block_kwargs['context'] is the model's own layer carry")
            block_kwargs["context"] = self._initial_carry(decoder_input, input_ids)
        if padding_mask is not None:
            block_kwargs["padding_mask"] = padding_mask
        hidden_states = self.decoder(
            hidden_states=decoder_input,
            attention_mask=attention_mask,
            rotary_pos_emb=angles,
            packed_seq_params=layout,
            **block_kwargs,
        )
        if not self.post_process:
            return hidden_states

        weight = (
            self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        )
        logits, _ = self.output_layer(
            hidden_states, weight=weight, runtime_gather_output=runtime_gather_output
        )
        logits = softcap(logits.transpose(0, 1).contiguous(), self.gemma4.final_logit_softcapping)
        if labels is None:
            return logits
        return self.compute_language_model_loss(labels, logits.transpose(0, 1).contiguous())

    def build_schedule_plan(self, *args, **kwargs):
        """Refused: Megatron's combined-1F1B schedule plan runs ``GPTModel``'s own embedding/RoPE
        preprocessing and each layer's ``TransformerLayer`` sub-steps, bypassing ``forward`` above and
        ``Gemma4TransformerLayer.forward`` (sandwich norms, ``layer_scalar``, PLE, shared K/V)."""
        raise NotImplementedError(
            "Gemma4Model: Megatron's combined 1F1B schedule plan (overlap_moe_expert_parallel_comm) is not "
            "supported: it bypasses Gemma 4's forward and layer forward"
        )
