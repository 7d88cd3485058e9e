"""Start vLLM engines the way a user's process does, and generate greedy tokens: run as a script
(vLLM starts its engine core and workers as processes of their own, so it needs the
``if __name__ == "__main__"`` guard), one engine after another. The tests run it through
run_engines().

    python vllm_engine.py CASES_JSON

CASES_JSON: a list of {"name", "model", "load_format", "extra" (the model loader extra config),
"prompts" (lists of token ids; default PROMPTS), "max_tokens", "tensor_parallel_size",
"engine_args" (more of vLLM's engine arguments, e.g. enable_expert_parallel), "generate" (default
true), "digests" (default false), "env" (variables set for this engine), "forge_cache" ({"dir": an
NVMe cache directory, "entries": N}: before the engine starts, the first N entries by key get
other weights and records recomputed to match them, as whoever can write the directory could
do)}. For each case it prints ``== CASE <name>``, vLLM's own output, with "digests" one line
``== DIGESTS <name> [...]`` (per worker, {parameter name: SHA-256 of its bytes} after loading),
then one line ``== RESULT <name> {"tokens": [[...], ...]}`` (null without "generate") or
``== FAILED <name> <exception type>``. The engine runs on the CPU with eager execution, no
tokenizer and a 1 GiB KV cache.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ENGINE_RUN_TIMEOUT = 1500  # seconds for one run of this script (several engine starts)
PROMPTS = [[1, 2, 3, 4], [100, 7, 42], [511, 0, 255, 19, 8]]  # a case's, where it names none


def run_case(case: dict) -> list[list[int]] | None:
    """Start the case's engine, print its workers' parameter digests if asked, generate greedily
    from each prompt; returns the token ids (None without "generate")."""
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
        **case.get("engine_args", {}),
    )
    try:
        if case.get("digests"):
            digests = llm.collective_rpc(parameter_digests)
            print(f"== DIGESTS {case['name']} {json.dumps(digests)}", flush=True)
        if not case.get("generate", True):
            return None
        params = SamplingParams(temperature=0.0, max_tokens=case.get("max_tokens", 8))
        prompts = [TokensPrompt(prompt_token_ids=p) for p in case.get("prompts", PROMPTS)]
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


def parameter_digests(worker: Any) -> dict[str, str]:
    """{name: SHA-256 of its bytes} of each parameter of `worker`'s model (run in the worker by
    vLLM's collective_rpc; needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 to be sent there)."""
    import hashlib

    import torch

    digests = {}
    for name, parameter in worker.get_model().named_parameters():
        data = parameter.detach().contiguous().reshape(-1).view(torch.uint8)
        digests[name] = hashlib.sha256(data.numpy().tobytes()).hexdigest()
    return digests


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


# -- how the tests run it ---------------------------------------------------------------------


def run_engines(cases: list[dict], env: dict[str, str]) -> tuple[str, dict[str, object]]:
    """Run this script over `cases` (with vLLM, in this interpreter); returns (its whole output,
    {case name: tokens, or the failure line})."""
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), json.dumps(cases)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=ENGINE_RUN_TIMEOUT,
    )
    output = result.stdout
    assert result.returncode == 0, output[-5000:]
    outcomes: dict[str, object] = {}
    for line in output.splitlines():
        if m := re.match(r"== RESULT (\S+) (.*)$", line):
            outcomes[m.group(1)] = json.loads(m.group(2))["tokens"]
        elif m := re.match(r"== FAILED (\S+) (.*)$", line):
            outcomes[m.group(1)] = f"FAILED {m.group(2)}"
    return output, outcomes


def case_output(output: str, name: str) -> str:
    """The part of the engine script's output that belongs to case `name`."""
    start = output.index(f"== CASE {name}\n")
    end = output.find("== CASE ", start + 1)
    return output[start : end if end >= 0 else len(output)]


def case_digests(output: str, name: str) -> list[dict[str, str]]:
    """The parameter digests of case `name`'s workers, in rank order."""
    m = re.search(rf"^== DIGESTS {re.escape(name)} (.*)$", output, re.MULTILINE)
    assert m is not None, case_output(output, name)[-4000:]
    digests: list[dict[str, str]] = json.loads(m.group(1))
    return digests


def publish(directory: Path, uri: str, env: dict[str, str], *options: str) -> None:
    """`blob2gpu publish DIRECTORY URI [OPTIONS]`, as a user publishes a checkpoint."""
    subprocess.run(
        [sys.executable, "-m", "blob2gpu", "publish", *options, str(directory), uri],
        env=env,
        check=True,
    )


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
