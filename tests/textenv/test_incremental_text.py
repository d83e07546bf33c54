"""The environment reads its response's text from bytes it appends a token at a time when the tokenizer's decode is
the UTF-8 reading of its tokens' bytes (``byte_pieces``): the text every reward and stop check sees must be exactly
the tokenizer's decode of the response so far, also while the bytes end inside a character."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from policies.models import build_bpe_tokenizer, build_char_tokenizer, task_corpus
from textenv import CharTokenizer, HFTokenizerAdapter, TokenEnv
from textenv.tokenizer import concatenated_pieces

ALPHABET = "abcdefgh=éü中"


def bpe() -> HFTokenizerAdapter:
    """A byte-level BPE (GPT-2/Qwen2 style) whose vocabulary holds every single byte, so a response can stop inside a
    multi-byte character (é, ü, 中 are 2 and 3 bytes)."""
    return HFTokenizerAdapter(build_bpe_tokenizer(task_corpus(20) + ["héllo wörld é ü 中文 中"] * 5, 400))


TOKENIZERS = {"char": lambda: CharTokenizer(ALPHABET), "hf-char": lambda: HFTokenizerAdapter(
    build_char_tokenizer(ALPHABET)), "bpe": bpe}
BUILT = {name: make() for name, make in TOKENIZERS.items()}


class Recorder:
    """Wraps an environment's task's stop check, which sees the response's text at every step: keeps (the response's
    ids, the text) of each step."""

    def __init__(self, env: TokenEnv) -> None:
        self.texts: list[tuple[list[int], str]] = []
        stop = env.task.stop

        def recording(sample, text):
            self.texts.append((list(env._response_ids), text))
            return stop(sample, text)

        env.task.stop = recording


def reverse_env(tok, max_response_tokens: int = 24) -> tuple[TokenEnv, Recorder]:
    env = TokenEnv(task="reverse", task_kwargs={"letters": "abcdefgh"}, tokenizer=tok,
                   max_response_tokens=max_response_tokens)
    return env, Recorder(env)


def test_which_tokenizers_are_read_from_bytes() -> None:
    for name, tok in BUILT.items():
        assert tok.byte_pieces is not None and len(tok.byte_pieces) == tok.vocab_size, name
    pieces = BUILT["bpe"].byte_pieces
    partial = [p for p in pieces if p and not _valid(p)]
    assert partial, "the byte-level vocabulary has tokens of part of a character"
    # A SentencePiece-style decoder (a space marker replaced on decode) is not a concatenation: decoded whole.
    sp = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "▁a": 2, "b": 3}, unk_token="<pad>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(tokenizer_object=sp, pad_token="<pad>", eos_token="<eos>")
    assert concatenated_pieces(fast) is None and HFTokenizerAdapter(fast).byte_pieces is None
    # An added token that is not special is decoded as it is written, not as bytes: decoded whole too.
    char = build_char_tokenizer("ab")
    char.add_tokens(["<think>"])
    assert concatenated_pieces(char) is None


def _valid(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(TOKENIZERS)), seed=st.integers(0, 2**31), data=st.data())
def test_every_step_sees_the_decode_of_the_response_so_far(name, seed, data) -> None:
    tok = BUILT[name]
    env, recorder = reverse_env(tok)
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1).filter(lambda i: i != tok.eos_token_id),
                             min_size=1, max_size=24))
    env.reset(seed=seed)
    for token in ids:
        _, _, terminated, truncated, _ = env.step(token)
        if terminated or truncated:
            break
    assert recorder.texts
    for response, text in recorder.texts:
        assert text == tok.decode(response), (response, text)
    # The same environment after a reset starts from an empty response.
    env.reset(seed=seed)
    env.step(ids[0])
    assert recorder.texts[-1] == ([ids[0]], tok.decode([ids[0]]))


def test_a_character_split_over_tokens_is_decoded_whole_until_it_is_complete() -> None:
    tok = BUILT["bpe"]
    pieces = tok.byte_pieces
    first, second = "é".encode()  # two bytes, each a token of its own in a byte-level vocabulary
    a, b = pieces.index(bytes([first])), pieces.index(bytes([second]))
    env, recorder = reverse_env(tok, max_response_tokens=8)
    env.reset(seed=0)
    env.step(a)
    env.step(b)
    assert [text for _, text in recorder.texts] == [tok.decode([a]), "é"]
    assert recorder.texts[0][1] == "\ufffd"  # half a character: the tokenizer's own replacement character


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_replay_scores_as_before(name) -> None:
    """Rewards and scores of replayed responses are the same with and without reading from bytes."""
    from textenv import replay

    tok = BUILT[name]
    fast = TokenEnv(task="reverse", task_kwargs={"letters": "abcdefgh"}, tokenizer=tok)
    slow = TokenEnv(task="reverse", task_kwargs={"letters": "abcdefgh"}, tokenizer=tok)
    slow._pieces = None  # the whole-response decode at every step
    for seed in range(20):
        sample = fast.task.sample(fast.np_random)
        answer = tok.encode(sample.answer)
        response = answer[: 1 + seed % len(answer)] + tok.encode("ab")[: seed % 3] + [tok.eos_token_id]
        got, want = replay(fast, sample, response), replay(slow, sample, response)
        assert got["rewards"].tolist() == want["rewards"].tolist() and got["score"] == want["score"], seed
