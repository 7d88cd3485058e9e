"""Full disks, for real: a tmpfs too small (in bytes or inodes) under the NVMe cache, under
fetch_aux's destination and under the cache commands. Loads go on from Blob with the report
saying why nothing was cached; fetch_aux and the CLI fail with LocalWriteError naming the path,
never retrying the storage for a local problem; nothing partial is left anywhere."""

from __future__ import annotations

import json
import shlex
import sys

import pytest
import torch
from conftest import checkpoint_bytes as expected
from conftest import random_tensor, upload_directory
from support.small_filesystem import run_on_small_filesystem

# Runs inside the namespace: one cached load, one fetch_aux, then what is left on the disk.
SCRIPT = r"""
import hashlib, json, os, sys
import blob2gpu

uri, root = sys.argv[1], sys.argv[2]
out = {}
with blob2gpu.open(uri, device="cpu", framework="torch", local_nvme_cache_enabled=True,
                   cache_dir=os.path.join(root, "nvme"), chunk_bytes=65536,
                   retry_backoff_seconds=0.01) as checkpoint:
    out["sha256"] = {
        name: hashlib.sha256(t.contiguous().view(-1).view(__import__("torch").uint8)
                             .numpy().tobytes()).hexdigest()
        for name, t in checkpoint.to_dict().items()
    }
    report = checkpoint.report
out["cache_written"], out["cache_skipped"] = report.cache_written, report.cache_skipped
out["requests"] = report.requests
try:
    blob2gpu.fetch_aux(uri, os.path.join(root, "aux"), retry_backoff_seconds=0.01)
    out["aux_error"] = None
except blob2gpu.errors.Blob2GpuError as e:
    out["aux_error"] = [type(e).__name__, str(e), isinstance(e, OSError)]
out["files"] = sorted(
    os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
)
print(json.dumps(out))
"""


@pytest.fixture
def published(write_checkpoint, azurite, container):
    directory = write_checkpoint(
        [{f"s{s}.w": random_tensor(torch.float32, (128, 600), s)} for s in range(3)]
    )  # 3 x 300 KB
    (directory / "config.json").write_text("{}")
    (directory / "tokenizer.json").write_text("x" * 200_000)
    upload_directory(azurite, container, directory, "m")
    return directory


def run(tmp_path, container, blob_env, **filesystem):
    script = tmp_path / "full_disk.py"
    script.write_text(SCRIPT)
    mount = tmp_path / "small"
    done = run_on_small_filesystem(
        mount, [sys.executable, str(script), f"az://{container}/m", str(mount)], **filesystem
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def sha256_of(directory):
    import hashlib

    return {n: hashlib.sha256(b).hexdigest() for n, b in expected(directory).items()}


def test_a_full_cache_disk_leaves_the_load_whole_and_says_why(
    published, container, blob_env, tmp_path
):
    out = run(tmp_path, container, blob_env, size="64k")
    assert out["sha256"] == sha256_of(published)
    assert out["cache_written"] == [] and len(out["cache_skipped"]) == 3
    assert all("No space left on device" in why for why in out["cache_skipped"].values())
    # fetch_aux: config.json and the index fitted, tokenizer.json did not; no half file is left.
    name, message, is_oserror = out["aux_error"]
    assert name == "LocalWriteError" and is_oserror
    assert "tokenizer.json" in message and "No space left on device" in message
    assert "attempts" not in message  # a local failure is not retried as a storage one
    left = [f for f in out["files"] if not f.startswith("nvme/locks/")]
    assert left == ["aux/config.json", "aux/model.safetensors.index.json"]


def test_a_cache_disk_out_of_inodes_leaves_the_load_whole_and_says_why(
    published, container, blob_env, tmp_path
):
    # Room for the cache's directories but not its lock files, then for nothing at all.
    out = run(tmp_path, container, blob_env, size="4m", inodes=5)
    assert out["sha256"] == sha256_of(published) and out["requests"] >= 3
    assert out["cache_written"] == [] and len(out["cache_skipped"]) == 3
    assert all(
        why == "cannot write to the cache: No space left on device"
        for why in out["cache_skipped"].values()
    )
    assert out["aux_error"][0] == "LocalWriteError" and "aux" in out["aux_error"][1]
    assert out["files"] == []
    out = run(tmp_path, container, blob_env, size="4m", inodes=2)
    assert out["sha256"] == sha256_of(published)
    assert all(
        why.startswith("the cache directory is unusable: No space left on device")
        for why in out["cache_skipped"].values()
    )


def test_cache_commands_name_a_directory_they_cannot_make(tmp_path):
    mount = tmp_path / "small"
    done = run_on_small_filesystem(
        mount,
        [sys.executable, "-m", "blob2gpu", "cache", "ls", "--cache-dir", str(mount / "nvme")],
        inodes=1,
    )
    assert done.returncode == 2
    assert "LocalWriteError" in done.stderr and str(mount / "nvme") in done.stderr
    assert "Traceback" not in done.stderr


def test_load_report_to_a_full_disk_fails_typed_and_leaves_no_partial_file(
    write_checkpoint, tmp_path
):
    directory = write_checkpoint([{"w": random_tensor(torch.float32, (64, 64))}])
    mount = tmp_path / "small"
    where = shlex.quote(str(mount))
    for inodes in (1, None):  # no file can be made; a file, but no room left for the report
        cli = [sys.executable, "-m", "blob2gpu", "load", str(directory), "--device", "cpu"]
        cli += ["--quiet", "--report", str(mount / "load.json")]
        fill = "" if inodes else f"head -c 1M /dev/zero > {where}/filler 2>/dev/null; "
        script = f"{fill}{shlex.join(cli)}; rc=$?; ls -A {where}; exit $rc"
        done = run_on_small_filesystem(mount, ["sh", "-c", script], size="64k", inodes=inodes)
        assert done.returncode == 2, done.stderr
        assert "LocalWriteError" in done.stderr and str(mount / "load.json") in done.stderr
        assert "Traceback" not in done.stderr
        # Nothing left on the disk but the filler: not a half report, not a temporary file.
        assert done.stdout.split() == ([] if inodes else ["filler"])
