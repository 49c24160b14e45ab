"""Corpus reading, tokenisation into a memory-mapped file, packing, shuffling, host slices."""
import json
from pathlib import Path

import numpy as np
import pytest

from jaxllm.train import data
from jaxllm.errors import DataError
from jaxllm.train.tokenizer import CharTokenizer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def test_directory_and_jsonl_documents_are_read_in_order(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "doc one"}) + "\n\n" + json.dumps({"body": "doc two"}) + "\n")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    assert list(data.iter_texts(str(tmp_path), text_field="body")) == ["doc one", "doc two", "second file\n"]


def test_stdlib_corpus_exists_everywhere_and_respects_the_byte_cap():
    files = data.corpus_files("stdlib")
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    texts = list(data.iter_texts("stdlib", max_bytes=100_000))
    sizes = [len(t.encode("utf-8")) for t in texts]
    assert sum(sizes[:-1]) < 100_000 <= sum(sizes)  # stops at the first file that reaches the cap
    assert "def " in "".join(texts)


def test_tokenised_corpus_is_a_memory_map_that_decodes_back_to_the_text(tmp_path):
    text = "hello world, " * 1000
    tok = CharTokenizer.train([text])
    tokens = data.tokenize_corpus(iter([text[:5000], text[5000:]]), tok, tmp_path)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and len(tokens) == len(text)
    assert tok.decode(tokens) == text
    assert np.array_equal(data.load_tokens(tmp_path), tokens)
    with pytest.raises(DataError, match="no text"):
        data.tokenize_corpus(iter([""]), tok, tmp_path / ".")


def test_packed_sequences_are_consecutive_windows_with_shifted_targets():
    tokens = np.arange(100)
    seqs = data.PackedSequences(tokens, 8)
    assert len(seqs) == 12  # (100 - 1) // 8
    assert seqs[0].tolist() == list(range(9)) and seqs[11].tolist() == list(range(88, 97))


def test_shuffling_is_deterministic_per_seed_covers_an_epoch_and_resumes_from_its_state():
    tokens = np.arange(8 * 40 + 1)
    first = lambda it, n: [next(it)[:, 0].tolist() for _ in range(n)]  # noqa: E731
    a, b, c = (data.train_iterator(tokens, 8, 4, seed) for seed in (0, 0, 1))
    epoch = first(a, 10)
    assert epoch == first(b, 10) and epoch != first(c, 10)
    assert sorted(sum(epoch, [])) == list(range(0, 320, 8))  # every sequence once per epoch
    state = a.get_state()
    resumed = data.train_iterator(tokens, 8, 4, 0)
    resumed.set_state(state)
    assert first(resumed, 5) == first(a, 5)


def test_each_host_reads_its_own_slice():
    tokens = np.arange(8 * 40 + 1)
    hosts = [data.train_iterator(tokens, 8, 2, 0, process_index=i, process_count=2) for i in range(2)]
    single = data.train_iterator(tokens, 8, 4, 0)  # one process, the same global batch of 4
    seen = [set(), set()]
    for _ in range(10):
        parts = [next(it) for it in hosts]
        np.testing.assert_array_equal(np.concatenate(parts), next(single))  # host rows = its slice of the global batch
        for part, rows in zip(parts, seen):
            rows.update(part[:, 0].tolist())
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 40


def test_host_evaluation_batches_are_slices_of_the_global_ones():
    tokens = np.arange(8 * 40 + 1)
    single = data.eval_batches(tokens, 8, 4, 3)
    hosts = [data.eval_batches(tokens, 8, 2, 3, process_index=i, process_count=2) for i in range(2)]
    for i in range(3):
        np.testing.assert_array_equal(np.concatenate([hosts[0][i], hosts[1][i]]), single[i])


def test_too_small_a_split_is_a_one_line_error():
    with pytest.raises(DataError, match="too few for one batch"):
        data.eval_batches(np.arange(50), 16, 4, 2)


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="../shared/data/tinyshakespeare.txt is not on this machine")
def test_tinyshakespeare_has_65_characters_plus_unk(tmp_path):
    tok = CharTokenizer.train(data.iter_texts(str(SHAKESPEARE)))
    assert tok.vocab_size == 66
    tokens = data.tokenize_corpus(data.iter_texts(str(SHAKESPEARE)), tok, tmp_path)
    train, val = data.split(tokens, 0.1)
    assert len(tokens) == 1_115_394 and len(val) == len(tokens) - int(len(tokens) * 0.9)
