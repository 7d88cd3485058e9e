"""The Blob benchmark's stand-in ceiling clients (bench/range_get.c, bench/range_get.js), used on
GPU hosts without curl: against a real Azurite they fetch exactly the byte ranges asked for and
report status and size per request, as curl's write-out does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlparse

import pytest
from support.azurite import ACCOUNT, ACCOUNT_KEY

BENCH = Path(__file__).resolve().parents[2] / "bench"
RANGES = [(0, 99), (100, 65_635), (65_636, 299_999)]


@pytest.fixture
def blob(azurite, container):
    from azure.storage.blob import BlobSasPermissions, generate_blob_sas

    data = os.urandom(300_000)
    azurite.service().get_blob_client(container, "m/shard.safetensors").upload_blob(data)
    sas = generate_blob_sas(
        ACCOUNT,
        container,
        "m/shard.safetensors",
        account_key=ACCOUNT_KEY,
        permission=BlobSasPermissions(read=True),
        expiry=datetime.now(timezone.utc) + timedelta(hours=1),
    )
    return f"{azurite.endpoint()}/{container}/m/shard.safetensors?{sas}", data


def check(out: str, tmp_path: Path, data: bytes) -> None:
    assert out.split("\n")[:-1] == [f"206 {b - a + 1}" for a, b in RANGES]
    for i, (a, b) in enumerate(RANGES):
        assert (tmp_path / f"part{i}").read_bytes() == data[a : b + 1]


def test_range_get_c(blob, tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "no C compiler: the extension's build needs one too"
    url, data = blob
    program = tmp_path / "range_get"
    subprocess.run([cc, "-O2", "-o", str(program), str(BENCH / "range_get.c")], check=True)
    parsed = urlparse(url)
    requests = tmp_path / "requests.txt"
    requests.write_text(
        "".join(
            f"{parsed.path}?{parsed.query} {a} {b} {tmp_path / f'part{i}'}\n"
            for i, (a, b) in enumerate(RANGES)
        )
    )
    out = subprocess.run(
        [str(program), parsed.hostname, str(parsed.port), str(requests)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    check(out, tmp_path, data)


def test_range_get_js(blob, tmp_path):
    node = shutil.which("node")
    assert node, "no node on PATH: Azurite runs on it"
    url, data = blob
    requests = tmp_path / "requests.json"
    requests.write_text(
        json.dumps(
            [
                {
                    "url": url,
                    "headers": {"x-ms-range": f"bytes={a}-{b}", "x-ms-version": "2021-08-06"},
                    "ca": "",
                    "output": str(tmp_path / f"part{i}"),
                }
                for i, (a, b) in enumerate(RANGES)
            ]
        )
    )
    out = subprocess.run(
        [node, str(BENCH / "range_get.js"), str(requests)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    check(out, tmp_path, data)
