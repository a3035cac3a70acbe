"""Readable text from byte-level tokens (featurestore.text)."""
from featurestore.text import merge_partial_bytes, readable_text

OMEGA = "Ω".encode()
SIGMA = "∑".encode()


def test_character_split_across_tokens_is_shown_whole_on_the_completing_token():
    raws = [b"A 40 ", OMEGA[:1], OMEGA[1:], b" resistor"]
    texts = ["A 40 ", "\\xce", "\\xa9", " resistor"]
    assert merge_partial_bytes(raws, texts) == ["A 40 ", "", "Ω", " resistor"]
    assert readable_text(raws, texts) == "A 40 Ω resistor"


def test_three_byte_character_over_tokens_that_also_carry_ascii():
    raws = [b"a" + SIGMA[:1], SIGMA[1:2], SIGMA[2:] + b"b"]
    assert merge_partial_bytes(raws, ["", "", ""]) == ["a", "", "∑b"]


def test_cut_characters_stay_escaped_and_non_byte_tokens_pass_through():
    assert merge_partial_bytes([b"x", OMEGA[:1]], ["x", "?"]) == ["x", "\\xce"]
    assert merge_partial_bytes([SIGMA[1:], b"z"], ["?", "z"]) == ["\\x88\\x91", "z"]
    assert merge_partial_bytes([None, SIGMA[:2], None], ["<s>", "?", "</s>"]) == ["<s>", "\\xe2\\x88", "</s>"]
