"""Tokenizers: character level (JSON), byte-level BPE trained on a corpus, any tokenizer.json."""
import json

import numpy as np
import pytest

from jaxllm.errors import DataError
from jaxllm.train.tokenizer import UNK, CharTokenizer, HFTokenizer, build_tokenizer, load_tokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll: Speak, speak. — café 東京\n"


def test_char_tokenizer_ids_are_sorted_characters_and_round_trip():
    tok = CharTokenizer.train([TEXT[:30], TEXT[30:]])
    chars = sorted(set(TEXT) | {UNK})
    assert tok.vocab_size == len(chars)
    ids = tok.encode(TEXT)
    assert ids.tolist() == [chars.index(c) for c in TEXT]
    assert tok.decode(ids) == TEXT


def test_unknown_characters_become_unk_instead_of_crashing():
    tok = CharTokenizer.train(["abc"])
    ids = tok.encode("abzc😀")
    assert tok.decode(ids) == f"ab{UNK}c{UNK}"
    assert tok.decode([999]) == UNK  # an out-of-range id too


def test_char_tokenizer_saves_json_and_loads_back(tmp_path):
    tok = CharTokenizer.train([TEXT])
    tok.save(tmp_path / "tokenizer.json")
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["type"] == "char" and "東" in data["chars"]
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert np.array_equal(again.encode(TEXT), tok.encode(TEXT))


def test_byte_level_bpe_trains_to_the_vocab_size_and_round_trips_unseen_text(tmp_path):
    corpus = [TEXT * 20, "speak hear proceed citizen " * 50]
    tok = build_tokenizer("bpe", lambda: iter(corpus), 300)
    assert 256 < tok.vocab_size <= 300
    assert len(tok.encode(TEXT)) < len(TEXT.encode("utf-8"))  # merges were learned
    unseen = "Ωμέγα ☃ \x00 tab\tend"
    assert tok.decode(tok.encode(unseen)) == unseen  # bytes cover everything
    assert tok.eot_id is not None
    tok.save(tmp_path / "bpe.json")
    loaded = build_tokenizer(str(tmp_path / "bpe.json"), None, 0)  # an existing tokenizer.json
    assert isinstance(loaded, HFTokenizer) and loaded.vocab_size == tok.vocab_size
    assert np.array_equal(loaded.encode(TEXT), tok.encode(TEXT))


@pytest.mark.parametrize("content, needle", [(None, "does not exist"), (b"\xff\xfe", "is not UTF-8 text"),
                                             (b"{nope", "is not JSON"), (b'{"model": 1}', "not a tokenizers JSON")])
def test_bad_tokenizer_files_are_one_line_errors(tmp_path, content, needle):
    path = tmp_path / "tok.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=needle) as e:
        load_tokenizer(path)
    assert "\n" not in str(e.value)
