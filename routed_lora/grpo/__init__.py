"""GRPO for routed LoRA: the loss, teacher-forced log-probs, the training loop, evaluation and the CLI.

Import the pieces from their modules (``routed_lora.grpo.loss`` needs only torch; the loop needs the HF
integration and the environment).
"""

from .loss import AGGREGATIONS, aggregate, clipped_surrogate, group_advantages, grpo_loss, k3_kl, step_normalizer

__all__ = ["AGGREGATIONS", "aggregate", "clipped_surrogate", "group_advantages", "grpo_loss", "k3_kl",
           "step_normalizer"]
