"""Corpus preparation: documents → a byte-fallback BPE tokenizer, and documents → token shards that training reads.

Inputs are files and folders; folders are walked recursively in sorted name order. Each input is read as:
- plain text `.txt`: one document per block of non-blank lines (blocks are separated by blank lines),
- JSON Lines `.jsonl`: one document per line, its `text` field,
  (both also compressed: `.txt.gz`, `.jsonl.gz`, `.txt.zst`, `.jsonl.zst`),
- Parquet `.parquet`, and folders written by `datasets`' `save_to_disk`: one document per row, its `text` column.

Prepare tokenizes in worker processes, appends EOS to every document and writes two splits with `jobs.shards`:
a document goes to `val/` when a hash of (seed, its file's name under its input, its record number) falls below
the validation fraction, so the split depends on neither the workers nor the other files. Records that are not
usable documents are skipped and counted by reason; a file that cannot be read at all stops the prepare. Input
that yields no document, no token or an empty train split is refused with those counts, and what the refused
prepare added to its output folder is removed. Long documents are tokenized in slices cut before a space (see
`cuts_at_spaces`), so memory grows with the document's text, not with a list of its token ids.

Resuming: `manifest.json` records the settings and, after every shard written, each split's shards, the input
position the split has consumed up to (file number, record number, tokens of that record written), its skip
counts, and what reading each file found (for the report). Run again on the same output, a prepare keeps the
committed shards, reads again from that position and rewrites only the partial shard, so the result is
byte-identical to an uninterrupted prepare.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from tokenizers import Tokenizer

from jobs.shards import DTYPES, ShardWriter, token_dtype
from orchestrator.core.corpus import FORMATS_HELP, SEED_EVAL_PASS
from orchestrator.core.errors import OrchError
from orchestrator.core.files import file_sha256, library_writes, read_json, write_json_atomic
from orchestrator.core.shard_index import Shard, ShardIndex, read_index

SPLITS = ("train", "val")
MANIFEST = "manifest.json"
TEXT_FIELD = "text"
CHUNK_BYTES = 1 << 20  # input text per unit of work sent to a worker
BATCH_CHARS = 1 << 20  # text tokenized in one call of the tokenizer
SLICE_CHARS = 1 << 16  # a longer document is tokenized in slices of about this many characters, cut before a space
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
BYTE_TOKENS = tuple(f"<0x{byte:02X}>" for byte in range(256))
SAMPLE_RECORD = "orch-sample.json"  # in a tokenizer folder: how much of the corpus it was trained on
MAX_ALPHABET = 1000  # characters kept as base tokens; rarer ones are spelled with byte tokens

EMPTY_FILE, EMPTY_TEXT, INVALID_UTF8 = "empty file", "empty text", "invalid UTF-8"
MALFORMED_JSON, MISSING_TEXT, NOT_A_STRING = "malformed JSON", f"missing '{TEXT_FIELD}' field", "text is not a string"
READ_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError, pa.ArrowException)


# --- inputs -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputFile:
    """One file (or save_to_disk folder) to read. `key`, its name under the input it was found in, decides splits."""

    path: Path
    key: str
    kind: str  # txt, jsonl, parquet, dataset
    compression: str  # "", ".gz", ".zst"
    size: int


def is_dataset_folder(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def classify(path: Path) -> tuple[str, str] | None:
    """(kind, compression) of a readable input, or None."""
    if path.is_dir():
        return ("dataset", "") if is_dataset_folder(path) else None
    name, compression = path.name.lower(), ""
    for suffix in (".gz", ".zst"):
        if name.endswith(suffix):
            name, compression = name.removesuffix(suffix), suffix
    for kind in ("txt", "jsonl", "parquet"):
        if name.endswith(f".{kind}") and not (kind == "parquet" and compression):
            return kind, compression
    return None


def list_inputs(paths: list[Path]) -> tuple[list[InputFile], list[Path]]:
    """The files to read, in order, and the files found in folders that are not inputs (reported, not read)."""
    files, ignored = [], []
    for root in paths:
        if not root.exists():
            raise OrchError(
                f"--input {root}: no such file or folder. Allowed: an existing file or folder. {FORMATS_HELP}"
            )
        found = [root] if classify(root) or root.is_file() else walk(root)
        for path in found:
            kind = classify(path)
            if kind is None and path == root:
                raise OrchError(
                    f"--input {root}: not a supported input. Allowed: a folder, or a file of {FORMATS_HELP}"
                )
            if kind is None:
                ignored.append(path)
                continue
            key = root.name if path == root else f"{root.name}/{path.relative_to(root).as_posix()}"
            size = sum(p.stat().st_size for p in path.rglob("*")) if path.is_dir() else path.stat().st_size
            files.append(InputFile(path, key, *kind, size))
    if not files:
        raise OrchError(
            f"--input {', '.join(map(str, paths))}: no input files found. "
            f"{reading_counts(0, len(ignored), 0, Counter())}. Allowed: folders holding files of {FORMATS_HELP}"
        )
    return files, ignored


def walk(folder: Path) -> Iterator[Path]:
    """Files below `folder` in sorted order; a save_to_disk folder counts as one file."""
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and not is_dataset_folder(entry):
            yield from walk(entry)
        else:
            yield entry


# --- reading records ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """Consecutive records of one input file: the unit of work a tokenizer worker gets."""

    file_no: int
    key: str
    kind: str
    first: int  # record number of records[0]
    records: list[Any]  # bytes for txt and jsonl, str or None for columns
    input_bytes: int  # of the input file, for progress
    empty_file: bool = False


@dataclass
class FileTally:
    """What reading one input file found, for the report: its records, and the lines of its first (a .txt block),
    which tell a file of one document per line that has no blank line between them."""

    records: int = 0
    first_lines: int = 0

    @property
    def one_multiline_document(self) -> bool:
        return self.records == 1 and self.first_lines > 1


def read_chunks(
    file: InputFile, file_no: int, start: int, chunk_bytes: int, tally: FileTally | None = None
) -> Iterator[Chunk]:
    """The file's records from record number `start` on, in chunks of about `chunk_bytes`; `tally`, if given, gets
    every record of the file counted, those before `start` too."""
    try:
        with open_records(file) as (records, position):
            batch, size, first, reported, number = [], 0, start, position(), -1
            for number, (record, length) in enumerate(records):
                if number == 0 and tally is not None and file.kind == "txt":
                    tally.first_lines = record.count(b"\n") + 1
                if number < start:
                    continue
                batch.append(record)
                size += length
                if size >= chunk_bytes:
                    now = position()
                    yield Chunk(file_no, file.key, file.kind, first, batch, now - reported)
                    batch, size, first, reported = [], 0, number + 1, now
            if tally is not None:
                tally.records = number + 1
            if batch or number < 0:
                yield Chunk(file_no, file.key, file.kind, first, batch, position() - reported, number < 0)
    except READ_ERRORS as err:
        raise OrchError(f"{file.path}: cannot be read as {file.kind}{file.compression}: {err}") from None


@contextmanager
def open_records(file: InputFile) -> Iterator[tuple[Iterator[tuple[Any, int]], Callable[[], int]]]:
    """The file's records with their sizes, and a function telling how many bytes of the file were consumed."""
    if file.kind in ("txt", "jsonl"):
        with open(file.path, "rb", buffering=0) as raw, decompress(raw, file.compression) as stream:
            records = text_blocks(stream) if file.kind == "txt" else ((line, len(line)) for line in stream)
            yield records, raw.tell
        return
    tables = [file.path] if file.kind == "parquet" else arrow_files(file.path)
    rows, done = sum(column_rows(path) for path in tables), [0]

    def texts() -> Iterator[tuple[str | None, int]]:
        for path in tables:
            for batch in column_batches(path):
                for text in batch.to_pylist():
                    done[0] += 1
                    yield text, len(text or "")

    yield texts(), lambda: file.size * done[0] // max(rows, 1)


def decompress(raw: io.RawIOBase, compression: str) -> io.BufferedIOBase:
    if compression == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == ".zst":
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
    return io.BufferedReader(raw, buffer_size=1 << 20)


def text_blocks(lines: Iterable[bytes]) -> Iterator[tuple[bytes, int]]:
    """Blocks of non-blank lines, without the final line break, and the bytes each block and its blank lines took."""
    block, size = [], 0
    for line in lines:
        size += len(line)
        if line.strip():
            block.append(line)
        elif block:
            yield b"".join(block).rstrip(b"\r\n"), size
            block, size = [], 0
    if block:
        yield b"".join(block).rstrip(b"\r\n"), size


def arrow_files(folder: Path) -> list[Path]:
    return [folder / f["filename"] for f in json.loads((folder / "state.json").read_text())["_data_files"]]


def check_text_column(path: Path, schema: pa.Schema) -> None:
    """A table input must have a string `text` column; without one the whole file is unusable."""
    if TEXT_FIELD not in schema.names:
        raise OrchError(
            f"{path}: has no '{TEXT_FIELD}' column (columns: {', '.join(schema.names)}). "
            f"Allowed: a table with a string column named '{TEXT_FIELD}'."
        )
    column = schema.field(TEXT_FIELD).type
    if not (pa.types.is_string(column) or pa.types.is_large_string(column)):
        raise OrchError(f"{path}: column '{TEXT_FIELD}' holds {column}. Allowed: a string column.")


def column_rows(path: Path) -> int:
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    with pa.memory_map(str(path)) as source:
        return sum(batch.num_rows for batch in pa.ipc.open_stream(source))


def column_batches(path: Path) -> Iterator[pa.Array]:
    """The `text` column of a Parquet file or of an Arrow stream file (what save_to_disk writes), batch by batch."""
    if path.suffix == ".parquet":
        table = pq.ParquetFile(path)
        check_text_column(path, table.schema_arrow)
        yield from (batch.column(0) for batch in table.iter_batches(batch_size=1024, columns=[TEXT_FIELD]))
        return
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_stream(source)
        check_text_column(path, reader.schema)
        yield from (batch.column(TEXT_FIELD) for batch in reader)


def document_text(kind: str, record: Any) -> tuple[str | None, str | None]:
    """(text, None) for a usable document, else (None, the reason it is skipped)."""
    if kind in ("txt", "jsonl"):
        try:
            record = record.decode("utf-8")
        except UnicodeDecodeError:
            return None, INVALID_UTF8
    if kind == "jsonl":
        line = record
        try:
            data = json.loads(line)
        except ValueError:
            return None, MALFORMED_JSON
        record = data.get(TEXT_FIELD) if isinstance(data, dict) else None
        if record is not None and not isinstance(record, str):
            return None, NOT_A_STRING
        if record is not None and ("\\ud" in line or "\\uD" in line):
            try:
                record.encode("utf-8")  # a JSON escape can spell a lone surrogate, which no UTF-8 text holds
            except UnicodeEncodeError:
                return None, INVALID_UTF8
    if record is None:
        return None, MISSING_TEXT
    if not record.strip():
        return None, EMPTY_TEXT
    return record, None


def read_texts(files: list[InputFile], skipped: Counter[str], sample_bytes: int | None = None) -> Iterator[str]:
    """Every usable document of the files in order, counting the skipped records by reason into `skipped`. With
    `sample_bytes` below the input's size, only the start of each file, its share of the sample by size."""
    total = sum(file.size for file in files)
    for file_no, file in enumerate(files):
        budget = file.size if sample_bytes is None or total <= sample_bytes else file.size * sample_bytes // total
        read = 0
        for chunk in read_chunks(file, file_no, 0, CHUNK_BYTES):
            if read >= budget and budget < file.size:
                break
            read += chunk.input_bytes
            if chunk.empty_file:
                skipped[EMPTY_FILE] += 1
            for record in chunk.records:
                text, reason = document_text(chunk.kind, record)
                if reason:
                    skipped[reason] += 1
                else:
                    yield text


# --- tokenizer ----------------------------------------------------------------------------------------------------


class SampledTexts:
    """The documents `read_texts` yields, counted as they pass: tokenizer training reports how many it read."""

    def __init__(self, files: list[InputFile], sample_bytes: int | None) -> None:
        self.files, self.sample_bytes = files, sample_bytes
        self.skipped: Counter[str] = Counter()
        self.used = 0

    def __iter__(self) -> Iterator[str]:
        for text in read_texts(self.files, self.skipped, self.sample_bytes):
            self.used += 1
            yield text


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, output: Path, show_progress: bool = False, record: dict | None = None
) -> int:
    """Train a byte-fallback BPE like Llama's and save it where `AutoTokenizer.from_pretrained` loads it.

    SentencePiece style: spaces become `▁` (Metaspace), characters outside the kept alphabet are spelled with the
    256 byte tokens `<0x00>`..`<0xFF>`, so any text encodes without `<unk>`. Ids: `<unk>` 0, `<s>` 1, `</s>` 2
    (eos), the byte tokens 3..258, then the learned pieces. The folder appears complete or not at all; returns the
    number of tokens (at most `vocab_size`, fewer when the corpus has no more merges to learn). `record`, where
    given, is kept as `orch-sample.json` in the folder: how the corpus was sampled.
    """
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    reserved = len(SPECIAL_TOKENS) + len(BYTE_TOKENS)
    if vocab_size <= reserved:
        raise OrchError(
            f"--vocab-size {vocab_size} leaves no room for learned tokens. Allowed: more than {reserved} "
            f"({len(SPECIAL_TOKENS)} special tokens and {len(BYTE_TOKENS)} byte tokens)."
        )
    metaspace = {"replacement": "▁", "prepend_scheme": "first", "split": True}
    learner = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(**metaspace)
    learned = vocab_size - len(BYTE_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=learned,
        special_tokens=list(SPECIAL_TOKENS),
        limit_alphabet=min(MAX_ALPHABET, learned - len(SPECIAL_TOKENS)),
        show_progress=show_progress,
    )
    learner.train_from_iterator(texts, trainer=trainer)
    model = json.loads(learner.to_str())["model"]
    pieces = [piece for piece, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    vocab = {piece: i for i, piece in enumerate([*SPECIAL_TOKENS, *BYTE_TOKENS, *pieces[len(SPECIAL_TOKENS) :]])}
    merges = [tuple(merge) for merge in model["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(**metaspace)
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(**metaspace)])
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    staging = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    with library_writes(staging):
        fast.save_pretrained(staging)
    if record is not None:
        write_json_atomic(staging / SAMPLE_RECORD, record)
    staging.rename(output)
    return len(vocab)


@dataclass(frozen=True)
class TokenizerFiles:
    """A saved fast tokenizer as prepare uses it, read without transformers."""

    path: Path
    json: str
    eos_id: int
    vocab_size: int  # largest id + 1
    sha256: str


def read_tokenizer_files(directory: Path) -> TokenizerFiles:
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise OrchError(
            f"--tokenizer {directory}: {path} does not exist. Allowed: a folder saved by a Hugging Face fast "
            "tokenizer (`orch tokenizer train` makes one)."
        )
    text = path.read_text(encoding="utf-8")
    tokenizer = Tokenizer.from_str(text)
    config = {
        **read_json(directory / "special_tokens_map.json", {}),
        **read_json(directory / "tokenizer_config.json", {}),
    }
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    eos_id = tokenizer.token_to_id(eos) if isinstance(eos, str) else None
    if eos_id is None:
        raise OrchError(
            f"--tokenizer {directory}: tokenizer_config.json names no eos_token that is in the vocabulary "
            f"(found {eos!r}). Allowed: a tokenizer whose eos_token (e.g. '</s>') is one of its tokens."
        )
    vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    return TokenizerFiles(directory.resolve(), text, eos_id, vocab_size, file_sha256(path))


# --- tokenizing ---------------------------------------------------------------------------------------------------


@dataclass
class Part:
    """The documents of one chunk that belong to one split."""

    records: np.ndarray  # record numbers, ascending
    lengths: np.ndarray  # tokens of each document, its EOS included
    tokens: np.ndarray
    skipped: list[tuple[int, str]]  # (record number, reason)


@dataclass(frozen=True)
class TokenizedChunk:
    file_no: int
    input_bytes: int
    parts: dict[str, Part]


def validation_mask(key: str, records: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Which records go to val: a 64-bit hash of (seed, file key, record number) below `fraction` of its range.

    The file part is hashed once with blake2b, the record number is mixed in with the splitmix64 finalizer,
    vectorized over the chunk."""
    base = int.from_bytes(hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest(), "little")
    x = np.uint64(base) + records.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (x ^ (x >> np.uint64(31))) < np.uint64(fraction * 2.0**64)


def cuts_at_spaces(tokenizer: Tokenizer) -> bool:
    """Whether encoding a text cut before any space, piece by piece, gives the ids of the whole text.

    True for the tokenizers `train_tokenizer` makes: no normalizer, a Metaspace pre-tokenizer that splits before
    every space (BPE never merges across that boundary, byte fallback spells each word alone) and adds no `▁` to a
    text that already starts with a space, and no added tokens but special ones (encoded as text by prepare, so
    none can span a cut). Other tokenizers encode every document whole."""
    from tokenizers import pre_tokenizers

    pre = tokenizer.pre_tokenizer
    return (
        tokenizer.normalizer is None
        and isinstance(pre, pre_tokenizers.Metaspace)
        and pre.split
        and pre.replacement != " "
        and all(token.special for token in tokenizer.get_added_tokens_decoder().values())
    )


def slices(text: str, size: int) -> Iterator[str]:
    """`text` in consecutive slices of about `size` characters, every slice after the first starting with a space
    (a slice is longer where there is no space to cut before)."""
    start = 0
    while len(text) - start > size:
        cut = text.rfind(" ", start + 1, start + size + 1)
        if cut < 0:
            cut = text.find(" ", start + size + 1)
            if cut < 0:
                break
        yield text[start:cut]
        start = cut
    yield text[start:] if start else text


class ChunkTokenizer:
    """Decodes a chunk's records (taking them out of the chunk), tokenizes the documents in batches and sorts them
    into the splits."""

    def __init__(self, tokenizer_json: str, eos_id: int, dtype: str, seed: int, val_fraction: float) -> None:
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.encode_special_tokens = True  # a literal "</s>" in a document is text, not a separator
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.eos_id, self.dtype, self.seed, self.val_fraction = eos_id, DTYPES[dtype], seed, val_fraction
        self.sliceable = cuts_at_spaces(self.tokenizer)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The documents' token ids, each document followed by EOS, and how many tokens each has (its EOS included).

        Batches of about `BATCH_CHARS` characters go through the tokenizer, and each batch's ids go straight into
        an array, so a long document never exists as one list of ids (a Python int per token) nor as one encoding
        (the library keeps offsets and strings per token). With a tokenizer that `cuts_at_spaces`, a document
        longer than `SLICE_CHARS` is encoded as slices cut before a space, which give the same ids."""
        arrays, lengths = [np.zeros(0, dtype=self.dtype)], np.ones(len(texts), dtype=np.int64)
        for batch, owners, ends in self.batches(texts):
            ids = [encoding.ids for encoding in self.tokenizer.encode_batch_fast(batch, add_special_tokens=False)]
            counts = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=int(counts.sum()))
            del ids
            np.add.at(lengths, np.array(owners, dtype=np.int64), counts)
            arrays.append(np.insert(flat, np.cumsum(counts)[np.array(ends, dtype=bool)], self.eos_id))
        return np.concatenate(arrays), lengths

    def batches(self, texts: list[str]) -> Iterator[tuple[list[str], list[int], list[bool]]]:
        """The texts, or their slices, in batches of about `BATCH_CHARS`: each piece with its document's number and
        whether it ends that document."""
        batch, owners, ends, size = [], [], [], 0
        for number, text in enumerate(texts):
            pieces = slices(text, SLICE_CHARS) if self.sliceable else iter((text,))
            piece = next(pieces)
            while piece is not None:
                following = next(pieces, None)
                batch.append(piece)
                owners.append(number)
                ends.append(following is None)
                size += len(piece)
                if size >= BATCH_CHARS:
                    yield batch, owners, ends
                    batch, owners, ends, size = [], [], [], 0
                piece = following
        if batch:
            yield batch, owners, ends

    def __call__(self, chunk: Chunk) -> TokenizedChunk:
        numbers = np.arange(chunk.first, chunk.first + max(len(chunk.records), chunk.empty_file), dtype=np.int64)
        in_val = validation_mask(chunk.key, numbers, self.seed, self.val_fraction)
        split_of = [SPLITS[is_val] for is_val in in_val.tolist()]
        texts, kept, skipped = [], [], {split: [] for split in SPLITS}
        if chunk.empty_file:
            skipped[split_of[0]].append((0, EMPTY_FILE))
        records = chunk.records
        records.reverse()  # taken out one by one, so that a record's raw bytes are freed once it is decoded
        for i in range(len(records)):
            text, reason = document_text(chunk.kind, records.pop())
            if reason:
                skipped[split_of[i]].append((chunk.first + i, reason))
            else:
                texts.append(text)
                kept.append(i)
        tokens, lengths = self.encode(texts)
        del texts
        kept = np.array(kept, dtype=np.int64)
        parts = {}
        for split, chosen in (("train", ~in_val[kept]), ("val", in_val[kept])):
            ids = tokens if chosen.all() else tokens[np.repeat(chosen, lengths)]  # no copy when one split has all
            parts[split] = Part(numbers[kept][chosen], lengths[chosen], ids, skipped[split])
        return TokenizedChunk(chunk.file_no, chunk.input_bytes, parts)


_worker: ChunkTokenizer | None = None


def _start_worker(*args: Any) -> None:
    global _worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process; the processes are the parallelism
    _worker = ChunkTokenizer(*args)


def _tokenize(chunk: Chunk) -> TokenizedChunk:
    return _worker(chunk)


Tokenize = Callable[[Iterator[Chunk]], Iterator[TokenizedChunk]]


@contextmanager
def tokenizer_pool(worker_args: tuple, workers: int) -> Iterator[Tokenize]:
    """A function that tokenizes chunks in order: in this process for one worker, else by a pool of worker processes
    (started once, for every call) with a bounded backlog."""
    if workers == 1:
        tokenize = ChunkTokenizer(*worker_args)
        yield lambda chunks: map(tokenize, chunks)
        return
    with multiprocessing.get_context("spawn").Pool(workers, _start_worker, worker_args) as pool:

        def in_order(chunks: Iterator[Chunk]) -> Iterator[TokenizedChunk]:
            pending: deque = deque()
            for chunk in chunks:
                pending.append(pool.apply_async(_tokenize, (chunk,)))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()

        yield in_order


def tokenized(chunks: Iterator[Chunk], worker_args: tuple, workers: int) -> Iterator[TokenizedChunk]:
    """Chunks tokenized in order, by a pool of `workers` started for them."""
    with tokenizer_pool(worker_args, workers) as tokenize:
        yield from tokenize(chunks)


# --- prepare --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What decides the bytes of a prepared corpus; a resumed prepare must be run with the same ones."""

    val_fraction: float
    seed: int
    dtype: str  # auto, uint16, uint32
    shard_tokens: int


class Reporter:
    """Hears how a prepare advances. This one is silent; `RichReporter` draws a progress display."""

    def start(self, total_bytes: int, done_bytes: int) -> None: ...

    def advance(self, input_bytes: int, documents: int, tokens: int) -> None: ...

    def committed(self, split: str, shard: Shard) -> None: ...

    def stop(self) -> None: ...


class RichReporter(Reporter):
    """Documents, tokens, shards written, input bytes/s and the time left, on stderr."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        self.progress = Progress(
            TextColumn("prepare"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[documents]:,} docs  {task.fields[tokens]:,} tokens  {task.fields[shards]} shards"),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.task = self.progress.add_task("prepare", start=False, documents=0, tokens=0, shards=0)

    def start(self, total_bytes: int, done_bytes: int) -> None:
        self.progress.update(self.task, total=total_bytes, completed=done_bytes)
        self.progress.start_task(self.task)
        self.progress.start()

    def advance(self, input_bytes: int, documents: int, tokens: int) -> None:
        fields = self.progress.tasks[0].fields
        self.progress.update(
            self.task, advance=input_bytes, documents=fields["documents"] + documents, tokens=fields["tokens"] + tokens
        )

    def committed(self, split: str, shard: Shard) -> None:
        self.progress.update(self.task, shards=self.progress.tasks[0].fields["shards"] + 1)

    def stop(self) -> None:
        self.progress.stop()


@dataclass
class SplitState:
    """One split in the manifest: its durable shards, where its reading resumes, and its skip counts up to there."""

    shards: list[Shard] = field(default_factory=list)
    cursor: tuple[int, int, int] = (0, 0, 0)  # (file number, record number, tokens of that record written)
    skipped: dict[str, int] = field(default_factory=dict)
    complete: bool = False


def shown(setting: Any) -> str:
    """A setting as an error message shows it; the input list, which can be long, as a summary."""
    if isinstance(setting, list):
        return f"{len(setting)} input files of {sum(size for _, size in setting):,} bytes"
    return repr(setting)


class Manifest:
    """manifest.json: the settings and each split's state, rewritten atomically after every shard.

    Settings must match the recorded ones. Of the inputs, only the files that committed shards have read from must
    be the same (names and sizes): later ones may change, e.g. a corrupt file that stopped the prepare, fixed. It also
    keeps each file's `FileTally` for the report, since a resumed prepare does not read the files before its
    resume position again."""

    def __init__(self, output: Path, settings: dict[str, Any]) -> None:
        self.path, self.settings = output / MANIFEST, settings
        saved = read_json(self.path, {"settings": settings, "splits": {s: asdict(SplitState()) for s in SPLITS}})
        self.files = {int(number): FileTally(**tally) for number, tally in saved.get("files", {}).items()}
        self.splits = {
            split: SplitState(
                [Shard(**shard) for shard in state["shards"]],
                tuple(state["cursor"]),
                state["skipped"],
                state["complete"],
            )
            for split, state in saved["splits"].items()
        }
        states = self.splits.values()
        read = None if any(s.complete for s in states) else max(s.cursor[0] for s in states) + 1  # None: all
        changed = [key for key in settings if key != "inputs" and saved["settings"].get(key) != settings[key]]
        if saved["settings"]["inputs"][:read] != settings["inputs"][:read]:
            changed.append("inputs")
        if changed:
            differences = "; ".join(
                f"{key}: was {shown(saved['settings'].get(key))}, now {shown(settings[key])}" for key in changed
            )
            raise OrchError(
                f"{self.path}: the output folder holds a prepare made with other settings ({differences}). "
                "Run the same command as before to finish it, or choose a new --output folder."
            )

    def save(self) -> None:
        splits = {split: asdict(state) for split, state in self.splits.items()}
        files = {number: asdict(tally) for number, tally in self.files.items()}
        write_json_atomic(self.path, {"settings": self.settings, "splits": splits, "files": files})


@dataclass(frozen=True)
class Report:
    """What a prepare wrote: each split's index (documents, tokens, shards, skipped by reason), the files it read
    with what reading each found (by file number; a file read by a prepare before this version has none), and the
    files it ignored."""

    indexes: dict[str, ShardIndex]
    files: list[InputFile]
    tallies: dict[int, FileTally]
    ignored: list[Path]

    def skipped(self) -> Counter[str]:
        return sum((Counter(index.skipped) for index in self.indexes.values()), Counter())

    def documents_read(self) -> int:
        return sum(index.documents for index in self.indexes.values()) + self.skipped().total()

    def files_read(self) -> str:
        """Every file read: named with its records when a handful (a LICENSE.txt read as a document shows), else
        counted by format with the empty ones named."""
        if len(self.files) <= FILES_LISTED:
            described = (f"{file.path} ({records_found(self.tallies.get(n))})" for n, file in enumerate(self.files))
            return f"Files read: {len(self.files)}: {', '.join(described)}"
        formats = Counter(f"{file.kind}{file.compression}" for file in self.files)
        empty = [str(f.path) for n, f in enumerate(self.files) if n in self.tallies and not self.tallies[n].records]
        return (
            f"Files read: {len(self.files):,} ({', '.join(f'{count:,} {kind}' for kind, count in formats.items())})"
            + (f"; empty: {len(empty):,}: {listed(empty)}" if empty else "")
        )

    def single_document_note(self) -> str | None:
        """The .txt files read as one document of several lines: blank lines separate a .txt file's documents, so
        a corpus of one sentence per line would train, and hold out for validation, whole files."""
        found = [
            f"{file.path} ({self.tallies[n].first_lines:,} lines)"
            for n, file in enumerate(self.files)
            if self.tallies.get(n, FileTally()).one_multiline_document
        ]
        if not found:
            return None
        each = "is one document" if len(found) == 1 else "are each one document"
        return (
            f"Note: {counted(len(found), '.txt file')} {each}, with no blank line between its lines: {listed(found)}. "
            "Blank lines separate the documents of a .txt file; where every line is a document, put a blank line "
            'after each (`sed G IN.txt > OUT.txt`), or write JSON Lines (one {"text": ...} per line).'
        )

    def val_warning(self, val_fraction: float) -> str | None:
        """A val split too small for the run to validate (`jobs.evaluate` needs one pass of ranks × micro batch
        blocks; without one a run logs no val_loss, silently): a warning when empty, else a note below one pass of the
        seed recipe, which prepare, knowing no recipe, compares with."""
        ranks, micro_batch, block = SEED_EVAL_PASS
        one_pass = (
            "one evaluation pass needs ranks × train.micro_batch_size blocks of data.max_seq_len tokens, "
            f"{ranks} × {micro_batch} × {block:,} = {ranks * micro_batch * block:,} for the seed recipe on one "
            "Karolina node"
        )
        tokens = self.indexes["val"].tokens
        if not tokens:
            documents = self.indexes["train"].documents
            see_note = " (see the note on .txt files above)" if self.single_document_note() else ""
            return (
                f"Warning: the val split is empty: none of the {counted(documents, 'document')} fell into it at "
                f"--val-fraction {val_fraction:g}, so a run on this data cannot validate: it logs no val_loss or "
                f"val_perplexity; {one_pass}. Fix: more documents{see_note}, or a larger --val-fraction."
            )
        if tokens < ranks * micro_batch * block:
            return (
                f"Note: the val split holds {tokens:,} tokens; {one_pass}. A run whose val split holds less cannot "
                "validate (`orch submit --dry-run` says whether yours does); a larger --val-fraction holds out more."
            )
        return None


FILES_LISTED = 10  # files read named one by one; more are counted by format


def records_found(tally: FileTally | None) -> str:
    if tally is None:
        return "records not counted: read by an older version of orch"
    return counted(tally.records, "record") if tally.records else "empty file"


def listed(names: list[str]) -> str:
    """The first FILES_LISTED names, and how many more."""
    more = len(names) - FILES_LISTED
    return ", ".join(names[:FILES_LISTED]) + (f" and {more:,} more" if more > 0 else "")


def pending(part: Part, file_no: int, cursor: tuple[int, int, int]) -> tuple[Part, int]:
    """What of a part lies past a split's resume cursor, and how many tokens of its first document are written."""
    cursor_file, cursor_record, written = cursor
    if file_no > cursor_file:
        return part, 0
    after = part.records >= cursor_record if file_no == cursor_file else np.zeros(len(part.records), dtype=bool)
    records, lengths = part.records[after], part.lengths[after]
    tokens = part.tokens[np.repeat(after, part.lengths)]
    skipped = [(n, reason) for n, reason in part.skipped if file_no == cursor_file and n >= cursor_record]
    if not (len(records) and records[0] == cursor_record and written):
        return Part(records, lengths, tokens, skipped), 0
    if lengths[0] == written:
        return Part(records[1:], lengths[1:], tokens[written:], skipped), 0
    return Part(records, np.concatenate([[lengths[0] - written], lengths[1:]]), tokens[written:], skipped), written


def chunks_from(
    files: list[InputFile], start: tuple[int, int], chunk_bytes: int, tallies: dict[int, FileTally]
) -> Iterator[Chunk]:
    """Chunks of all files from (file number, record number) `start` on, each file read tallied into `tallies` (the
    manifest keeps those of the files before `start`, which a resumed prepare does not read again)."""
    for file_no in range(start[0], len(files)):
        tallies[file_no] = FileTally()
        first = start[1] if file_no == start[0] else 0
        yield from read_chunks(files[file_no], file_no, first, chunk_bytes, tallies[file_no])


def copy_tokenizer(source: Path, output: Path) -> None:
    """Keep the tokenizer's files beside the shards, so a prepared folder says how to decode it."""
    target = output / "tokenizer"
    if target.resolve() == source.resolve():
        return
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name.startswith(("tokenizer", "special_tokens_map", "added_tokens")):
            shutil.copy2(path, target / path.name)


def prepare(
    tokenizer_dir: Path,
    inputs: list[Path],
    output: Path,
    settings: Settings,
    workers: int = 1,
    reporter: Reporter | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Report:
    """Tokenize the inputs into `output/train` and `output/val`, continuing an interrupted prepare of `output`."""
    if not 0 <= settings.val_fraction < 1:
        raise OrchError(f"--val-fraction {settings.val_fraction}: not a fraction of documents. Allowed: 0 <= f < 1.")
    reporter = reporter or Reporter()
    tokenizer = read_tokenizer_files(tokenizer_dir)
    dtype = token_dtype(tokenizer.vocab_size, settings.dtype)
    files, ignored = list_inputs(inputs)
    fresh = FreshPaths(output)
    output.mkdir(parents=True, exist_ok=True)
    recorded = {**asdict(settings), "dtype": dtype, "tokenizer_sha256": tokenizer.sha256}
    manifest = Manifest(output, {**recorded, "inputs": [[f.key, f.size] for f in files]})
    copy_tokenizer(tokenizer.path, output)
    todo = [split for split in SPLITS if not manifest.splits[split].complete]
    if todo:
        header = {
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "tokenizer": {"path": str(tokenizer.path), "sha256": tokenizer.sha256},
        }
        writers = {s: ShardWriter(output / s, dtype, settings.shard_tokens, manifest.splits[s].shards) for s in todo}
        start = min(manifest.splits[split].cursor[:2] for split in todo)
        worker_args = (tokenizer.json, tokenizer.eos_id, dtype, settings.seed, settings.val_fraction)
        reporter.start(sum(f.size for f in files), sum(f.size for f in files[: start[0]]))
        try:
            chunks = tokenized(chunks_from(files, start, chunk_bytes, manifest.files), worker_args, workers)
            skipped = consume(chunks, manifest, writers, reporter)
        finally:
            reporter.stop()
        refusal = empty_result(inputs, settings, files, ignored, writers, skipped, output)
        if refusal:
            raise OrchError(f"{refusal[0]} {fresh.remove()} {refusal[1]}")
        for split, writer in writers.items():
            writer.finish({**header, "split": split, "skipped": skipped[split]})
            manifest.splits[split] = SplitState(writer.shards, manifest.splits[split].cursor, skipped[split], True)
            manifest.save()
    return Report({split: read_index(output / split) for split in SPLITS}, files, manifest.files, ignored)


def counted(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def reading_counts(files: int, ignored: int, documents: int, skipped: Counter[str]) -> str:
    """What a data tool read, as a refusal states it: files, records, those skipped by reason, those usable."""
    reasons = ", ".join(f"{reason}: {count:,}" for reason, count in skipped.most_common()) or "none"
    ignored_files = f" ({counted(ignored, 'other file')} ignored: not a supported format)" if ignored else ""
    return (
        f"Read {counted(files, 'input file')}{ignored_files} and {counted(documents + skipped.total(), 'record')}; "
        f"skipped {skipped.total():,} ({reasons}); usable documents: {documents:,}"
    )


NO_DOCUMENT = (
    "Allowed: input with at least one record that is a document (a .txt block, a .jsonl line's 'text' field or a "
    "table's 'text' value that is not only whitespace)."
)


def empty_result(
    inputs: list[Path],
    settings: Settings,
    files: list[InputFile],
    ignored: list[Path],
    writers: dict[str, ShardWriter],
    skipped: dict[str, dict[str, int]],
    output: Path,
) -> tuple[str, str] | None:
    """Why the prepared corpus would be useless (no documents, no tokens, an empty train split) and what is allowed,
    or None."""
    documents, tokens = Counter(), Counter()
    for split in SPLITS:
        if split in writers:
            shards, writer = writers[split].shards, writers[split]
            documents[split] = sum(s.documents for s in shards) + writer.documents
            tokens[split] = sum(s.tokens for s in shards) + writer.filled
        else:
            index = read_index(output / split)
            documents[split], tokens[split] = index.documents, index.tokens
    reasons = sum((Counter(counts) for counts in skipped.values()), Counter())
    counts = f"{reading_counts(len(files), len(ignored), documents.total(), reasons)}; tokens: {tokens.total():,}."
    if not documents.total() or not tokens.total():
        inputs_named = ", ".join(map(str, inputs))
        return f"--input {inputs_named}: nothing to prepare, no document holds text. {counts}", NO_DOCUMENT
    if not documents["train"] or not tokens["train"]:
        return (
            f"--val-fraction {settings.val_fraction}: the train split would be empty, all "
            f"{counted(documents['val'], 'document')} fall into val with --seed {settings.seed}. {counts}",
            "Allowed: a smaller --val-fraction, or more documents.",
        )
    return None


class FreshPaths:
    """What a prepare may add to its output folder, noted before it starts so that a refused prepare can take its
    additions away: the whole folder (and the parents made for it) when it is new, else the entries and the files
    in them that were not there. A folder holding an unfinished prepare (a manifest) is kept as it is."""

    ENTRIES = (MANIFEST, "tokenizer", *SPLITS)

    def __init__(self, output: Path) -> None:
        self.output, self.existed = output, output.exists()
        self.parents = [] if self.existed else [p for p in output.parents if not p.exists()]
        self.resumed = (output / MANIFEST).exists()
        self.before = set(self.listing()) if self.existed and not self.resumed else set()

    def listing(self) -> Iterator[Path]:
        for name in self.ENTRIES:
            path = self.output / name
            if path.exists():
                yield path
            if path.is_dir():
                yield from path.iterdir()

    def remove(self) -> str:
        """Remove them; returns a sentence saying what the output folder is left as."""
        if not self.existed:
            shutil.rmtree(self.output, ignore_errors=True)
            for parent in self.parents:
                try:
                    parent.rmdir()
                except OSError:
                    break
            return f"--output {self.output} was not created."
        if self.resumed:
            return f"--output {self.output} keeps the unfinished prepare it held; no split index was written."
        for path in sorted(set(self.listing()) - self.before, key=lambda p: len(p.parts), reverse=True):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return f"--output {self.output} is left as it was."


def consume(
    chunks: Iterator[TokenizedChunk], manifest: Manifest, writers: dict[str, ShardWriter], reporter: Reporter
) -> dict[str, dict[str, int]]:
    """Write each split's share of every chunk past its resume cursor, recording every completed shard in the
    manifest; returns each split's skip counts over the whole input."""
    resume = {split: manifest.splits[split].cursor for split in writers}
    skipped = {split: Counter(manifest.splits[split].skipped) for split in writers}
    for chunk in chunks:
        documents = tokens = 0
        for split, writer in writers.items():
            state = manifest.splits[split]
            part, written = pending(chunk.parts[split], chunk.file_no, resume[split])
            for commit in writer.add(part.tokens, part.lengths):
                record = int(part.records[commit.document])
                state.shards.append(commit.shard)
                state.cursor = (chunk.file_no, record, commit.written + (written if commit.document == 0 else 0))
                state.skipped = dict(skipped[split] + Counter(reason for n, reason in part.skipped if n < record))
                manifest.save()
                reporter.committed(split, commit.shard)
            skipped[split].update(reason for _, reason in part.skipped)
            documents, tokens = documents + len(part.records), tokens + len(part.tokens)
        reporter.advance(chunk.input_bytes, documents, tokens)
    return {split: dict(counts) for split, counts in skipped.items()}
