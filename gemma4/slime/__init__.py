"""slime entry points for Gemma 4 text models (slime, Megatron-LM, SGLang and Ray are imported lazily).

What slime calls, and where it lives:

=====================================================  ====================================================
slime flag / hook                                      entry point
=====================================================  ====================================================
``--spec gemma4.slime.spec get_gemma4_spec``            :func:`gemma4.slime.spec.get_gemma4_spec`
``--custom-model-provider-path``                        :func:`gemma4.slime.model_provider.model_provider`
``gemma4.slime.model_provider.model_provider``
weight sync, ``convert_<model>_to_hf(args, name, p)``   :func:`gemma4.slime.weight_sync.convert_gemma4_to_hf`
HF -> Megatron loader, ``_LOADERS[model](n, r, c)``     :func:`gemma4.slime.loader.gemma4_hf_tensor`
``--loss-mask-type gemma4``                             :func:`gemma4.slime.loss_mask.make_loss_mask_generator`
=====================================================  ====================================================

:func:`gemma4.slime.hooks.install` (run by the model provider) routes slime's own dispatch points
(converter by model name, ``_LOADERS``, ``MultiTurnLossMaskGenerator``) to these. Each entry point is a thin
adapter around this project's own code (the spec, ``Gemma4Model``, the mapping table, the chat masks), so it
computes exactly what the CPU parity gate checked. The Megatron flags that
describe each released model are in ``scripts/models/gemma4-*.sh``; everything Megatron has no flag for
(layer types, window, the full layers' head geometry, RoPE per layer type, softcap) is read from the
``config.json`` of ``--hf-checkpoint``, and every flag is checked against it (:mod:`gemma4.slime.args`).

Importing this package (or any module in it) never imports slime, Megatron-LM, SGLang or Ray.
"""
