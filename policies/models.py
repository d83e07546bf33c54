"""Building tiny Hugging Face models and tokenizers locally, and loading real checkpoints.

Nothing here downloads anything: a tiny policy is built from a config and saved with ``save_pretrained``; a real
checkpoint is any local directory that ``transformers`` can load (Llama, Qwen2, GPT-2, ...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    max_positions: int, pad_token_id: int, eos_token_id: int,
) -> Any:
    """A ``transformers`` config of a small model of architecture ``arch`` (llama, qwen2 or gpt2)."""
    common = dict(vocab_size=vocab_size, pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=eos_token_id,
                  tie_word_embeddings=False)
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


def load_causal_lm(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load a local Hugging Face causal LM directory; the error names the directory when it is not one."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"policy.model_path {str(path)!r} is not a Hugging Face model directory (no config.json)")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def load_backbone(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The transformer body (no LM head) of a local causal-LM directory: a separate critic's trunk."""
    return load_causal_lm(model_dir, dtype).base_model


def load_tokenizer(model_dir: str | Path) -> Any:
    """Load the tokenizer saved beside a model."""
    return AutoTokenizer.from_pretrained(Path(model_dir))
