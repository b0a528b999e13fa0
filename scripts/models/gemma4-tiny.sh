#!/usr/bin/env bash
# A tiny Gemma 4 (the tiny-31b preset of harness/presets.py with the real 262144-token vocabulary) for
# plumbing runs on one GPU: `python -m harness.gsm8k.tiny --out DIR --tokenizer GEMMA4_TOKENIZER_DIR`
# writes a random-weight checkpoint this script describes. Same rules as the released models' scripts:
# layer types, window, full-layer geometry, RoPE and softcap come from its config.json.
MODEL_ARGS=(
   --num-layers 8
   --hidden-size 64
   --ffn-hidden-size 128
   --num-attention-heads 4
   --group-query-attention
   --num-query-groups 2
   --kv-channels 16
   --vocab-size 262144
   --max-position-embeddings 4096
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
