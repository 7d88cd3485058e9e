"""What the benchmarks share, one module per concern:

    checkpoints  the generated Llama-shaped bf16 checkpoint (cached under bench/.data/), the fleet's
                 random one, and the spec every loaded tensor is checked against
    checksums    the byte checksum that tells a contestant's right bytes from wrong ones
    accounting   CPU, faults and memory of this process, a process group and the machine
    isolation    one contestant per fresh interpreter: the worker's result line and its runner
    rounds       round-robin rounds of those processes, reruns of disturbed ones, and the row
                 each contestant's processes fold into
    machine      versions, machine facts, and what making new memory resident costs here
    tables       printing result tables, ratios and target verdicts
    azurite      the tests' Azurite emulator, a checkpoint uploaded to it, a SAS for it

This file holds the paths and units they all use.
"""

from __future__ import annotations

from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = BENCH_DIR.parent
DATA_DIR = BENCH_DIR / ".data"  # generated checkpoints, cached between runs

GB = 1e9  # throughput is reported in decimal GB/s
MiB = 1 << 20
SEED = 20240611
SETTLE_S = 6.0  # > Linux's 2 s free page reporting delay, with margin
