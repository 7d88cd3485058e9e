"""The blob2gpu command line.

    blob2gpu load [URI]            load a checkpoint, show progress, print the phase table
    blob2gpu fetch-aux [URI] DIR   download config, tokenizer and other non-weight files
    blob2gpu preflight             check a node before rollout (exit 1 when a check fails)
    blob2gpu config show           the effective settings and where each came from
    blob2gpu report show FILE      a load report's phases and shards (--png: a timeline picture)
    blob2gpu publish DIR URI       upload a checkpoint and its integrity manifest
    blob2gpu manifest URI          write the manifest of a checkpoint already in Blob
    blob2gpu cache ls|verify|prune the NVMe cache tier
    blob2gpu cache warm URI        fill the NVMe cache with a checkpoint without loading it
    blob2gpu bench URI             compare load strategies phase by phase (the case study's table)
    blob2gpu coldstart URI         build a transformers model from Blob, time its first token
    blob2gpu demo                  write a small checkpoint and load it
    blob2gpu emulator              run a local Azurite (blob service) until Ctrl-C

Errors print one line on stderr and exit 2; Ctrl-C prints one line and exits 130.
"""

from blob2gpu.cli.arguments import build_parser
from blob2gpu.cli.entry import main

__all__ = ["build_parser", "main"]
