"""Vocabulary swap: a trained model made to speak a new tokenizer.

The transformer blocks are copied unchanged. Each row of the new input embedding and output head is built
from the source model's rows by the first rule that applies to its target token:

    special         target bos/eos take the source's bos/eos rows, other special tokens the source's unk (else eos)
    dictionary      a pair from the bilingual dictionary file names the source token
    exact           the source has the same vocabulary string, meaning the same bytes
    normalised      the source has a token for the same bytes once the spelling conventions are undone:
                    SentencePiece `▁` and GPT-2 byte-level `Ġ` are a space, `<0xNN>` byte-fallback pieces and
                    byte-level characters are bytes
    mean-of-pieces  the mean of the rows of the pieces the source tokenizer splits the token's text into
    fallback        the mean of all source rows (a special token without a source counterpart, or text the
                    source cannot spell)

The first four copy one source row: the token is aligned.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.core.errors import OrchError

if TYPE_CHECKING:  # torch and transformers are imported where they are used: the CLI imports this module lazily
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

COPYING_RULES = ("special", "dictionary", "exact", "normalised")
RULES = (*COPYING_RULES, "mean-of-pieces", "fallback")
REPORT_FILE = "swap_report.json"
TOKENS_FILE = "swap_tokens.jsonl"

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
SPACE_MARK = "▁"


@functools.cache
def byte_to_char() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the character that stands for each byte in a byte-level BPE vocabulary."""
    from jobs.compat import bytes_to_unicode

    return bytes_to_unicode()


@functools.cache
def char_to_byte() -> dict[str, int]:
    return {char: byte for byte, char in byte_to_char().items()}


@dataclass(frozen=True)
class TokenSource:
    """Where one target row comes from: the mean of these source rows (of all source rows when there are none)."""

    rule: str
    sources: tuple[int, ...]


@dataclass(frozen=True)
class DictionaryPair:
    """One line of a bilingual dictionary: two vocabulary tokens (tab-separated) or two words (space-separated)."""

    line: int
    target: str
    source: str
    words: bool


@dataclass(frozen=True)
class Alignment:
    """A source for every target token id, and the dictionary lines that named no token of both vocabularies."""

    tokens: list[TokenSource]
    unmatched_dictionary_lines: list[int]

    def counts(self) -> dict[str, int]:
        counted = Counter(token.rule for token in self.tokens)
        return {rule: counted[rule] for rule in RULES}

    def copied(self, token_id: int) -> bool:
        return self.tokens[token_id].rule in COPYING_RULES


def component_types(node: Any) -> set[str]:
    """Every `type` named in a tokenizer.json component, however nested (Sequence pre-tokenizers, decoders)."""
    if isinstance(node, dict):
        return {str(node.get("type"))} | set().union(*(component_types(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(component_types(item) for item in node))
    return set()


class Vocabulary:
    """A tokenizer's vocabulary as byte strings, whichever convention (byte-level or SentencePiece) spells it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        self.tokenizer = tokenizer
        self.model = tokenizer.backend_tokenizer.model
        spelling = component_types(spec.get("pre_tokenizer")) | component_types(spec.get("decoder"))
        self.byte_level = "ByteLevel" in spelling
        self.byte_fallback = bool(spec["model"].get("byte_fallback"))
        self.ids: dict[str, int] = tokenizer.get_vocab()
        self.tokens = {token_id: token for token, token_id in self.ids.items()}
        added = tokenizer.added_tokens_decoder
        self.special_ids = set(tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}
        self.bytes = {
            i: token.encode() if i in added else self.spelled_bytes(token) for i, token in self.tokens.items()
        }
        # when several tokens spell the same bytes, the last one listed wins: regular tokens over byte pieces,
        # lower ids over higher ones
        order = sorted(self.bytes, key=lambda i: (not BYTE_PIECE.fullmatch(self.tokens[i]), -i))
        self.ids_by_bytes = {self.bytes[i]: i for i in order if i not in self.special_ids}

    def __len__(self) -> int:
        return len(self.tokens)

    def spelled_bytes(self, token: str) -> bytes:
        """The bytes a vocabulary token stands for."""
        if self.byte_level and all(char in char_to_byte() for char in token):
            return bytes(char_to_byte()[char] for char in token)
        piece = BYTE_PIECE.fullmatch(token) if self.byte_fallback else None
        if piece:
            return bytes([int(piece[1], 16)])
        return token.replace(SPACE_MARK, " ").encode()

    def pieces(self, text: bytes) -> tuple[int, ...]:
        """The source tokenizer's split of some bytes, without unknown or special pieces."""
        if self.byte_level:
            ids = [token.id for token in self.model.tokenize("".join(byte_to_char()[byte] for byte in text))]
        else:
            try:
                ids = [token.id for token in self.model.tokenize(text.decode().replace(" ", SPACE_MARK))]
            except UnicodeDecodeError:  # part of a character: only byte pieces can spell it
                ids = [self.ids_by_bytes[bytes([b])] for b in text if bytes([b]) in self.ids_by_bytes]
        return tuple(i for i in ids if i not in self.special_ids)


def load_tokenizer(path: Path, option: str) -> PreTrainedTokenizerBase:
    """A Hugging Face tokenizer folder, or one clear paragraph saying why it is not one."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise OrchError(
            f"Option {option} names {str(path)!r}, which is not a tokenizer that transformers' AutoTokenizer "
            f"loads ({reason}). Allowed: a folder written by a Hugging Face tokenizer's save_pretrained "
            "(tokenizer.json and tokenizer_config.json)."
        ) from None


def read_dictionary(path: Path) -> list[DictionaryPair]:
    """`target_token<TAB>source_token` (vocabulary strings) or `target_word source_word` per line; blank lines skip."""
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        words = "\t" not in line
        fields = line.split() if words else line.split("\t")
        if len(fields) != 2 or not all(fields):
            raise OrchError(
                f"{path}, line {number}: expected two fields, found {line!r}. Each line is either "
                "'target_token<TAB>source_token' (two vocabulary tokens, spelled as in each tokenizer's vocabulary) "
                "or 'target_word source_word' (two words separated by a space)."
            )
        pairs.append(DictionaryPair(number, fields[0], fields[1], words))
    return pairs


def dictionary_matches(pair: DictionaryPair, source: Vocabulary, target: Vocabulary) -> Iterator[tuple[int, int]]:
    """(target id, source id) for each token pair a line names; a word pair matches alone and after a space."""
    if pair.words:
        candidates = [((p + pair.target).encode(), (p + pair.source).encode()) for p in ("", " ")]
        for target_bytes, source_bytes in candidates:
            if target_bytes in target.ids_by_bytes and source_bytes in source.ids_by_bytes:
                yield target.ids_by_bytes[target_bytes], source.ids_by_bytes[source_bytes]
    elif pair.target in target.ids and pair.source in source.ids:
        yield target.ids[pair.target], source.ids[pair.source]


class Aligner:
    """Applies the rules, in order, to each target token."""

    def __init__(self, source: Vocabulary, target: Vocabulary, pairs: list[DictionaryPair]) -> None:
        self.source, self.target = source, target
        src, tgt = source.tokenizer, target.tokenizer
        other = src.unk_token_id if src.unk_token_id is not None else src.eos_token_id
        roles = {tgt.bos_token_id: src.bos_token_id, tgt.eos_token_id: src.eos_token_id}
        self.specials = {i: roles.get(i, other) for i in target.special_ids}
        self.dictionary: dict[int, int] = {}
        self.unmatched_lines: list[int] = []
        for pair in pairs:
            matches = dict(dictionary_matches(pair, source, target))
            self.dictionary.update(matches)
            if not matches:
                self.unmatched_lines.append(pair.line)

    def source_of(self, token_id: int) -> TokenSource:
        if token_id in self.target.special_ids:
            special = self.specials[token_id]
            return TokenSource("fallback", ()) if special is None else TokenSource("special", (special,))
        if token_id in self.dictionary:
            return TokenSource("dictionary", (self.dictionary[token_id],))
        text = self.target.bytes[token_id]
        same = self.source.ids.get(self.target.tokens[token_id])
        if same is not None and same not in self.source.special_ids and self.source.bytes[same] == text:
            return TokenSource("exact", (same,))
        if text in self.source.ids_by_bytes:
            return TokenSource("normalised", (self.source.ids_by_bytes[text],))
        pieces = self.source.pieces(text)
        return TokenSource("mean-of-pieces", pieces) if pieces else TokenSource("fallback", ())


def align(
    source_tokenizer: PreTrainedTokenizerBase,
    target_tokenizer: PreTrainedTokenizerBase,
    pairs: list[DictionaryPair] | None = None,
) -> Alignment:
    """A source for every token of the target vocabulary (see the module docstring for the rules)."""
    target = Vocabulary(target_tokenizer)
    aligner = Aligner(Vocabulary(source_tokenizer), target, pairs or [])
    return Alignment([aligner.source_of(i) for i in range(len(target))], aligner.unmatched_lines)


def transfer_rows(source_rows: torch.Tensor, alignment: Alignment) -> torch.Tensor:
    """Each target row is the mean of its source rows, or of all source rows when it has none (in float32)."""
    import torch

    targets = [t for t, token in enumerate(alignment.tokens) for _ in token.sources]
    sources = [s for token in alignment.tokens for s in token.sources]
    weights = [1 / len(token.sources) for token in alignment.tokens for _ in token.sources]
    matrix = torch.sparse_coo_tensor(
        torch.tensor([targets, sources], dtype=torch.long),
        torch.tensor(weights, dtype=torch.float32),
        (len(alignment.tokens), len(source_rows)),
        check_invariants=True,
    )
    rows = torch.sparse.mm(matrix, source_rows.float())
    without = [t for t, token in enumerate(alignment.tokens) if not token.sources]
    rows[without] = source_rows.float().mean(dim=0)
    return rows.to(source_rows.dtype)


def swap_vocabulary(model: LlamaForCausalLM, alignment: Alignment) -> None:
    """Replace the input embedding and output head by rows for the target vocabulary, in place."""
    import torch

    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    new_embedding = transfer_rows(embedding.detach(), alignment)
    new_head = None if head is embedding else transfer_rows(head.detach(), alignment)
    model.resize_token_embeddings(len(alignment.tokens), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(new_embedding)
        if new_head is not None:
            model.get_output_embeddings().weight.copy_(new_head)


def sample_coverage(alignment: Alignment, tokenizer: PreTrainedTokenizerBase, text: str) -> dict[str, float]:
    """How much of a text the target tokenizer spells with aligned (copied) tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    copied = sum(alignment.copied(i) for i in ids)
    return {"tokens": len(ids), "copied": copied, "coverage": copied / len(ids) if ids else 0.0}


def build_report(
    alignment: Alignment, source: PreTrainedTokenizerBase, target: PreTrainedTokenizerBase, sample: Path | None
) -> dict[str, Any]:
    """Counts by rule, the dictionary lines that matched nothing, and the sample's coverage."""
    counts = alignment.counts()
    report: dict[str, Any] = {
        "source_vocab_size": len(source),
        "target_vocab_size": len(target),
        "rules": counts,
        "aligned": sum(counts[rule] for rule in COPYING_RULES),
        "unmatched_dictionary_lines": alignment.unmatched_dictionary_lines,
    }
    if sample:
        text = sample.read_text(encoding="utf-8")
        report["sample"] = {"file": str(sample), **sample_coverage(alignment, target, text)}
    return report


def token_lines(
    alignment: Alignment, source: PreTrainedTokenizerBase, target: PreTrainedTokenizerBase
) -> Iterator[str]:
    """One JSON line per target token: its rule and the source tokens its rows come from, to audit the swap."""
    for token_id, token in enumerate(alignment.tokens):
        entry = {
            "id": token_id,
            "token": target.convert_ids_to_tokens(token_id),
            "rule": token.rule,
            "sources": list(token.sources),
            "source_tokens": source.convert_ids_to_tokens(list(token.sources)),
        }
        yield json.dumps(entry, ensure_ascii=False) + "\n"


def swap(
    source_model: Path,
    source_tokenizer: Path,
    target_tokenizer: Path,
    output: Path,
    dictionary: Path | None = None,
    sample: Path | None = None,
) -> dict[str, Any]:
    """Write the target model directory with swap_report.json and swap_tokens.jsonl; returns the report."""
    from transformers import LlamaForCausalLM

    from jobs.model import save_hf_model

    source_tok = load_tokenizer(source_tokenizer, "--source-tokenizer")
    target_tok = load_tokenizer(target_tokenizer, "--target-tokenizer")
    alignment = align(source_tok, target_tok, read_dictionary(dictionary) if dictionary else None)
    model = LlamaForCausalLM.from_pretrained(source_model, dtype="auto")
    swap_vocabulary(model, alignment)
    save_hf_model(model, target_tok, output)
    report = build_report(alignment, source_tok, target_tok, sample)
    (output / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with (output / TOKENS_FILE).open("w", encoding="utf-8") as lines:
        lines.writelines(token_lines(alignment, source_tok, target_tok))
    return report
