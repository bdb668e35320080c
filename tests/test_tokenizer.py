"""The word-list CLIP tokenizer: every word one token, any other text still encodes."""

import pytest

from esd_jax.tokenizer import bpe_vocab, make_clip_tokenizer

WORDS = ["red", "green", "yellow", "blue", "circle", "square", "triangle", "striped", "dotted", "a"]


def test_each_word_is_one_token_and_text_round_trips(tmp_path):
    tokenizer = make_clip_tokenizer(WORDS, max_length=12)
    tokenizer.save_pretrained(tmp_path)
    from transformers import CLIPTokenizer

    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    ids = reloaded(" ".join(WORDS)).input_ids
    assert len(ids) == len(WORDS) + 2
    assert reloaded.convert_ids_to_tokens(ids[1:-1]) == [w + "</w>" for w in WORDS]
    assert reloaded.decode(reloaded("A Zebra, green!").input_ids, skip_special_tokens=True) == "a zebra , green !"
    padded = reloaded("red", padding="max_length", max_length=12).input_ids
    assert len(padded) == 12 and padded[-1] == reloaded.eos_token_id


@pytest.mark.parametrize("words", [["red", "green"], ["green", "red"], ["ab", "xab", "abc", "b"]])
def test_merge_order_never_splits_a_word(words):
    _, merges = bpe_vocab(words)
    assert len(merges) == len(set(merges))
    tokenizer = make_clip_tokenizer(words)
    assert tokenizer.convert_ids_to_tokens(tokenizer(" ".join(words)).input_ids[1:-1]) == [w + "</w>" for w in words]
