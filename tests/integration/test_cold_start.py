"""Cold start to first token: a real transformers Llama-architecture model, published to Azurite as
shards with its config and tokenizer, is built on the meta device from Blob, loaded, and produces
the same next token as the model it was saved from; every phase of the report is filled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from blob2gpu.errors import InvalidArgument  # noqa: E402
from blob2gpu.integrations import coldstart  # noqa: E402
from blob2gpu.integrations.coldstart import DEFAULT_INPUT_IDS, cold_start  # noqa: E402
from blob2gpu.integrity.publish import publish  # noqa: E402
from blob2gpu.operations.report import PHASES  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may reach the Hugging Face Hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def byte_tokenizer() -> object:
    """A 256-token byte-level tokenizer built here (no download): one token per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def save_llama(directory: Path, tied: bool, tokenizer: bool) -> torch.nn.Module:
    """A small random Llama saved as several shards + index + config.json; returns the model."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms start at ones: make every weight tell
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="100KB")
    if tokenizer:
        byte_tokenizer().save_pretrained(directory)
    assert len(list(directory.glob("*.safetensors"))) > 1
    assert (directory / "model.safetensors.index.json").is_file()
    return model


def expected_token(model: torch.nn.Module, input_ids: list[int]) -> int:
    """The original model's greedy next token, through transformers' own generate()."""
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=1,
            do_sample=False,
            pad_token_id=0,
        )
    return int(out[0, -1])


def assert_same_model(result: coldstart.ColdStart, original: torch.nn.Module) -> None:
    ids = torch.tensor([result.input_ids])
    with torch.no_grad():
        assert torch.equal(result.model(ids).logits, original(ids).logits)
    assert result.token_id == expected_token(original, result.input_ids)
    tensors = [*result.model.parameters(), *result.model.buffers()]
    assert not any(t.is_meta for t in tensors)
    rotary, reference = result.model.model.rotary_emb, original.model.rotary_emb
    assert torch.equal(rotary.inv_freq, reference.inv_freq)


def assert_phases_ordered(result: coldstart.ColdStart) -> None:
    phases = result.report.phases
    assert all(phases[name] is not None for name in PHASES), phases
    times = [phases[name] for name in PHASES]
    assert times == sorted(times), phases
    assert phases["first_token"] >= phases["model_load_complete"]
    assert 0 < result.prepare_seconds < result.total_seconds


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_cold_start_from_blob_matches_the_original_model(tmp_path, container, blob_env, tied):
    original = save_llama(tmp_path / "llama", tied=tied, tokenizer=True)
    uri = f"az://{container}/llama"
    publish(tmp_path / "llama", uri)

    result = cold_start(uri, device="cpu", prompt="hello")

    tokenizer = byte_tokenizer()
    assert result.input_ids == tokenizer("hello")["input_ids"]
    assert result.text == tokenizer.decode([result.token_id])
    assert_same_model(result, original)
    assert_phases_ordered(result)
    assert result.report.source == "azure-blob"
    assert len(result.report.shards) == len(list((tmp_path / "llama").glob("*.safetensors")))
    assert (result.model.lm_head.weight is result.model.model.embed_tokens.weight) == tied


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_cold_start_from_a_local_directory_without_tokenizer(tmp_path, tied):
    original = save_llama(tmp_path / "llama", tied=tied, tokenizer=False)

    result = cold_start(str(tmp_path / "llama"))

    assert result.input_ids == list(DEFAULT_INPUT_IDS) and result.text is None
    assert_same_model(result, original)
    assert_phases_ordered(result)
    assert result.report.source == "local"


def test_buffers_come_from_the_modules_own_code_when_the_initializer_skips_them(
    tmp_path, monkeypatch
):
    """Where transformers' _init_weights does not compute a non-persistent buffer (as before
    transformers 5), the model is built again with parameters on meta and the buffer taken from
    its own __init__."""
    original = save_llama(tmp_path / "llama", tied=False, tokenizer=False)
    monkeypatch.setattr(transformers.PreTrainedModel, "_init_weights", lambda self, module: None)
    rebuilds = []
    real = coldstart._parameters_on_meta

    def counted():  # type: ignore[no-untyped-def]
        rebuilds.append(1)
        return real()

    monkeypatch.setattr(coldstart, "_parameters_on_meta", counted)

    result = cold_start(str(tmp_path / "llama"))

    assert rebuilds == [1]
    assert_same_model(result, original)


def test_initializer_cannot_touch_loaded_weights(tmp_path, monkeypatch):
    """A module that holds loaded weights and a non-persistent buffer: the initializer run for the
    buffer (transformers' RMSNorm init sets weight to ones) leaves the loaded weight alone."""
    norm_class = transformers.models.llama.modeling_llama.LlamaRMSNorm
    norm_init = norm_class.__init__

    def with_buffer(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        norm_init(self, *args, **kwargs)
        self.register_buffer("unit", torch.ones(3), persistent=False)

    monkeypatch.setattr(norm_class, "__init__", with_buffer)
    original = save_llama(tmp_path / "llama", tied=False, tokenizer=False)

    result = cold_start(str(tmp_path / "llama"))

    assert_same_model(result, original)
    norm = result.model.model.norm
    assert torch.equal(norm.weight, original.model.norm.weight)
    assert torch.equal(norm.unit, torch.ones(3))


def test_dtype_cast(tmp_path):
    save_llama(tmp_path / "llama", tied=True, tokenizer=False)
    result = cold_start(str(tmp_path / "llama"), dtype=torch.bfloat16)
    assert {p.dtype for p in result.model.parameters()} == {torch.bfloat16}
    assert result.model.model.rotary_emb.inv_freq.dtype == torch.float32  # as transformers keeps it


def test_missing_config_and_missing_transformers_are_typed_errors(tmp_path, monkeypatch):
    save_llama(tmp_path / "llama", tied=True, tokenizer=False)
    (tmp_path / "llama" / "config.json").unlink()
    with pytest.raises(InvalidArgument, match="no config.json"):
        cold_start(str(tmp_path / "llama"))
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(InvalidArgument, match=r"pip install 'blob2gpu\[transformers\]'"):
        cold_start(str(tmp_path / "llama"))


def test_cli_coldstart(tmp_path, container, blob_env):
    original = save_llama(tmp_path / "llama", tied=True, tokenizer=True)
    uri = f"az://{container}/llama"
    publish(tmp_path / "llama", uri)
    result = subprocess.run(
        [sys.executable, "-m", "blob2gpu", "coldstart", uri, "--prompt", "hi there"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    input_ids = byte_tokenizer()("hi there")["input_ids"]
    assert f"first token: {expected_token(original, input_ids)} " in result.stdout
    assert "GB/s" in result.stdout
    for name in PHASES:
        line = next(x for x in result.stdout.splitlines() if x.startswith(name))
        assert not line.rstrip().endswith("-"), line


def test_the_llama_demo_cold_starts_to_a_first_token():
    # `blob2gpu demo --model llama`: a Llama written here, served by Azurite when installed (else
    # local files), cold-started to its first token with every phase printed.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "blob2gpu",
            "demo",
            "--model",
            "llama",
            "--size-mb",
            "16",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "a transformers Llama" in result.stdout and "first token: " in result.stdout
    assert "the token is random" in result.stdout
    first_token_row = [ln for ln in result.stdout.splitlines() if ln.startswith("first_token")]
    assert first_token_row and first_token_row[0].split()[-1] != "-"
