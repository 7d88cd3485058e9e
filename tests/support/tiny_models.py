"""Tiny transformers causal LMs with random bf16 weights, written locally (no hub), in several
safetensors shards with an index: the models the vLLM tests serve. Head size 64 (vLLM's CPU
attention rejects 16)."""

from __future__ import annotations

from pathlib import Path

# name -> (transformers config class, whether the output head is the embedding: tied)
ARCHITECTURES = {"llama": ("LlamaConfig", False), "qwen2": ("Qwen2Config", True)}


def write_tiny_model(directory: Path, architecture: str, seed: int = 0) -> Path:
    """Write a tiny `architecture` ('llama': untied output head; 'qwen2': tied embeddings) to
    `directory` with transformers' save_pretrained: config.json, generation_config.json, about
    6 shards of ~1 MB and model.safetensors.index.json. Returns the directory."""
    import torch
    import transformers

    config_class, tied = ARCHITECTURES[architecture]
    config = getattr(transformers, config_class)(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    with torch.no_grad():  # larger than the default init: greedy tokens then differ per weight
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.25)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="1MB")
    return directory
