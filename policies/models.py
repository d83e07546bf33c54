"""Building tiny Hugging Face models and tokenizers locally, and loading real checkpoints.

Nothing here downloads anything: a tiny policy is built from a config and saved with ``save_pretrained``; a real
checkpoint is any local directory that ``transformers`` can load (Llama, Qwen2, GPT-2, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import logging as transformers_logging

from textenv.tokenizer import EOS_TOKEN, PAD_TOKEN, CharTokenizer

transformers_logging.disable_progress_bar()  # per-file loading bars for 300k-parameter models are noise

ARCHITECTURES = ("llama", "qwen2", "gpt2")


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """A Hugging Face fast tokenizer with exactly the ids of ``textenv.CharTokenizer(alphabet)``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = CharTokenizer(alphabet).vocab
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=PAD_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, unk_token=PAD_TOKEN, clean_up_tokenization_spaces=False
    )


def tiny_model_config(
    arch: str, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
    max_positions: int, pad_token_id: int, eos_token_id: int, tie_word_embeddings: bool = False,
) -> Any:
    """A ``transformers`` config of a small model of architecture ``arch`` (llama, qwen2 or gpt2)."""
    common = dict(vocab_size=vocab_size, pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=eos_token_id,
                  tie_word_embeddings=tie_word_embeddings)
    if arch == "gpt2":
        return AutoConfig.for_model(
            "gpt2", n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_inner=intermediate_size,
            n_positions=max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"policy.arch must be one of {ARCHITECTURES}; got {arch!r}")
    return AutoConfig.for_model(
        arch, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_heads, intermediate_size=intermediate_size, max_position_embeddings=max_positions,
        **common,
    )


def save_tiny_policy(out_dir: str | Path, alphabet: str, seed: int, **config_kwargs: Any) -> Path:
    """Build a randomly initialised tiny causal LM and its character tokenizer; save both in HF format."""
    out = Path(out_dir)
    tokenizer = build_char_tokenizer(alphabet)
    config = tiny_model_config(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **config_kwargs
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "tokengym.json").write_text(json.dumps({"built_by": "tokengym", "seed": seed, "alphabet": alphabet}))
    return out


# ChatML, the template of Qwen2 and SmolLM2 chat models.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BPE_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")  # eos, pad, chat markers


SYNTHETIC_TASKS = ("reverse", "sort_digits", "addition", "count", "bracket")  # the single-turn built-ins


def task_corpus(samples_per_task: int = 300, seed: int = 0) -> list[str]:
    """Text to train a small tokenizer on: prompts and answers of every built-in single-turn task, plus chat lines."""
    import numpy as np

    from textenv.tasks import make_task

    rng = np.random.default_rng(seed)
    lines = ["The answer is 42.", "Reverse the string and answer with the letters only.", "What is 7 + 5? 12"]
    for name in SYNTHETIC_TASKS:
        task = make_task(name)
        for _ in range(samples_per_task):
            sample = task.sample(rng)
            lines.append(sample.prompt + sample.answer)
    return lines


def build_bpe_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2/Qwen2 style) trained on ``corpus``, with eos, pad and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(BPE_SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    eos, pad = BPE_SPECIAL_TOKENS[:2]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, pad_token=pad, bos_token=eos, unk_token=None,
        additional_special_tokens=list(BPE_SPECIAL_TOKENS[2:]), chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def save_bpe_policy(
    out_dir: str | Path, arch: str, seed: int = 0, vocab_size: int = 1024, tie_word_embeddings: bool = True,
    corpus: Iterable[str] | None = None, dropout: float = 0.0, **sizes: Any,
) -> Path:
    """A real-shaped checkpoint, built locally: a random-init ``arch`` model with tied embeddings (as Qwen2-0.5B,
    SmolLM2 and GPT-2 ship), a trained byte-level BPE tokenizer with a chat template, eos and pad set.

    ``sizes`` are :func:`tiny_model_config`'s (hidden_size, num_layers, num_heads, intermediate_size, max_positions);
    ``dropout`` > 0 writes hub-style dropout probabilities into the config (GPT-2 ships 0.1).
    """
    out = Path(out_dir)
    tokenizer = build_bpe_tokenizer(corpus if corpus is not None else task_corpus(), vocab_size)
    config = tiny_model_config(
        arch, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_word_embeddings, **sizes,
    )
    for key in dropout_keys(config):
        setattr(config, key, dropout)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def dropout_keys(config: Any) -> list[str]:
    """The names of a ``transformers`` config's dropout probabilities (``attention_dropout``, GPT-2's ``resid_pdrop``...)."""
    return sorted(
        key for key, value in config.to_dict().items()
        if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float) and not isinstance(value, bool)
    )


@dataclass(frozen=True)
class WeightNames:
    """A checkpoint's parameter names as ``transformers`` names them: what ``save_pretrained`` writes and vLLM's
    ``reload_weights`` takes (``names``); the aliases of a tied parameter that are not stored (``tied``:
    ``lm_head.weight`` when the embeddings are tied); and the weights stored transposed, (in, out), by GPT-2's
    ``Conv1D`` layers (``transposed``: a LoRA update ``B @ A`` is (out, in) and must be transposed to be added)."""

    names: frozenset[str]
    tied: frozenset[str]
    transposed: frozenset[str]


def weight_names(model_dir: str | Path) -> WeightNames:
    """The :class:`WeightNames` of a local HF causal-LM directory (built on the meta device: no weights are read)."""
    from transformers.pytorch_utils import Conv1D

    config = AutoConfig.from_pretrained(Path(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    unique = {name for name, _ in model.named_parameters()}  # a tied parameter under its first (stored) name
    buffers = set(model.state_dict()) - every  # persistent buffers are saved too
    transposed = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Conv1D)}
    return WeightNames(names=frozenset(unique | buffers), tied=frozenset(every - unique), transposed=frozenset(transposed))


def load_causal_lm(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load a local Hugging Face causal LM directory with every dropout probability set to 0.

    RL needs the policy it trains to be the policy that sampled: hub configs often keep their pre-training dropout
    (GPT-2: 0.1 on residuals, embeddings and attention), which would make the PPO ratio differ from 1 by noise alone
    and the learner's log-probs differ from vLLM's (which never drops out). The policy, the frozen reference and a
    separate critic all load through here.
    """
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"policy.model_path {str(path)!r} is not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    for sub_config in {id(c): c for c in (config, config.get_text_config())}.values():
        for key in dropout_keys(sub_config):
            setattr(sub_config, key, 0.0)
    return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)


def load_backbone(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The transformer body (no LM head) of a local causal-LM directory: a separate critic's trunk."""
    return load_causal_lm(model_dir, dtype).base_model


def load_tokenizer(model_dir: str | Path) -> Any:
    """Load the tokenizer saved beside a model."""
    return AutoTokenizer.from_pretrained(Path(model_dir))
