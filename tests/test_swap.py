"""Vocabulary swap between a byte-level BPE and a SentencePiece-style BPE, and continued pretraining from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from jobs.data import pack
from orchestrator.cli.commands.model import app
from orchestrator.core.errors import OrchError
from orchestrator.core.loading import load_recipe
from orchestrator.tools.run_data import demo_corpus
from orchestrator.tools.swap import COPYING_RULES, REPORT_FILE, RULES, TOKENS_FILE, Vocabulary
from tests.conftest import free_port, orch, status_json

ENGLISH = [f"{who} sees a {size} dog in the park." for who in ("Peter", "Jane", "Tom") for size in ("big", "small")]
CZECH_EXTRA = ["Pes je velký a malý pes spí.", "Žluťoučký kůň úpěl ďábelské ódy."]
SAMPLE = "Petr čte knihu v Praze.\nPes je velký a žluťoučký kůň spí."


SPECIAL = ["<unk>", "<s>", "</s>"]


def save_fast(tokenizer: Tokenizer, output: Path) -> Path:
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(output)
    return output


def train_byte_level(corpus: list[str], vocab_size: int, output: Path) -> Path:
    """A GPT-2 style byte-level BPE: `Ġ` is a space and every byte is a character of its alphabet."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return save_fast(tokenizer, output)


def train_sentencepiece_style(corpus: list[str], vocab_size: int, output: Path) -> Path:
    """A BPE spelled like SentencePiece: `▁` starts a word, unseen characters fall back to `<0xNN>` byte pieces."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    trained = json.loads(tokenizer.to_str())["model"]
    learned = [token for token, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]) if token not in SPECIAL]
    pieces = SPECIAL + [f"<0x{byte:02X}>" for byte in range(256)] + learned
    vocab = {token: token_id for token_id, token in enumerate(pieces)}
    merges = [tuple(merge) for merge in trained["merges"]]
    tokenizer.model = models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return save_fast(tokenizer, output)


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    """The `tiny` recipe's dimensions."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def invoke(*args: str):
    return CliRunner().invoke(app, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def swapped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A byte-level source model swapped to a SentencePiece-style tokenizer, with a dictionary and a sample."""
    root = tmp_path_factory.mktemp("swap")
    source_tokenizer = root / "source-tokenizer"
    train_byte_level(ENGLISH * 30 + demo_corpus(1, 300), 400, source_tokenizer)
    target_tokenizer = train_sentencepiece_style(demo_corpus(2, 600) + CZECH_EXTRA * 30, 500, root / "target-tokenizer")
    tiny_llama(len(AutoTokenizer.from_pretrained(source_tokenizer))).save_pretrained(root / "source-model")
    (root / "dictionary.txt").write_text("▁pes\tĠdog\nvelký big\n▁nic\tĠnothing\n", encoding="utf-8")
    (root / "sample.txt").write_text(SAMPLE, encoding="utf-8")
    paths = {
        "source_model": root / "source-model",
        "source_tokenizer": source_tokenizer,
        "target_tokenizer": target_tokenizer,
        "dictionary": root / "dictionary.txt",
        "sample": root / "sample.txt",
        "output": root / "swapped",
    }
    result = invoke("swap", *(arg for key, path in paths.items() for arg in (f"--{key.replace('_', '-')}", path)))
    assert result.exit_code == 0, result.output
    return {**paths, "stdout": result.output}


def swap_outputs(swapped: dict[str, Path]) -> tuple[dict, list[dict], LlamaForCausalLM, LlamaForCausalLM]:
    report = json.loads((swapped["output"] / REPORT_FILE).read_text(encoding="utf-8"))
    tokens = [json.loads(line) for line in (swapped["output"] / TOKENS_FILE).read_text(encoding="utf-8").splitlines()]
    source = LlamaForCausalLM.from_pretrained(swapped["source_model"])
    target = LlamaForCausalLM.from_pretrained(swapped["output"])
    return report, tokens, source, target


def test_spelling_conventions_normalise_to_the_same_bytes(swapped):
    byte_level = Vocabulary(AutoTokenizer.from_pretrained(swapped["source_tokenizer"]))
    sentencepiece = Vocabulary(AutoTokenizer.from_pretrained(swapped["target_tokenizer"]))
    assert (byte_level.byte_level, sentencepiece.byte_level, sentencepiece.byte_fallback) == (True, False, True)
    assert byte_level.spelled_bytes("ĠPetr") == sentencepiece.spelled_bytes("▁Petr") == b" Petr"
    assert byte_level.spelled_bytes("Ċ") == sentencepiece.spelled_bytes("<0x0A>") == b"\n"
    assert byte_level.spelled_bytes("Äį") == sentencepiece.spelled_bytes("č") == "č".encode()


def test_tokens_align_by_each_rule(swapped):
    _, tokens, _, _ = swap_outputs(swapped)
    by_token = {entry["token"]: entry for entry in tokens}
    assert (by_token["▁Petr"]["rule"], by_token["▁Petr"]["source_tokens"]) == ("normalised", ["ĠPetr"])
    assert (by_token["<0x0A>"]["rule"], by_token["<0x0A>"]["source_tokens"]) == ("normalised", ["Ċ"])
    assert (by_token["</s>"]["rule"], by_token["</s>"]["source_tokens"]) == ("special", ["</s>"])
    assert (by_token["▁pes"]["rule"], by_token["▁pes"]["source_tokens"]) == ("dictionary", ["Ġdog"])
    assert (by_token["▁velký"]["rule"], by_token["▁velký"]["source_tokens"]) == ("dictionary", ["Ġbig"])
    assert by_token["č"]["rule"] == "normalised" and by_token["č"]["source_tokens"] == ["Äį"]
    assert {entry["rule"] for entry in tokens} >= {"exact", "mean-of-pieces"}
    for entry in tokens:
        if entry["rule"] == "exact":
            assert entry["source_tokens"] == [entry["token"]]


def test_aligned_rows_equal_the_source_rows_and_the_others_are_means_of_pieces(swapped):
    _, tokens, source, target = swap_outputs(swapped)
    for name in ("input", "output"):
        source_rows = getattr(source, f"get_{name}_embeddings")().weight
        target_rows = getattr(target, f"get_{name}_embeddings")().weight
        for entry in tokens:
            row = target_rows[entry["id"]]
            if entry["rule"] in COPYING_RULES:
                [source_id] = entry["sources"]
                assert torch.equal(row, source_rows[source_id]), entry
            elif entry["rule"] == "mean-of-pieces":
                torch.testing.assert_close(row, source_rows[entry["sources"]].mean(dim=0), rtol=0, atol=1e-6)
            else:
                torch.testing.assert_close(row, source_rows.mean(dim=0), rtol=0, atol=1e-6)


def test_report_counts_match_the_rows_actually_copied(swapped):
    report, tokens, source, target = swap_outputs(swapped)
    source_rows = {tuple(row.tolist()) for row in source.get_input_embeddings().weight}
    copied_rows = sum(tuple(row.tolist()) in source_rows for row in target.get_input_embeddings().weight)
    assert copied_rows == report["aligned"] == sum(report["rules"][rule] for rule in COPYING_RULES)
    assert report["rules"] == {rule: sum(entry["rule"] == rule for entry in tokens) for rule in RULES}
    assert sum(report["rules"].values()) == report["target_vocab_size"] == len(tokens)
    assert report["unmatched_dictionary_lines"] == [3]
    assert f"aligned (rows copied) │ {report['aligned']}" in swapped["stdout"]


def test_sample_coverage_is_the_share_of_its_tokens_that_are_aligned(swapped):
    report, tokens, _, _ = swap_outputs(swapped)
    ids = AutoTokenizer.from_pretrained(swapped["output"])(SAMPLE, add_special_tokens=False)["input_ids"]
    copied = sum(tokens[i]["rule"] in COPYING_RULES for i in ids)
    assert report["sample"]["tokens"] == len(ids)
    assert report["sample"]["copied"] == copied
    assert report["sample"]["coverage"] == pytest.approx(copied / len(ids))
    assert 0 < copied < len(ids)
    assert f"coverage {copied / len(ids):.1%}" in swapped["stdout"]


def test_transformer_blocks_are_copied_unchanged(swapped):
    _, _, source, target = swap_outputs(swapped)
    vocabulary_rows = {"model.embed_tokens.weight", "lm_head.weight"}
    source_state, target_state = source.state_dict(), target.state_dict()
    assert set(source_state) == set(target_state)
    for key in set(source_state) - vocabulary_rows:
        assert torch.equal(source_state[key], target_state[key]), key


def test_output_is_a_hugging_face_directory_with_the_target_tokenizer(swapped):
    tokenizer = AutoTokenizer.from_pretrained(swapped["output"])
    model = LlamaForCausalLM.from_pretrained(swapped["output"])
    assert model.config.vocab_size == len(tokenizer) == len(AutoTokenizer.from_pretrained(swapped["target_tokenizer"]))
    assert (model.config.bos_token_id, model.config.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.pad_token_id is None and model.generation_config.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.tokenize(SAMPLE) == AutoTokenizer.from_pretrained(swapped["target_tokenizer"]).tokenize(SAMPLE)
    logits = model(**tokenizer(SAMPLE, return_tensors="pt")).logits
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()


def test_malformed_dictionary_line_is_refused_with_its_file_and_line(swapped, tmp_path: Path):
    dictionary = tmp_path / "bad.txt"
    dictionary.write_text("pes dog\npes velký pes\n", encoding="utf-8")
    result = invoke(
        "swap",
        *("--source-model", swapped["source_model"], "--source-tokenizer", swapped["source_tokenizer"]),
        *("--target-tokenizer", swapped["target_tokenizer"], "--output", tmp_path / "out"),
        *("--dictionary", dictionary),
    )
    assert isinstance(result.exception, OrchError)
    assert f"{dictionary}, line 2" in str(result.exception) and "target_word source_word" in str(result.exception)


def test_swap_refuses_a_taken_output_a_source_without_config_and_a_folder_without_tokenizer(swapped, tmp_path: Path):
    tokenizers = ("--source-tokenizer", swapped["source_tokenizer"], "--target-tokenizer", swapped["target_tokenizer"])
    taken = invoke("swap", "--source-model", swapped["source_model"], *tokenizers, "--output", swapped["output"])
    assert isinstance(taken.exception, OrchError) and "--output" in str(taken.exception)
    no_model = invoke("swap", "--source-model", tmp_path, *tokenizers, "--output", tmp_path / "out")
    assert isinstance(no_model.exception, OrchError) and "--source-model" in str(no_model.exception)
    assert "config.json" in str(no_model.exception)
    no_tokenizer = invoke(
        "swap",
        *("--source-model", swapped["source_model"], "--source-tokenizer", swapped["source_tokenizer"]),
        *("--target-tokenizer", tmp_path, "--output", tmp_path / "out"),
    )
    assert isinstance(no_tokenizer.exception, OrchError) and "--target-tokenizer" in str(no_tokenizer.exception)
    assert not (tmp_path / "out").exists()


def load_sharded(rank: int, world: int, port: int, init_from: str, results) -> None:
    """One rank: build the sharded model from a directory, gather it back, count who read the directory."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    import jobs.model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    loads, build_model = [], jobs.model.build_model

    def counted_build_model(*args):
        loads.append(args)
        return build_model(*args)

    jobs.model.build_model = counted_build_model
    _, recipe = load_recipe("tiny")
    spec = recipe.model.model_copy(update={"init_from": init_from})
    model = jobs.model.build_sharded_model(spec, "sdpa", "shard_grad_op", "fp32", torch.device("cpu"))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    tokens = torch.arange(12).reshape(1, 12)
    results[rank] = {
        "loads": len(loads),
        "state": full,
        "inv_freq": model.model.rotary_emb.inv_freq.clone(),
        "logits": model(input_ids=tokens).logits.detach(),
    }
    dist.destroy_process_group()


def test_model_from_a_directory_is_loaded_by_rank_0_and_sharded_to_two_gloo_ranks(swapped):
    results = mp.Manager().dict()
    mp.spawn(load_sharded, args=(2, free_port(), str(swapped["output"]), results), nprocs=2, join=True)
    reference = LlamaForCausalLM.from_pretrained(swapped["output"], attn_implementation="sdpa")
    assert (results[0]["loads"], results[1]["loads"]) == (1, 0)
    for rank in (0, 1):
        assert results[rank]["state"].keys() == reference.state_dict().keys()
        for key, value in reference.state_dict().items():
            assert torch.equal(results[rank]["state"][key], value), key
        assert torch.equal(results[rank]["inv_freq"], reference.model.rotary_emb.inv_freq)
        torch.testing.assert_close(
            results[rank]["logits"], reference(input_ids=torch.arange(12).reshape(1, 12)).logits, rtol=0, atol=1e-5
        )


def train_source_model(corpus: list[str], tokenizer_dir: Path, output: Path) -> Path:
    """A source model that has learnt the corpus a little: 60 AdamW steps in this process."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    blocks, _ = pack(tokenizer(corpus, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id, 64)
    blocks = torch.from_numpy(blocks)
    model = tiny_llama(len(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    order = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = blocks[torch.randint(len(blocks), (16,), generator=order)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(output)
    return output


def first_logged_loss(recipe: Path) -> float:
    result = orch("submit", "--profile", "local", "--recipe", str(recipe), "--steps", "2", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    [run] = [r for r in status_json() if r["recipe"] == recipe.stem]
    client = mlflow.MlflowClient(f"sqlite:///{os.environ['ORCH_HOME']}/mlflow.db")
    first = client.get_metric_history(run["mlflow_run_id"], "loss")[0]
    assert first.step == 1
    return first.value


@pytest.mark.slow
def test_run_from_a_swapped_model_starts_with_a_lower_loss_than_from_scratch(orch_home: Path, tmp_path: Path):
    train_byte_level(demo_corpus(3, 1000), 512, tmp_path / "source-tokenizer")
    source = train_source_model(demo_corpus(3, 1000), tmp_path / "source-tokenizer", tmp_path / "source-model")
    train_sentencepiece_style(demo_corpus(4, 1000), 450, tmp_path / "target-tokenizer")
    swapped = tmp_path / "swapped"
    result = invoke(
        "swap",
        *("--source-model", source, "--source-tokenizer", tmp_path / "source-tokenizer"),
        *("--target-tokenizer", tmp_path / "target-tokenizer", "--output", swapped),
    )
    assert result.exit_code == 0, result.output

    _, tiny = load_recipe("tiny")
    recipe = tiny.model_dump(mode="json")
    recipe["model"]["vocab_size"] = LlamaConfig.from_pretrained(swapped).vocab_size
    recipe["data"]["tokenizer"] = str(swapped)
    losses = {}
    for name, init_from in (("from-scratch", None), ("from-swapped", str(swapped))):
        recipe["model"]["init_from"] = init_from
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
        losses[name] = first_logged_loss(tmp_path / f"{name}.yaml")
    assert losses["from-swapped"] < losses["from-scratch"] - 1.0, losses
