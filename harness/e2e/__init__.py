"""A CPU end-to-end RL smoke: GRPO steps on our Megatron Gemma 4, weights synced to an HF rollout engine
through the streaming converter, and gates proving that rollouts come from the model being trained.

Entry points: :func:`harness.e2e.run.run_e2e` (``E2EConfig`` -> result dict) and the
``gemma4-harness e2e-mini`` command (:mod:`harness.commands.e2e_mini`). Modules: ``tasks`` (problems,
rewards), ``engine`` (HF rollout engine), ``sglang_route`` (the engine's weights through SGLang 0.5.23's
own ``load_weights`` when it is importable), ``batch`` (samples, masks, advantages), ``sync`` (gather +
bucketed conversion), ``trainer`` (Megatron actor/reference, GRPO, Adam), ``gates`` (bounds and checks),
``run`` (the loop).
"""
