#!/usr/bin/env bash
# Gemma 4 12B (dense, gemma4_unified text decoder) for slime: the Megatron flags that describe the model.
#   source scripts/models/gemma4-12B.sh && python3 train.py "${MODEL_ARGS[@]}" --hf-checkpoint DIR ...
# Megatron has no flags for Gemma 4's layer types (5 sliding : 1 full), the sliding window (1024), the full
# layers' head dim (512) and KV heads (1, K=V), the two RoPEs or the logit softcap (30): the plugin reads
# them from the config.json of --hf-checkpoint and refuses to build if any flag below disagrees with it.
# The block geometry flags (--num-query-groups, --kv-channels) are the sliding layers'.
# RoPE flags (--position-embedding-type, --rotary-*) are not read: Gemma4Model computes both RoPEs.
# --no-bias-gelu-fusion: Megatron's fused bias-GELU is erf GELU with a bias; Gemma 4 is tanh-GELU without
# biases (Megatron refuses the fusion without biases). --no-rope-fusion: Megatron's RoPE is not used.
MODEL_ARGS=(
   --num-layers 48
   --hidden-size 3840
   --ffn-hidden-size 15360
   --num-attention-heads 16
   --group-query-attention
   --num-query-groups 8
   --kv-channels 256
   --vocab-size 262144
   --max-position-embeddings 262144
   --normalization RMSNorm
   --norm-epsilon 1e-6
   --qk-layernorm
   --disable-bias-linear
   --attention-dropout 0.0
   --hidden-dropout 0.0
   --no-bias-gelu-fusion
   --no-rope-fusion
   --transformer-impl local
   --spec gemma4.slime.spec get_gemma4_spec
   --custom-model-provider-path gemma4.slime.model_provider.model_provider
)
