"""Tiny transformers causal LMs with random bf16 weights, written locally (no hub), in several
safetensors shards with an index: the models the vLLM tests serve. Head size 64 (vLLM's CPU
attention rejects 16)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# name -> (transformers config class, whether the output head is the embedding: tied, the
# architecture's own config values)
ARCHITECTURES: dict[str, tuple[str, bool, dict[str, Any]]] = {
    "llama": ("LlamaConfig", False, {"intermediate_size": 512, "num_hidden_layers": 4}),
    "qwen2": ("Qwen2Config", True, {"intermediate_size": 512, "num_hidden_layers": 4}),
    # A mixture of experts saved one tensor per expert (model.layers.N.block_sparse_moe.experts.
    # E.w1.weight, ...): 8 experts of 3 x 128 KiB per layer, 83% of the checkpoint's bytes.
    "mixtral": (
        "MixtralConfig",
        False,
        {
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
        },
    ),
}


def write_tiny_model(directory: Path, architecture: str, seed: int = 0) -> Path:
    """Write a tiny `architecture` ('llama': untied output head; 'qwen2': tied embeddings;
    'mixtral': a mixture of experts, one tensor per expert) to `directory` with transformers'
    save_pretrained: config.json, generation_config.json, shards of ~1 MB and
    model.safetensors.index.json. Returns the directory."""
    import torch
    import transformers

    config_class, tied, values = ARCHITECTURES[architecture]
    config = getattr(transformers, config_class)(
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        torch_dtype="bfloat16",
        **values,
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
