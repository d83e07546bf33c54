"""The Transformer policy as an RLlib RLModule: a Hugging Face causal LM plus an optional value head."""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from torch import nn

from policies.columns import ATTENTION_MASK, ENTROPY, INPUT_IDS, LOGP, POSITION_IDS, RESPONSE_MASK, VALUES
from policies.models import load_causal_lm

LM_PREFIX = "lm."  # state-dict keys of the HF model inside this module: "lm." + the HF parameter name


# A minibatch's distinct prompts are forwarded once and shared when that leaves at most this share of the tokens of one
# forward per sequence (two forward passes cost more per token than one: on the tiny policy 52% of the tokens took
# 0.95x the learner step's time, bench/RESULTS.md "Shared prompts").
SHARED_PROMPT_MAX_TOKEN_SHARE = 2 / 3


def shared_prompts(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The distinct prompts of a batch of token rows, when forwarding each once saves enough tokens.

    Rows share a prompt when their prompt columns (the first P = L - R: token ids and attention mask, so left padding
    included) are identical, as the ``rollout.samples_per_prompt`` samples of one prompt are. Returns ``(first,
    inverse)``: for each distinct prompt a row holding it, and for each row the index of its prompt in ``first``; or
    None when sharing would leave more than ``SHARED_PROMPT_MAX_TOKEN_SHARE`` of the tokens (e.g. one sample per
    prompt, or a shuffled minibatch with few repeats).
    """
    ids, mask = batch[INPUT_IDS], batch[ATTENTION_MASK]
    B, L = ids.shape
    R = batch[RESPONSE_MASK].shape[1]
    P = L - R
    if B < 2 or P < 1:
        return None
    keys, inverse = torch.unique(torch.cat([ids[:, :P], mask[:, :P].to(ids.dtype)], 1), dim=0, return_inverse=True)
    U = keys.shape[0]
    if U * P + B * R > SHARED_PROMPT_MAX_TOKEN_SHARE * B * L:
        return None
    rows = torch.arange(B, device=ids.device)
    first = torch.full((U,), B, dtype=rows.dtype, device=ids.device).scatter_reduce(0, inverse, rows, "amin")
    return first, inverse


def response_hidden(body: torch.nn.Module, batch: dict[str, Any], share_prompts: bool = True) -> torch.Tensor:
    """A transformer body's hidden states before each response token, (B, R, H).

    The hidden state at column t predicts token t + 1, so the R response tokens (the last R columns) are predicted
    by columns -R-1 .. -2. The last column predicts nothing, and causal attention means no other column depends on
    it, so it is left out of the forward pass: one token in L fewer to compute (for the default task, 1 in 11).
    Position ids come from the batch, so left padding does not shift positions.

    With ``share_prompts`` (``algorithm.share_prompts``) and rows that repeat their prompts (:func:`shared_prompts`),
    each distinct prompt is forwarded once and its keys and values are shared by the rows that hold it: the
    responses are then forwarded on top of that cache. Causal attention makes this the same computation (a prompt's
    states never depend on what follows it), and the gradients reach the prompt's computation through every row
    that shares it, summed, as in one forward per sequence; only the floating-point summation order can differ.
    """
    R = batch[RESPONSE_MASK].shape[1]
    shared = shared_prompts(batch) if share_prompts else None
    # Columns 0 .. L - 2: every one that predicts a response token, or is attended to by one that does.
    ids, mask, positions = (batch[key][:, :-1] for key in (INPUT_IDS, ATTENTION_MASK, POSITION_IDS))
    if shared is None:
        return body(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state[:, -R:]
    first, inverse = shared
    P = ids.shape[1] + 1 - R
    prompt = body(input_ids=ids[first, :P], attention_mask=mask[first, :P], position_ids=positions[first, :P],
                  use_cache=R > 1)
    last = prompt.last_hidden_state[inverse, -1:]  # column P - 1, the prompt's last token: the first response token's
    if R == 1:
        return last
    cache = prompt.past_key_values
    cache.reorder_cache(inverse)  # (U, ...) -> (B, ...): every row's copy of its prompt's keys and values
    rest = body(input_ids=ids[:, P:], attention_mask=mask, position_ids=positions[:, P:], past_key_values=cache,
                use_cache=True)
    return torch.cat([last, rest.last_hidden_state], dim=1)  # columns P .. L - 2: the other response tokens'


def _logp_entropy(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``targets`` and entropy from the LM head on ``hidden`` (..., H), in float32, (...)."""
    logits = head(hidden).float()  # (..., V)
    if temperature != 1.0:  # the distribution vLLM samples from is softmax(logits / T); at T = 1 nothing changes
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)  # (..., V)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def token_logp_entropy(
    lm: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``targets`` (B, R) and the entropies of their distributions, (B, R) each, from the LM
    head on ``hidden`` (B, R, H) at sampling temperature ``temperature``.

    The (rows, V) float32 log-softmax is the learner's largest tensor at real vocabulary sizes (151,936 for Qwen2).
    With ``chunk_tokens``, it exists for at most that many rows (of the B * R) at a time; with gradients on, each
    chunk is recomputed in the backward pass (activation checkpointing) instead of being kept. Up to ``chunk_tokens``
    rows, the computation is exactly the unchunked one.
    """
    head = lm.get_output_embeddings()
    B, R, H = hidden.shape
    if chunk_tokens is None or B * R <= chunk_tokens:
        return _logp_entropy(head, hidden, targets, temperature)
    flat_hidden, flat_targets = hidden.reshape(B * R, H), targets.reshape(B * R)
    keep_graph = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    logps, entropies = [], []
    for start in range(0, B * R, chunk_tokens):
        rows = (flat_hidden[start : start + chunk_tokens], flat_targets[start : start + chunk_tokens])
        if keep_graph:
            from torch.utils.checkpoint import checkpoint

            logp, entropy = checkpoint(_logp_entropy, head, *rows, temperature, use_reentrant=False)
        else:
            logp, entropy = _logp_entropy(head, *rows, temperature)
        logps.append(logp)
        entropies.append(entropy)
    return torch.cat(logps).reshape(B, R), torch.cat(entropies).reshape(B, R)


def response_logp(
    lm: torch.nn.Module, batch: dict[str, Any], temperature: float = 1.0, chunk_tokens: int | None = None,
    share_prompts: bool = True,
) -> torch.Tensor:
    """Log-probabilities of the response tokens under a plain HF causal LM (e.g. the frozen reference) sampled at
    ``temperature``, (B, R)."""
    hidden = response_hidden(lm.base_model, batch, share_prompts)
    return token_logp_entropy(lm, hidden, response_targets(batch), temperature, chunk_tokens)[0]


def response_targets(batch: dict[str, Any]) -> torch.Tensor:
    """The response tokens, (B, R): the last R columns."""
    return batch[INPUT_IDS][:, -batch[RESPONSE_MASK].shape[1] :]


class TransformerPolicyRLModule(TorchRLModule, ValueFunctionAPI):
    """Wraps any local HF causal LM (``model_config["model_path"]``).

    One forward pass over (B, P + R) token rows gives, for every response token, its log-probability, the entropy
    of the distribution it was drawn from (both at the sampling temperature ``model_config["temperature"]``), and
    (with ``model_config["value_head"]``) the value of the state before it; all (B, R). Prompt and padding positions
    never enter the outputs.
    """

    def setup(self) -> None:
        self.lm = load_causal_lm(self.model_config["model_path"])
        self.temperature = float(self.model_config.get("temperature", 1.0))
        self.chunk_tokens = self.model_config.get("logits_chunk_tokens")  # bounds the (rows, V) log-softmax
        self.share_prompts = bool(self.model_config.get("share_prompts", True))  # a repeated prompt forwarded once
        self.lora = self.model_config.get("lora")
        if self.lora is not None:
            from policies.lora import wrap_with_lora

            self.lm = wrap_with_lora(self.lm, self.lora)
        self.critic_body = None
        has_critic = self.model_config.get("value_head", True)
        if has_critic and self.model_config.get("critic", "value_head") == "separate":
            from policies.models import load_backbone

            self.critic_body = load_backbone(self.model_config["critic_model_path"])
        critic_config = (self.critic_body or self.hf_model).config
        hidden = critic_config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1) if has_critic else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    # The inference and exploration passes are the training pass: sampling happens in vLLM, not here.
    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return self._forward_train(batch, **kwargs)

    def _forward_train(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        hidden = response_hidden(self.hf_model.base_model, batch, self.share_prompts)  # (B, R, H): the state
        #   before each response token
        logp, entropy = token_logp_entropy(
            self.hf_model, hidden, response_targets(batch), self.temperature, self.chunk_tokens
        )
        out = {LOGP: logp, ENTROPY: entropy}  # (B, R) each
        if self.value_head is not None:
            out[VALUES] = self._values(batch, hidden)  # (B, R)
        return out

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        if self.value_head is None:
            raise ValueError("this policy has no value head; set policy.value_head=true for a critic")
        return self._values(batch)

    def _values(self, batch: dict[str, Any], policy_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The value head on the separate critic's hidden states, or on the policy's (reused when given)."""
        if self.critic_body is not None:
            hidden = response_hidden(self.critic_body, batch, self.share_prompts)
        else:
            hidden = (policy_hidden if policy_hidden is not None
                      else response_hidden(self.hf_model.base_model, batch, self.share_prompts))
        return self.value_head(hidden.float()).squeeze(-1)  # (B, R)

    @property
    def hf_model(self) -> torch.nn.Module:
        """The Hugging Face model (inside peft's wrapper when LoRA is on; the adapters act in place)."""
        return self.lm.get_base_model() if self.lora is not None else self.lm

    def merged_hf_model(self) -> torch.nn.Module:
        """A plain HF model with the adapters folded in (the model itself when LoRA is off)."""
        if self.lora is None:
            return self.lm
        import copy

        return copy.deepcopy(self.lm).merge_and_unload()
