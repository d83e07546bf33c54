"""Batch column names shared by the driver, the RLModule and the Learner (RLlib's ``Columns`` plus our own)."""

from ray.rllib.core.columns import Columns

# Inputs: one row per sequence, the prompt left-padded and the response right-padded, so every response starts at
# the same column and the response block is ``[:, -R:]`` where ``R = RESPONSE_MASK.shape[1]``.
INPUT_IDS = "input_ids"  # (B, P + R) int64
ATTENTION_MASK = "attention_mask"  # (B, P + R) 1 for real tokens
POSITION_IDS = "position_ids"  # (B, P + R) 0 at the first real token
RESPONSE_MASK = "response_mask"  # (B, R) 1 for generated tokens (actions)

# Per response token, (B, R) float32.
REWARDS = Columns.REWARDS
SAMPLING_LOGP = "sampling_logp"  # from vLLM, at sampling time
OLD_LOGP = "old_logp"  # recomputed by the learner before the update (the PPO ratio's denominator)
REF_LOGP = "ref_logp"  # from the frozen reference policy (only when the KL coefficient is non-zero)
OLD_VALUES = "old_values"
ADVANTAGES = Columns.ADVANTAGES
RETURNS = Columns.VALUE_TARGETS

# Outputs of the module's forward pass, (B, R) float32.
LOGP = Columns.ACTION_LOGP
ENTROPY = "entropy"
VALUES = Columns.VF_PREDS
