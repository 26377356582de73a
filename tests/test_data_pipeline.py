"""The Concat data pipeline on real files: tokenizer, prepare (formats, bad input, resume), shards, training order."""

from __future__ import annotations

import gzip
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer

from jobs.data import BlockLoader, GlobalOrder, load_blocks, load_val_blocks, pack
from jobs.shards import TokenBlocks
from orchestrator.core.config import DataSpec
from orchestrator.core.errors import OrchError
from orchestrator.core.loading import load_recipe
from orchestrator.core.plan import Batching
from orchestrator.core.preflight import check_data
from orchestrator.tools.prepare import (
    BYTE_TOKENS,
    EMPTY_FILE,
    EMPTY_TEXT,
    INVALID_UTF8,
    MALFORMED_JSON,
    MISSING_TEXT,
    NOT_A_STRING,
    SLICE_CHARS,
    SPECIAL_TOKENS,
    ChunkTokenizer,
    Settings,
    cuts_at_spaces,
    prepare,
    slices,
    train_tokenizer,
)
from orchestrator.tools.run_data import attach_data, data_ready, demo_corpus
from tests.conftest import ROOT

WORDS = "pes kočka žluťoučký kůň úpěl ďábelské ódy Praha řeka čte knihu 2024 ěščřžýáíé, a. (b) Ä".split()


def documents(n: int, seed: int = 0, lines: int = 1) -> list[str]:
    """Unique Czech-like documents; with lines > 1 some span several lines (as .txt blocks do)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        body = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, lines))]
        docs.append(f"d{seed}-{i}: " + "\n".join(body))
    return docs


def write_jsonl(path: Path, docs: list[str], opener=open) -> Path:
    with opener(path, "wb") as f:
        f.write(
            "".join(json.dumps({"text": d, "id": i}, ensure_ascii=False) + "\n" for i, d in enumerate(docs)).encode()
        )
    return path


def settings(val_fraction: float = 0.2, shard_tokens: int = 97, dtype: str = "auto") -> Settings:
    return Settings(val_fraction=val_fraction, seed=0, dtype=dtype, shard_tokens=shard_tokens)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(documents(300, seed=99, lines=3), 400, folder / "tokenizer")
    return folder / "tokenizer"


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def split_stream(folder: Path) -> np.ndarray:
    index = json.loads((folder / "index.json").read_text())
    return np.concatenate(
        [np.fromfile(folder / s["file"], dtype=index["dtype"]) for s in index["shards"]] or [np.array([], "u2")]
    )


def decoded_documents(folder: Path, hf_tokenizer) -> list[str]:
    """The split's stream cut after every EOS, each piece decoded without its EOS."""
    stream = split_stream(folder)
    assert len(stream) == 0 or stream[-1] == hf_tokenizer.eos_token_id  # every document ends with EOS
    pieces = np.split(stream, np.flatnonzero(stream == hf_tokenizer.eos_token_id) + 1)[:-1]
    return [hf_tokenizer.decode(piece[:-1].tolist()) for piece in pieces]


def assert_split_by_document(docs: list[str], train: list[str], val: list[str]) -> None:
    """train and val are complementary subsequences of the (unique) input documents, in input order."""
    in_train = set(train)
    assert train == [d for d in docs if d in in_train]
    assert val == [d for d in docs if d not in in_train]
    assert train and val


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- tokenizer ------------------------------------------------------------------------------------------------------


def test_tokenizer_is_a_llama_style_byte_fallback_bpe_that_autotokenizer_loads(tokenizer_dir: Path, hf_tokenizer):
    assert (hf_tokenizer.unk_token, hf_tokenizer.bos_token, hf_tokenizer.eos_token) == SPECIAL_TOKENS
    assert [hf_tokenizer.convert_tokens_to_ids(t) for t in (*SPECIAL_TOKENS, *BYTE_TOKENS)] == list(range(259))
    assert len(hf_tokenizer) <= 400
    unseen = "Žluťoučký kůň 你好 🙂\tkonec"  # characters never seen in training are spelled with byte tokens
    ids = hf_tokenizer(unseen, add_special_tokens=False)["input_ids"]
    assert hf_tokenizer.unk_token_id not in ids
    assert {"<0xE4>", "<0xBD>", "<0xA0>"} <= set(hf_tokenizer.convert_ids_to_tokens(ids))  # 你 as UTF-8 bytes
    assert hf_tokenizer.convert_ids_to_tokens(hf_tokenizer("Praha řeka")["input_ids"])[0].startswith("▁")
    assert hf_tokenizer.decode(ids) == unseen


def test_tokenizer_refuses_a_vocabulary_without_room_for_learned_tokens(tmp_path: Path):
    with pytest.raises(OrchError, match="--vocab-size 259 leaves no room"):
        train_tokenizer(["abc"], 259, tmp_path / "tok")


# --- prepare: round trip, formats -----------------------------------------------------------------------------------


def test_decoded_shards_equal_the_input_documents_each_followed_by_eos(tmp_path: Path, tokenizer_dir, hf_tokenizer):
    docs = documents(200, lines=3) + ["literal </s> and <s> stay text </s>"]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", docs[:120])
    (corpus / "b.txt").write_text("\n\n\n".join(docs[120:]) + "\n")
    report = prepare(tokenizer_dir, [corpus], tmp_path / "out", settings(), chunk_bytes=500)

    train = decoded_documents(tmp_path / "out/train", hf_tokenizer)
    val = decoded_documents(tmp_path / "out/val", hf_tokenizer)
    assert_split_by_document(docs, train, val)
    for split, decoded in (("train", train), ("val", val)):
        index = report.indexes[split]
        assert index.documents == len(decoded) and sum(s.documents for s in index.shards) == len(decoded)
        assert index.tokens == sum(s.tokens for s in index.shards) == len(split_stream(tmp_path / "out" / split))
        assert all(s.tokens == 97 for s in index.shards[:-1]) and len(index.shards) > 2
        ids = hf_tokenizer(decoded, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        expected = [t for doc in ids for t in (*doc, 2)]
        assert split_stream(tmp_path / "out" / split).tolist() == expected  # AutoTokenizer ids, EOS after each
    assert report.documents_read() == len(docs) and not report.skipped()


def test_a_folder_of_every_format_prepares_every_document(tmp_path: Path, tokenizer_dir, hf_tokenizer):
    docs = documents(300, lines=2)
    corpus = tmp_path / "corpus"
    (corpus / "nested/deeper").mkdir(parents=True)
    (corpus / "a.txt").write_text("\n\n".join(docs[0:50]))
    write_jsonl(corpus / "b.jsonl", docs[50:100])
    write_jsonl(corpus / "nested/c.jsonl.gz", docs[100:150], gzip.open)
    write_jsonl(corpus / "nested/deeper/d.jsonl.zst", docs[150:200], zstandard.open)
    pq.write_table(pa.table({"text": docs[200:250]}), corpus / "nested/e.parquet", row_group_size=7)
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": docs[250:300]}).save_to_disk(str(corpus / "z_saved"), max_shard_size="2KB")
    (corpus / "README.md").write_text("not a corpus file")

    report = prepare(tokenizer_dir, [corpus], tmp_path / "out", settings())
    train = decoded_documents(tmp_path / "out/train", hf_tokenizer)
    val = decoded_documents(tmp_path / "out/val", hf_tokenizer)
    assert_split_by_document(docs, train, val)
    assert report.ignored == [corpus / "README.md"]
    assert len(list((corpus / "z_saved").glob("*.arrow"))) > 1  # the dataset's rows come from several files


def test_prepare_refuses_a_token_width_too_narrow_for_the_vocabulary_and_auto_widens(tmp_path: Path):
    chars = sorted(set("".join(documents(20))) | {"▁"})
    pieces = [*SPECIAL_TOKENS, *BYTE_TOKENS, *chars]
    pieces += [f"filler{i}" for i in range(70_000 - len(pieces))]
    big = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, [], unk_token="<unk>", byte_fallback=True))
    (tmp_path / "big").mkdir()
    big.save(str(tmp_path / "big/tokenizer.json"))
    (tmp_path / "big/tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    corpus = write_jsonl(tmp_path / "c.jsonl", documents(20))

    with pytest.raises(OrchError, match=r"--dtype uint16 holds token ids up to 65535, but the tokenizer has 70000"):
        prepare(tmp_path / "big", [corpus], tmp_path / "narrow", settings(dtype="uint16"))
    report = prepare(tmp_path / "big", [corpus], tmp_path / "wide", settings(dtype="auto"))
    assert report.indexes["train"].dtype == "uint32"
    shard = report.indexes["train"].shards[0]
    assert (tmp_path / "wide/train" / shard.file).stat().st_size == 4 * shard.tokens


# --- prepare: bad input ---------------------------------------------------------------------------------------------


def test_every_unusable_record_is_counted_by_reason(tmp_path: Path, tokenizer_dir, hf_tokenizer):
    good = documents(6)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "empty.jsonl").write_bytes(b"")
    (corpus / "blank.txt").write_text("\n  \n\n")
    lines = [
        json.dumps({"text": good[0]}).encode(),
        b'{"text": "bad \xff byte"}',
        b'{"text": "lone \\ud800 surrogate"}',
        b'{"text": "unterminated',
        b"",
        json.dumps({"content": "no text field"}).encode(),
        json.dumps({"text": None}).encode(),
        json.dumps(["not", "an", "object"]).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": " \n\t "}).encode(),
        json.dumps({"text": good[1]}).encode(),
    ]
    (corpus / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (corpus / "notes.txt").write_bytes(good[2].encode() + b"\n\nbroken \xc3\x28 block\n\n" + good[3].encode() + b"\n")
    pq.write_table(pa.table({"text": [good[4], None, good[5]]}), corpus / "rows.parquet")

    report = prepare(tokenizer_dir, [corpus], tmp_path / "out", settings(val_fraction=0.0))
    assert report.skipped() == {
        EMPTY_FILE: 2,
        INVALID_UTF8: 3,
        MALFORMED_JSON: 2,
        MISSING_TEXT: 4,
        NOT_A_STRING: 1,
        EMPTY_TEXT: 1,
    }
    assert decoded_documents(tmp_path / "out/train", hf_tokenizer) == good
    assert report.documents_read() == 6 + 13


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("broken.jsonl.gz", b"\x1f\x8b\x08\x00 definitely not gzip", "broken.jsonl.gz: cannot be read as jsonl.gz"),
        ("broken.jsonl.zst", b"not zstd at all", "broken.jsonl.zst: cannot be read as jsonl.zst"),
        ("broken.parquet", b"PAR1 not parquet", "broken.parquet: cannot be read as parquet"),
    ],
)
def test_a_file_that_cannot_be_read_stops_the_prepare_naming_it(tmp_path, tokenizer_dir, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(OrchError, match=message):
        prepare(tokenizer_dir, [tmp_path / name], tmp_path / "out", settings())


def test_a_table_without_a_text_column_is_refused_naming_file_and_columns(tmp_path: Path, tokenizer_dir):
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), tmp_path / "t.parquet")
    with pytest.raises(OrchError, match=r"t.parquet: has no 'text' column \(columns: body, id\)"):
        prepare(tokenizer_dir, [tmp_path / "t.parquet"], tmp_path / "out", settings())


def test_inputs_that_are_missing_or_of_an_unknown_type_are_refused(tmp_path: Path, tokenizer_dir):
    (tmp_path / "doc.pdf").write_bytes(b"%PDF")
    with pytest.raises(OrchError, match="--input .*nothing: no such file or folder"):
        prepare(tokenizer_dir, [tmp_path / "nothing"], tmp_path / "out", settings())
    with pytest.raises(OrchError, match="doc.pdf: not a supported input"):
        prepare(tokenizer_dir, [tmp_path / "doc.pdf"], tmp_path / "out", settings())
    (tmp_path / "empty").mkdir()
    with pytest.raises(OrchError, match="no input files found"):
        prepare(tokenizer_dir, [tmp_path / "empty"], tmp_path / "out", settings())


# --- prepare: nothing to prepare -------------------------------------------------------------------------------------


def test_an_empty_train_split_is_refused_and_the_new_output_folder_is_removed(tmp_path: Path, tokenizer_dir):
    write_jsonl(tmp_path / "few.jsonl", documents(3))
    output = tmp_path / "new" / "parent" / "out"
    with pytest.raises(OrchError) as refused:
        prepare(tokenizer_dir, [tmp_path / "few.jsonl"], output, settings(val_fraction=0.99))
    assert str(refused.value).startswith(
        "--val-fraction 0.99: the train split would be empty, all 3 documents fall into val with --seed 0. "
        "Read 1 input file and 3 records; skipped 0 (none); usable documents: 3; tokens: "
    )
    assert str(refused.value).endswith(
        f"--output {output} was not created. Allowed: a smaller --val-fraction, or more documents."
    )
    assert not (tmp_path / "new").exists()


def test_a_refused_prepare_leaves_an_existing_output_folder_as_it_was(tmp_path: Path, tokenizer_dir):
    (tmp_path / "bad.jsonl").write_text('{"text": "  "}\n{"no": "text"}\n')
    output = tmp_path / "out"
    (output / "train").mkdir(parents=True)
    (output / "notes.txt").write_text("kept")
    before = sorted(output.rglob("*")), tree(output)
    with pytest.raises(
        OrchError, match=r"nothing to prepare, no document holds text\. Read 1 input file and 2 records"
    ):
        prepare(tokenizer_dir, [tmp_path / "bad.jsonl"], output, settings(shard_tokens=1))
    assert (sorted(output.rglob("*")), tree(output)) == before


# --- prepare: long documents ----------------------------------------------------------------------------------------


def long_text(seed: int, words: int) -> str:
    """Words, runs of spaces and of other whitespace, characters spelled with byte tokens, literal special tokens."""
    rng = random.Random(seed)
    pieces = [*WORDS, "", " ", "\n", "\t", "\n\n", "漢字", "🙂", "</s>", "<s>x"]
    return " ".join(rng.choice(pieces) for _ in range(words))


def test_a_long_document_tokenized_in_slices_cut_before_spaces_has_the_ids_of_the_whole(tokenizer_dir: Path):
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.encode_special_tokens = True
    texts = [
        long_text(1, 40_000) + " " + "ž" * (SLICE_CHARS + 10) + " konec",  # a stretch without a space to cut at
        "  " + long_text(2, 30_000) + "  ",  # starts and ends with spaces
        "krátký dokument",
    ]
    pieces = list(slices(texts[0], SLICE_CHARS))
    assert len(pieces) > 4 and "".join(pieces) == texts[0]
    assert all(piece.startswith(" ") for piece in pieces[1:])
    assert max(map(len, pieces)) > SLICE_CHARS  # the stretch without a space stays whole
    whole = [tokenizer.encode(text, add_special_tokens=False).ids for text in texts]
    assert [id for piece in pieces for id in tokenizer.encode(piece, add_special_tokens=False).ids] == whole[0]

    worker = ChunkTokenizer(tokenizer.to_str(), 2, "uint16", 0, 0.0)
    assert worker.sliceable
    tokens, lengths = worker.encode(texts)
    assert lengths.tolist() == [len(ids) + 1 for ids in whole]
    assert tokens.tolist() == [id for ids in whole for id in [*ids, 2]]


def test_only_tokenizers_that_split_before_every_space_are_tokenized_in_slices(tokenizer_dir: Path):
    def ours() -> Tokenizer:
        return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))

    assert cuts_at_spaces(ours())
    llama_like = ours()  # SentencePiece converted: spaces replaced by a normalizer, BPE over the whole text
    llama_like.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    llama_like.pre_tokenizer = None
    assert not cuts_at_spaces(llama_like)
    unsplit = ours()
    unsplit.pre_tokenizer = pre_tokenizers.Metaspace(split=False)
    assert not cuts_at_spaces(unsplit)
    byte_level = ours()
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel()
    assert not cuts_at_spaces(byte_level)
    with_added = ours()
    with_added.add_tokens(["dva slova"])
    assert not cuts_at_spaces(with_added)


def test_a_long_document_is_prepared_and_decodes_to_itself(tmp_path: Path, tokenizer_dir, hf_tokenizer):
    docs = [documents(1)[0], long_text(3, 3 * SLICE_CHARS // 5).replace("</s>", "").replace("<s>", ""), "ahoj"]
    write_jsonl(tmp_path / "long.jsonl", docs)
    report = prepare(tokenizer_dir, [tmp_path / "long.jsonl"], tmp_path / "out", settings(0.0, shard_tokens=1 << 20))
    assert report.indexes["train"].documents == 3
    assert decoded_documents(tmp_path / "out/train", hf_tokenizer) == docs


# --- prepare: resume ------------------------------------------------------------------------------------------------

KILLED_PREPARE = """
import os, signal, sys
from pathlib import Path
from orchestrator.tools.prepare import Reporter, Settings, prepare

class DieAfterShards(Reporter):
    def __init__(self, shards):
        self.left = shards
    def committed(self, split, shard):
        self.left -= 1
        if self.left == 0:
            os.kill(os.getpid(), signal.SIGKILL)

tokenizer, corpus, output, shards = sys.argv[1:]
settings = Settings(0.2, 0, "auto", 97)
prepare(Path(tokenizer), [Path(corpus)], Path(output), settings, 1, DieAfterShards(int(shards)), chunk_bytes=700)
"""


@pytest.fixture(scope="module")
def resume_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = tmp_path_factory.mktemp("resume") / "corpus"
    corpus.mkdir()
    for i in range(3):
        docs = documents(60, seed=i, lines=4)
        docs[7] = '{"text": broken json'
        (corpus / f"part{i}.jsonl").write_text(
            "\n".join(d if d.startswith("{") else json.dumps({"text": d}, ensure_ascii=False) for d in docs) + "\n"
        )
    (corpus / "part3.txt").write_text("\n\n".join(documents(40, seed=3, lines=3)))
    return corpus


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, resume_corpus: Path) -> Path:
    output = tmp_path_factory.mktemp("whole") / "out"
    prepare(tokenizer_dir, [resume_corpus], output, settings(), workers=2)  # other workers and chunks, same bytes
    return output


@pytest.mark.parametrize("after_shards", [1, 9, 23])
def test_an_interrupted_prepare_run_again_writes_exactly_what_an_uninterrupted_one_does(
    tmp_path: Path, tokenizer_dir: Path, resume_corpus: Path, uninterrupted: Path, after_shards: int
):
    output = tmp_path / "out"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_PREPARE, str(tokenizer_dir), str(resume_corpus), str(output), str(after_shards)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    manifest = json.loads((output / "manifest.json").read_text())
    assert sum(len(s["shards"]) for s in manifest["splits"].values()) == after_shards
    assert not (output / "train/index.json").exists()

    report = prepare(tokenizer_dir, [resume_corpus], output, settings(), chunk_bytes=300)
    assert tree(output) == tree(uninterrupted)
    assert report.skipped() == {MALFORMED_JSON: 3}


def test_files_not_read_yet_may_change_before_a_resume_but_files_already_read_may_not(
    tmp_path: Path, tokenizer_dir: Path, resume_corpus: Path
):
    corpus = tmp_path / "corpus"
    shutil.copytree(resume_corpus, corpus)
    output = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILLED_PREPARE, str(tokenizer_dir), str(corpus), str(output), "1"])
    assert killed.returncode == -signal.SIGKILL
    with (corpus / "part0.jsonl").open("a") as part0:  # read by the committed shard
        part0.write(json.dumps({"text": "late addition"}) + "\n")
    with pytest.raises(OrchError, match=r"inputs: was 4 input files of [\d,]+ bytes, now 4 input files of"):
        prepare(tokenizer_dir, [corpus], output, settings())

    shutil.copy(resume_corpus / "part0.jsonl", corpus / "part0.jsonl")
    (corpus / "part3.txt").write_text("the last file, fixed\n")
    write_jsonl(corpus / "part4.jsonl", documents(30, seed=4))
    resumed = prepare(tokenizer_dir, [corpus], output, settings())
    whole = prepare(tokenizer_dir, [corpus], tmp_path / "whole", settings())
    assert tree(output / "train") == tree(tmp_path / "whole/train") and resumed.indexes == whole.indexes


def test_a_finished_prepare_run_again_changes_nothing_and_other_settings_are_refused(
    tmp_path: Path, tokenizer_dir: Path, resume_corpus: Path, uninterrupted: Path
):
    before = tree(uninterrupted)
    report = prepare(tokenizer_dir, [resume_corpus], uninterrupted, settings())
    assert tree(uninterrupted) == before and report.indexes["train"].tokens > 0
    with pytest.raises(OrchError, match=r"manifest.json: .* other settings \(val_fraction: was 0.2, now 0.3\)"):
        prepare(tokenizer_dir, [resume_corpus], uninterrupted, settings(val_fraction=0.3))
    extra = write_jsonl(tmp_path / "extra.jsonl", documents(3))
    with pytest.raises(OrchError, match=r"inputs: was 4 input files of [\d,]+ bytes, now 5 input files of"):
        prepare(tokenizer_dir, [resume_corpus, extra], uninterrupted, settings())


# --- reading: blocks, order -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("prepared")
    write_jsonl(folder / "c.jsonl", documents(400, lines=2))
    prepare(tokenizer_dir, [folder / "c.jsonl"], folder / "out", settings(val_fraction=0.1, shard_tokens=101))
    return folder / "out"


def test_blocks_are_the_packed_stream_across_shard_boundaries_with_the_partial_tail_dropped(prepared: Path):
    stream = split_stream(prepared / "train")
    eos_after = np.flatnonzero(stream == 2)
    docs = [piece[:-1].tolist() for piece in np.split(stream, eos_after + 1)[:-1]]
    blocks = TokenBlocks(prepared / "train", 16)
    expected, dropped = pack(docs, eos_id=2, block_len=16)
    assert len(blocks) == len(expected) == len(stream) // 16 and dropped == len(stream) % 16
    assert np.array_equal(blocks[np.arange(len(blocks))], expected)
    assert np.array_equal(blocks[np.array([len(blocks) - 1, 6, 6])], expected[[len(blocks) - 1, 6, 6]])
    assert blocks[3].tolist() == expected[3].tolist()
    with pytest.raises(IndexError):
        blocks[np.array([len(blocks)])]


def test_a_split_of_more_shards_than_the_open_file_limit_reads_every_block(tmp_path: Path, tokenizer_dir: Path):
    write_jsonl(tmp_path / "c.jsonl", documents(200))
    prepare(tokenizer_dir, [tmp_path / "c.jsonl"], tmp_path / "out", settings(val_fraction=0.1, shard_tokens=7))
    split = tmp_path / "out" / "train"
    shards = len(json.loads((split / "index.json").read_text())["shards"])
    stream = split_stream(split)
    expected = stream[: len(stream) // 16 * 16].reshape(-1, 16)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = len(os.listdir("/proc/self/fd")) + 80  # fewer descriptors than the split has shards
    assert shards > limit, "the fixture must have more shards than the lowered limit"
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        fresh = TokenBlocks(split, 16)
        assert np.array_equal(fresh[np.arange(len(fresh))], expected)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_opening_a_split_checks_shard_sizes_and_verify_checks_checksums(tmp_path: Path, prepared: Path):
    damaged = tmp_path / "damaged"
    shutil.copytree(prepared, damaged)
    shard = damaged / "train/shard_00001.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(OrchError, match="shard_00001.bin: sha256 differs"):
        TokenBlocks(damaged / "train", 16).verify_checksums()
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(OrchError, match="shard_00001.bin has 200 bytes, .* lists 101 tokens"):
        TokenBlocks(damaged / "train", 16)


def rank_rows(blocks: TokenBlocks, world: int, step: int, global_batch: int = 8, micro: int = 2) -> list[np.ndarray]:
    """Every (global sample, rows) a step's ranks load through BlockLoader, in global sample order."""
    order = GlobalOrder(len(blocks), Batching.of(global_batch, micro, world), seed=5)
    loaders = [BlockLoader(blocks, order, rank, torch.device("cpu")) for rank in range(world)]
    served = {}
    for micro_step in range(global_batch // (micro * world)):
        for rank, loader in enumerate(loaders):
            first = step * global_batch + (micro_step * world + rank) * micro
            for i, row in enumerate(loader.micro_batch(step, micro_step).numpy()):
                served[first + i] = (rank, row)
    return [served[g] for g in sorted(served)]


def test_two_ranks_read_disjoint_blocks_that_cover_an_epoch_once(prepared: Path):
    blocks = TokenBlocks(prepared / "train", 16)
    epoch = [served for step in range(-(-len(blocks) // 8)) for served in rank_rows(blocks, 2, step)][: len(blocks)]
    index_of = {blocks[i].tobytes(): i for i in range(len(blocks))}
    assert len(index_of) == len(blocks)  # blocks are distinct, so a row names its block
    seen = {rank: [index_of[row.astype(blocks.dtype).tobytes()] for r, row in epoch if r == rank] for rank in (0, 1)}
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(len(blocks)))


def test_the_global_samples_of_each_step_do_not_depend_on_the_world_size(prepared: Path):
    blocks = TokenBlocks(prepared / "train", 16)
    for step in range(1, 2 * len(blocks) // 8 + 2):  # crosses epoch boundaries
        one = [row for _, row in rank_rows(blocks, 1, step)]
        two = [row for _, row in rank_rows(blocks, 2, step)]
        assert np.array_equal(np.stack(one), np.stack(two))


# --- the training job's data ----------------------------------------------------------------------------------------


def test_a_prepared_source_is_read_in_place_by_the_training_job(tmp_path: Path, prepared: Path):
    spec = DataSpec(source=str(prepared), tokenizer=str(prepared / "tokenizer"), max_seq_len=16)
    data_dir = tmp_path / "run/data"
    assert not data_ready(data_dir)
    attach_data(spec, vocab_size=400, seed=0, data_dir=data_dir)
    assert data_ready(data_dir) and sorted(p.name for p in data_dir.iterdir()) == ["tokenizer", "tokens.json"]
    assert (data_dir / "tokenizer/tokenizer.json").read_bytes() == (prepared / "tokenizer/tokenizer.json").read_bytes()
    assert np.array_equal(load_blocks(data_dir)[np.arange(4)], TokenBlocks(prepared / "train", 16)[np.arange(4)])
    assert len(load_val_blocks(data_dir)[""]) == TokenBlocks(prepared / "val", 16).tokens // 16 > 0


def test_submission_refuses_prepared_data_that_does_not_fit_the_recipe(tmp_path: Path, prepared: Path):
    _, tiny = load_recipe("tiny")
    data = {"source": str(prepared), "tokenizer": str(prepared / "tokenizer"), "max_seq_len": 16}
    fits = tiny.model_copy(
        update={"data": DataSpec(**data), "model": tiny.model.model_copy(update={"vocab_size": 400})}
    )
    check_data(fits, Path("r.yaml"))
    small_vocab = fits.model_copy(update={"model": tiny.model.model_copy(update={"vocab_size": 300})})
    with pytest.raises(OrchError, match=r"'model.vocab_size' is 300, .* Allowed: at least"):
        check_data(small_vocab, Path("r.yaml"))
    other_tokenizer = fits.model_copy(update={"data": DataSpec(**{**data, "tokenizer": str(tmp_path)})})
    with pytest.raises(OrchError, match=r"field 'data.tokenizer' .* is not the tokenizer .* was prepared with"):
        check_data(other_tokenizer, Path("r.yaml"))
    one_block_too_long = fits.model_copy(update={"data": DataSpec(**{**data, "max_seq_len": 10**7})})
    with pytest.raises(OrchError, match=r"fewer than one block of data.max_seq_len 10000000"):
        check_data(one_block_too_long, Path("r.yaml"))
    raw = fits.model_copy(update={"data": DataSpec(**{**data, "source": str(tmp_path)})})
    with pytest.raises(OrchError, match=r"holds no prepared token shards .* `orch data prepare"):
        check_data(raw, Path("r.yaml"))


def test_the_demo_goes_through_the_same_prepare_into_the_run_data_folder(tmp_path: Path):
    data_dir = tmp_path / "data"
    attach_data(DataSpec(source="demo", tokenizer="demo", max_seq_len=32), vocab_size=300, seed=0, data_dir=data_dir)
    train, val = load_blocks(data_dir), load_val_blocks(data_dir)[""]
    assert train.index.vocab_size <= 300 and train.block_len == 32 and len(train) > 10 * len(val) > 0
    demo_tokenizer = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    decoded = decoded_documents(data_dir / "train", demo_tokenizer) + decoded_documents(
        data_dir / "val", demo_tokenizer
    )
    assert sorted(decoded) == sorted(demo_corpus(0))
