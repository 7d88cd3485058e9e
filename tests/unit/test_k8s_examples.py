"""The Kubernetes example stays true: every variable it sets is one blob2gpu reads, and its config
file is valid for the settings schema."""

from __future__ import annotations

from pathlib import Path

import yaml
from blob2gpu.settings import OTHER_ENVIRONMENT, SCHEMA, read_config_file

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "k8s"


def documents():
    for path in sorted(EXAMPLES.glob("*.yaml")):
        yield from (d for d in yaml.safe_load_all(path.read_text()) if d)


def known_variables() -> set[str]:
    names = {s.env for s in SCHEMA} | {a.name for s in SCHEMA for a in s.aliases}
    return names | set(OTHER_ENVIRONMENT)


def test_every_variable_is_one_blob2gpu_reads():
    found = set()
    for doc in documents():
        if doc["kind"] != "Deployment":
            continue
        spec = doc["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            found |= {e["name"] for e in c.get("env", [])}
    assert {"MODEL_LOAD_STRATEGY", "MODEL_SOURCE_URI", "USE_PINNED_HOST_FALLBACK"} <= found
    assert found <= known_variables(), found - known_variables()


def test_the_config_map_is_a_valid_settings_file(tmp_path):
    config = next(d for d in documents() if d["kind"] == "ConfigMap")
    path = tmp_path / "blob2gpu.yaml"
    path.write_text(config["data"]["blob2gpu.yaml"])
    values = read_config_file(path)
    assert values["local_nvme_cache_enabled"] is True and values["shard_count"] == 16


def test_preflight_runs_as_an_init_container():
    deployment = next(d for d in documents() if d["kind"] == "Deployment")
    init = deployment["spec"]["template"]["spec"]["initContainers"]
    assert init[0]["command"][:2] == ["blob2gpu", "preflight"]


def test_every_blob2gpu_command_is_one_the_cli_accepts():
    from blob2gpu.cli import build_parser

    deployment = next(d for d in documents() if d["kind"] == "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    commands = [c["command"] for c in spec["initContainers"] + spec["containers"] if "command" in c]
    assert [c[1] for c in commands] == ["preflight", "fetch-aux"]
    for command in commands:
        build_parser().parse_args(command[1:])  # argparse exits on anything it does not accept


def test_the_vllm_deployment_serves_with_the_blob2gpu_load_format():
    import json

    from blob2gpu.cli import build_parser
    from blob2gpu.integrations.vllm.options import VllmLoadOptions

    deployment = next(d for d in documents() if d["metadata"]["name"] == "vllm-blob2gpu")
    spec = deployment["spec"]["template"]["spec"]
    fetch = spec["initContainers"][0]["command"]
    build_parser().parse_args(fetch[1:])
    container = spec["containers"][0]
    # The command empties the metrics directory, then runs the arguments.
    assert container["command"][:2] == ["sh", "-c"] and 'exec "$@"' in container["command"][2]
    assert "PROMETHEUS_MULTIPROC_DIR" in container["command"][2]
    assert {"name": "PROMETHEUS_MULTIPROC_DIR", "value": "/prometheus"} in container["env"]
    serve = container["args"]
    assert serve[:3] == ["vllm", "serve", fetch[-1]]  # the directory the init container filled
    assert serve[serve.index("--load-format") + 1] == "blob2gpu"
    extra = json.loads(serve[serve.index("--model-loader-extra-config") + 1])
    assert VllmLoadOptions.from_extra_config(extra).settings["local_nvme_cache_enabled"] is True
