"""A CLIP byte-level BPE vocabulary built from a word list, for models made here from scratch.

Real pipelines ship their tokenizer; tiny test pipelines and the toy model need one that covers their
own words. Every byte is a token (so any text encodes), and each listed word becomes one token.
"""

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _chain(word: str) -> list[tuple[str, str]]:
    """The merges that build `word` left to right from its characters."""
    pieces = [*word[:-1], word[-1] + "</w>"]
    return [("".join(pieces[:i]), pieces[i]) for i in range(1, len(pieces))]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    pieces = [*word[:-1], word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:], strict=False))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def bpe_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) in which every word of `words` (lower-case ASCII) is a single token.

    One word's merges can fire inside another and break its chain ("r e" from "red" splits
    "green"); such a word's chain is moved to the front until every word is whole.
    """
    words = list(dict.fromkeys(words))
    merges = list(dict.fromkeys(m for w in words for m in _chain(w)))
    for _ in range(len(words) + 1):
        ranks = {m: i for i, m in enumerate(merges)}
        broken = [w for w in words if len(_bpe(w, ranks)) > 1]
        if not broken:
            break
        front = list(dict.fromkeys(m for w in broken for m in _chain(w)))
        merges = front + [m for m in merges if m not in front]
    else:
        raise ValueError(f"no merge order makes every word one token: {broken}")
    chars = _byte_chars()
    tokens = [*chars, *(c + "</w>" for c in chars), *(a + b for a, b in merges), BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return vocab, [f"{a} {b}" for a, b in merges]


def make_clip_tokenizer(words: Iterable[str], *, max_length: int = 77, pad_token: str = EOS) -> CLIPTokenizer:
    """A transformers CLIPTokenizer over `words`; SD 1.x pads with EOS, SD 2.x with "!"."""
    vocab, merges = bpe_vocab(words)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(
            vocab=str(Path(tmp) / "vocab.json"),
            merges=str(Path(tmp) / "merges.txt"),
            pad_token=pad_token,
            model_max_length=max_length,
        )
