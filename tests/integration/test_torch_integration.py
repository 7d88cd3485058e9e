"""blob2gpu.integrations.torch_modules.load_into: a module built on the meta device gets its
weights assigned from a checkpoint, with strict name and shape checks, dtype casts, prefixes and
tied weights."""

from __future__ import annotations

import blob2gpu.integrations.torch_modules as b2t
import pytest
import torch
from safetensors.torch import save_file


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 50, hidden: int = 16) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(hidden, 4 * hidden),
            torch.nn.GELU(),
            torch.nn.Linear(4 * hidden, hidden),
        )
        self.norm = torch.nn.LayerNorm(hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.mlp(self.embed(ids))) * self.scale)


@pytest.fixture
def reference(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    state = {k: v for k, v in model.state_dict().items() if k != "head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    return model, tmp_path / "model.safetensors"


def test_meta_module_gets_real_weights_and_same_outputs(reference):
    model, path = reference
    with torch.device("meta"):
        fresh = TinyLM()
    report = b2t.load_into(fresh, str(path), device="cpu")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(fresh(ids), model(ids))
    assert fresh.head.weight is fresh.embed.weight
    assert all(p.device.type == "cpu" for p in fresh.parameters())
    assert report.tensors == 8  # 7 parameters (the head is tied) and one buffer


def test_dtype_cast(reference):
    _, path = reference
    with torch.device("meta"):
        fresh = TinyLM()
    b2t.load_into(fresh, str(path), device="cpu", dtype=torch.bfloat16)
    assert fresh.mlp[0].weight.dtype == torch.bfloat16


def test_missing_unexpected_and_misshapen_are_named(tmp_path, reference):
    model, _ = reference
    state = {k: v for k, v in model.state_dict().items() if k not in ("head.weight", "norm.bias")}
    state["extra.weight"] = torch.zeros(2)
    state["mlp.0.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with torch.device("meta"):
        fresh = TinyLM()
    with pytest.raises(b2t.StateDictMismatch) as info:
        b2t.load_into(fresh, str(tmp_path / "bad.safetensors"), device="cpu")
    message = str(info.value)
    assert "norm.bias" in message and "extra.weight" in message
    assert "mlp.0.weight: checkpoint (3, 3) vs module (64, 16)" in message


def test_prefix_is_stripped(tmp_path, reference):
    model, _ = reference
    state = {f"model.{k}": v for k, v in model.state_dict().items() if k != "head.weight"}
    save_file(state, str(tmp_path / "prefixed.safetensors"))
    with torch.device("meta"):
        fresh = TinyLM()
    b2t.load_into(fresh, str(tmp_path / "prefixed.safetensors"), device="cpu", prefix="model.")
    assert torch.equal(fresh.norm.weight, model.norm.weight)


def test_loads_from_blob_storage(reference, azurite, container, blob_env):
    model, path = reference
    azurite.upload_directory(container, path.parent, "tiny")
    with torch.device("meta"):
        fresh = TinyLM()
    b2t.load_into(fresh, f"az://{container}/tiny", device="cpu")
    ids = torch.tensor([[5, 6]])
    assert torch.equal(fresh(ids), model(ids))


def test_a_pipeline_stage_reads_only_its_own_tensors(reference):
    # A stage holding only the MLP: strict=False turns its names into a tensor selection.
    model, path = reference

    class Stage(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = TinyLM().mlp

    with torch.device("meta"):
        stage = Stage()
    report = b2t.load_into(stage, str(path), device="cpu", strict=False, mmap_local_files=False)
    assert report.tensors == 4 and report.tensor_selection == 4
    mlp_bytes = sum(p.numel() * p.element_size() for p in model.mlp.parameters())
    assert report.bytes - 8 - report.shards[0].header_bytes == mlp_bytes
    for got, want in zip(stage.mlp.parameters(), model.mlp.parameters(), strict=True):
        assert torch.equal(got, want)
