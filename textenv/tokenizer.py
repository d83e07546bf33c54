"""The tokenizer protocol textenv needs, and a dependency-free character-level tokenizer.

textenv never imports a tokenizer library: anything with ``encode``/``decode``, a ``vocab_size`` and an
``eos_token_id`` works, including a Hugging Face tokenizer wrapped in :class:`HFTokenizerAdapter`.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol, Sequence, runtime_checkable

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"


@runtime_checkable
class Tokenizer(Protocol):
    """What an environment needs from a tokenizer."""

    vocab_size: int
    eos_token_id: int
    pad_token_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens dropped."""
        ...


# Optional, beyond the protocol: ``byte_pieces``, a list of bytes per token id (b"" for the tokens decode drops), set
# when the tokenizer's decode is their concatenation read as UTF-8, i.e. ``decode(ids) ==
# b"".join(byte_pieces[i] for i in ids).decode("utf-8")`` whenever those bytes are valid UTF-8. An environment then
# builds its response's text a token at a time instead of decoding the whole response at every step
# (``TokenEnv._response_text``), and falls back to ``decode`` while the bytes end inside a character.


class CharTokenizer:
    """One token per character of a fixed alphabet; id 0 is ``<pad>`` and id 1 is ``<eos>``.

    The same vocabulary is saved as a Hugging Face tokenizer by ``policies.models.build_char_tokenizer``, so the
    environment, the learner and vLLM agree on every id.
    """

    def __init__(self, alphabet: str) -> None:
        chars = list(dict.fromkeys(alphabet))  # de-duplicate, keep order
        if not chars:
            raise ValueError("CharTokenizer needs a non-empty alphabet")
        self.vocab: list[str] = [PAD_TOKEN, EOS_TOKEN, *chars]
        self._ids = {tok: i for i, tok in enumerate(self.vocab)}
        self.pad_token_id = 0
        self.eos_token_id = 1
        self.vocab_size = len(self.vocab)
        self.byte_pieces: list[bytes] = [b"", b"", *(ch.encode() for ch in chars)]  # decode is a concatenation

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[ch] for ch in text]
        except KeyError as err:
            raise ValueError(
                f"character {err.args[0]!r} in {text!r} is not in the tokenizer alphabet {''.join(self.vocab[2:])!r}"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.vocab[i] for i in ids if i > 1)

    def __repr__(self) -> str:
        return f"CharTokenizer(alphabet={''.join(self.vocab[2:])!r})"


class HFTokenizerAdapter:
    """Presents a Hugging Face tokenizer (or anything with the same methods) as a :class:`Tokenizer`.

    A fast tokenizer is called through its Rust backend (several times faster than the Python wrapper: replay calls
    ``decode`` once per token), and prompt encodings are cached (the same prompt is encoded once per group).
    """

    def __init__(self, hf_tokenizer: Any, cache_size: int = 4096) -> None:
        self._tok = hf_tokenizer
        self._backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        self.vocab_size = len(hf_tokenizer)
        self.eos_token_id = int(hf_tokenizer.eos_token_id)
        pad = hf_tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else hf_tokenizer.eos_token_id)
        self._cache: dict[str, list[int]] = {}
        self._cache_size = cache_size
        self.byte_pieces: list[bytes] | None = concatenated_pieces(hf_tokenizer)

    def encode(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            if self._backend is not None:
                ids = list(self._backend.encode(text, add_special_tokens=False).ids)
            else:
                ids = list(self._tok.encode(text, add_special_tokens=False))
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[text] = ids
        return list(ids)

    @property
    def has_chat_template(self) -> bool:
        """Whether the wrapped tokenizer carries a chat template."""
        return bool(getattr(self._tok, "chat_template", None))

    def chat_prompt(self, user: str, system: str | None = None) -> str:
        """``user`` (and ``system``, when given) as one conversation in the tokenizer's chat template, ending with
        the assistant's turn opened (``add_generation_prompt``): the text the model answers in chat use."""
        if not self.has_chat_template:
            raise ValueError("env.chat_template=true needs a tokenizer with a chat template; this model's tokenizer has "
                             "none (set env.chat_template=false, or use an instruct model's directory)")
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": user}]
        return str(self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def decode(self, ids: Sequence[int]) -> str:
        if self._backend is not None:
            return str(self._backend.decode(list(ids), skip_special_tokens=True))
        return str(self._tok.decode(list(ids), skip_special_tokens=True))


@functools.cache
def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte, back to the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def concatenated_pieces(hf_tokenizer: Any, checks: int = 256) -> list[bytes] | None:
    """Each token's bytes when a Hugging Face fast tokenizer's decode (special tokens skipped) is the UTF-8 reading
    of their concatenation; None when that is not known to hold.

    Known: a backend whose decoder is ``ByteLevel`` (GPT-2, Qwen2, Llama 3, SmolLM2: each token stands for bytes) or
    ``Fuse`` (tokengym's character tokenizers: tokens joined as they are), and whose added tokens are all special
    (decode drops them). Anything else (SentencePiece's ``Metaspace`` or byte fallback, a ``Sequence`` of decoders,
    non-special added tokens) gets None and is decoded whole. The claim is checked against the backend's own decode on
    ``checks`` random id sequences (seeded); one difference and the answer is None.
    """
    import random

    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    kind = type(decoder).__name__
    if kind not in ("ByteLevel", "Fuse"):
        return None
    added = backend.get_added_tokens_decoder()
    if any(not token.special for token in added.values()):
        return None
    byte_of = _byte_level_chars() if kind == "ByteLevel" else None
    pieces: list[bytes] = []
    for i in range(len(hf_tokenizer)):
        token = backend.id_to_token(i)
        if i in added:
            pieces.append(b"")
        elif token is None:
            return None
        elif byte_of is None:
            pieces.append(token.encode())
        elif all(ch in byte_of for ch in token):
            pieces.append(bytes(byte_of[ch] for ch in token))
        else:
            return None
    rng = random.Random(0)
    for _ in range(checks):
        ids = [rng.randrange(len(pieces)) for _ in range(rng.randint(1, 16))]
        try:
            text = b"".join(pieces[i] for i in ids).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text != backend.decode(ids, skip_special_tokens=True):
            return None
    return pieces

