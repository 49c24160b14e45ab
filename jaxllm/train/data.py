"""Training data: text -> tokens on disk (memory-mapped) -> packed sequences -> grain batches.

1. `corpus_files` resolves `train.data`: a text file, a JSONL file (one document per line, text in
   `train.text_field`), a directory of .txt/.md/.jsonl files, or `stdlib`: the .py files of the
   Python standard library, a corpus every machine has without a download.
2. `tokenize_corpus` streams the documents (in chunks, so a corpus bigger than memory works) through
   the tokenizer once, into `tokens.bin` (uint16/uint32) and `tokens.json` in the run directory.
   The last `val_fraction` of the stream is the validation split.
3. `train_iterator` packs the split into sequences of seq_len + 1 tokens (inputs and shifted
   targets), shuffles them deterministically from the seed with grain, gives each host its own
   slice, repeats, and batches. Its state (`get_state`) is checkpointed with the model.
"""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Iterator

import numpy as np

from jaxllm.files import atomic_write
from jaxllm.errors import DataError

CHUNK_CHARS = 1 << 20
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


def corpus_files(data: str) -> list[Path]:
    if data == "stdlib":
        return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    path = Path(data)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"train.data={data!r}: the directory holds no {', '.join(TEXT_SUFFIXES)} files")
        return files
    if not path.is_file():
        raise DataError(f"train.data={data!r}: no such file or directory (allowed: a text or .jsonl file, "
                        f"a directory of them, or 'stdlib')")
    return [path]


def iter_texts(data: str, text_field: str = "text", max_bytes: int | None = None) -> Iterator[str]:
    """The corpus as a stream of strings (whole JSONL documents, or chunks of text files)."""
    total = 0
    for path in corpus_files(data):
        if data == "stdlib" and max_bytes is not None and total >= max_bytes:
            return
        try:
            for text in (_jsonl_texts(path, text_field) if path.suffix == ".jsonl" else _file_chunks(path)):
                total += len(text.encode("utf-8"))
                yield text
        except UnicodeDecodeError as e:
            if data == "stdlib":  # a stray non-UTF-8 stdlib file is skipped, not fatal
                continue
            raise DataError(f"{str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason}); "
                            f"convert it, e.g. iconv -t UTF-8") from None


def _file_chunks(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        while chunk := f.read(CHUNK_CHARS):
            yield chunk


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{str(path)}:{line_no}: not a JSON line ({e.msg})") from None
            if not isinstance(doc, dict) or not isinstance(doc.get(field), str):
                raise DataError(f"{str(path)}:{line_no}: expected an object with a string field "
                                f"{field!r} (set train.text_field)")
            yield doc[field]


def check_corpus(data: str, text_field: str = "text", max_bytes: int | None = None) -> None:
    """A DataError unless `train.data` exists and holds some text: checked before a run directory is
    written to, so an empty corpus never leaves a tokenizer of nothing behind."""
    if not any(iter_texts(data, text_field, max_bytes)):
        raise DataError(f"train.data={data!r} holds no text (empty file or files); give a corpus")


def tokenize_corpus(texts: Iterator[str], tokenizer, out_dir: Path) -> np.memmap:
    """Encode the stream once into out_dir/tokens.bin; save the tokenizer beside it; write
    tokens.json last. tokens.json marks a finished preparation: without it, a run directory's
    tokenizer and tokens are made again (an interrupted or failed one leaves nothing that is used)."""
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    eot = getattr(tokenizer, "eot_id", None)
    tmp = out_dir / "tokens.bin.tmp"
    n = 0
    try:
        with open(tmp, "wb") as f:
            for text in texts:
                ids = tokenizer.encode(text)
                if eot is not None:
                    ids = np.append(ids, eot)
                f.write(ids.astype(dtype).tobytes())
                n += len(ids)
        if n == 0:
            raise DataError("the training data holds no text (empty file or files)")
        tokenizer.save(out_dir / "tokenizer.json")
        tmp.replace(out_dir / "tokens.bin")
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write(out_dir / "tokens.json", json.dumps({"n_tokens": n, "dtype": np.dtype(dtype).name}))
    return load_tokens(out_dir)


def load_tokens(out_dir: Path) -> np.memmap | None:
    """The run directory's tokens (memory-mapped), or None when it has none yet; a tokens.json or
    tokens.bin that does not hold what tokens.json says is a one-line DataError."""
    meta_path, bin_path = out_dir / "tokens.json", out_dir / "tokens.bin"
    if not meta_path.is_file():
        return None
    redo = f"delete {str(bin_path)!r} and {str(meta_path)!r} to tokenise the corpus again"
    try:
        meta = json.loads(meta_path.read_text())
        n, dtype = int(meta["n_tokens"]), np.dtype(meta["dtype"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{str(meta_path)!r} is corrupt ({type(e).__name__}: {e}); {redo}") from None
    size = bin_path.stat().st_size if bin_path.is_file() else None
    if size != n * dtype.itemsize:
        found = "is missing" if size is None else f"holds {size:,} bytes, not {n * dtype.itemsize:,}"
        raise DataError(f"{str(bin_path)!r} {found} ({n:,} {dtype.name} tokens in tokens.json): truncated or "
                        f"replaced; {redo}")
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(n,))


def split(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    cut = int(len(tokens) * (1 - val_fraction))
    return tokens[:cut], tokens[cut:]


class PackedSequences:
    """Random-access source of non-overlapping windows of seq_len + 1 tokens (a grain source)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> np.ndarray:
        start = i * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], np.int32)


def _sequences(tokens: np.ndarray, seq_len: int, batch: int, what: str, process_index: int, process_count: int):
    import grain

    source = PackedSequences(tokens, seq_len)
    if len(source) < batch * process_count:
        raise DataError(f"the {what} split has {len(tokens)} tokens: too few for one batch of "
                        f"{batch * process_count} x {seq_len + 1}; use more data or a smaller batch / seq_len")
    return grain.MapDataset.source(source)


def train_iterator(tokens: np.ndarray, seq_len: int, batch: int, seed: int,
                   process_index: int = 0, process_count: int = 1):
    """Endless shuffled batches [batch, seq_len + 1] for this host (batch = per-host batch)."""
    import grain

    ds = _sequences(tokens, seq_len, batch, "training", process_index, process_count)
    ds = ds.shuffle(seed=seed).repeat(None)  # one global order, new every epoch
    # Host h takes rows [h*batch, (h+1)*batch) of every global batch of process_count*batch rows:
    # the same global batches as one process, and each host reads only its own rows.
    ds = ds.batch(batch, drop_remainder=True)[process_index::process_count]
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


def eval_batches(tokens: np.ndarray, seq_len: int, batch: int, n_batches: int,
                 process_index: int = 0, process_count: int = 1) -> list[np.ndarray]:
    """The first n_batches batches of the validation split, in order (the same every evaluation)."""
    ds = _sequences(tokens, seq_len, batch, "validation", process_index, process_count)
    ds = ds.batch(batch, drop_remainder=True)[process_index::process_count]  # as in train_iterator
    return [ds[i] for i in range(min(n_batches, len(ds)))]
