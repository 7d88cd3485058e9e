"""Start vLLM engines the way a user's process does, and generate greedy tokens: run as a script
(vLLM starts its engine core and workers as processes of their own, so it needs the
``if __name__ == "__main__"`` guard), one engine after another.

    python vllm_engine.py CASES_JSON

CASES_JSON: a list of {"name", "model", "load_format", "extra" (the model loader extra config),
"prompts" (lists of token ids), "max_tokens", "tensor_parallel_size", "env" (variables set for
this engine), "forge_cache" ({"dir": an NVMe cache directory, "entries": N}: before the engine
starts, the first N entries by key get other weights and records recomputed to match them, as
whoever can write the directory could do)}. For each case it prints ``== CASE <name>``, vLLM's
own output, then one line ``== RESULT <name> {"tokens": [[...], ...]}`` or
``== FAILED <name> <exception type>``. The engine runs on the CPU with eager execution, no
tokenizer and a 1 GiB KV cache.
"""

from __future__ import annotations

import gc
import json
import os
import sys


def run_case(case: dict) -> list[list[int]]:
    """Start the case's engine, generate greedily from each prompt; returns the token ids."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=case["model"],
        load_format=case.get("load_format", "auto"),
        model_loader_extra_config=case.get("extra") or {},
        tensor_parallel_size=case.get("tensor_parallel_size", 1),
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="bfloat16",
        max_model_len=128,
        max_num_seqs=4,
        seed=0,
    )
    try:
        params = SamplingParams(temperature=0.0, max_tokens=case.get("max_tokens", 8))
        prompts = [TokensPrompt(prompt_token_ids=p) for p in case["prompts"]]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def forge_cache_entries(directory: str, count: int) -> None:
    """Replace the weights of the first `count` entries of the cache in `directory` (by key) and
    recompute their records to match."""
    import hashlib
    import struct
    from pathlib import Path

    from blob2gpu import _core

    records = sorted(Path(directory, "entries").glob("*.json"))[:count]
    for meta_path in records:
        data_path = meta_path.with_suffix(".bin")
        data = data_path.read_bytes()
        start = 8 + struct.unpack("<Q", data[:8])[0]
        data = data[:start] + b"\x41" * (len(data) - start)
        data_path.write_bytes(data)
        record = json.loads(meta_path.read_text())
        chunk = record["chunk_bytes"]
        record["crc32c"] = [_core.crc32c(data[i : i + chunk]) for i in range(0, len(data), chunk)]
        if "sha256" in record:
            record["sha256"] = hashlib.sha256(data).hexdigest()
        meta_path.write_text(json.dumps(record))


def main(cases: list[dict]) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    for case in cases:
        saved = {k: os.environ.get(k) for k in case.get("env", {})}
        os.environ.update(case.get("env", {}))
        print(f"== CASE {case['name']}", flush=True)
        if "forge_cache" in case:
            forge_cache_entries(case["forge_cache"]["dir"], case["forge_cache"]["entries"])
        try:
            tokens = run_case(case)
        except Exception as error:
            print(f"== FAILED {case['name']} {type(error).__name__}: {error}", flush=True)
        else:
            print(f"== RESULT {case['name']} {json.dumps({'tokens': tokens})}", flush=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
