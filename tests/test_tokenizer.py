import pytest

from abu_explorer.model.tokenizer import PromptError, WordTokenizer


def test_encode_unknown_and_limits():
    tok = WordTokenizer.from_captions(["red apple", "flag: brazil", "seven o\u2019clock"], context_length=8)
    ids = tok.encode("Red apple")
    assert len(ids) == 8 and ids[0] == 1 and ids[3] == 2  # <sot> red apple <eot> <pad>...
    assert tok.unknown_words("green apple") == ["green"]
    assert tok.encode("seven o'clock") == tok.encode("seven o\u2019clock")
    with pytest.raises(PromptError, match="empty"):
        tok.encode("   ", allow_empty=False)
    with pytest.raises(PromptError, match="at most 6"):
        tok.encode("a b c d e f g")
    assert WordTokenizer.from_dict(tok.to_dict()).vocab == tok.vocab


def test_caption_longer_than_context_is_refused_at_build():
    with pytest.raises(ValueError, match="context_length"):
        WordTokenizer.from_captions(["one two three four five six seven"], context_length=8)
