"""The set-up scripts say what they are doing during their silent minutes: one `==>` line per
step, and a note when no virtualenv is active (run here with stand-ins for python and npm, so
nothing is installed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def stand_ins(tmp_path):
    log = tmp_path / "calls.log"
    for name in ("python", "npm"):
        tool = tmp_path / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n')
        tool.chmod(0o755)
    # python -c: is a virtualenv active ($STAND_IN_VENV), and its prefix.
    (tmp_path / "python").write_text(
        f'#!/bin/sh\necho "python $*" >> {log}\n'
        'case "$2" in *base_prefix*) echo "${STAND_IN_VENV:-0}" ;; *prefix*) echo /usr ;; esac\n'
    )
    return tmp_path, log


def run_script(bin_dir, script, *args, **env_vars):
    env = dict(os.environ, PYTHON=str(bin_dir / "python"), **env_vars)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env.pop("CONDA_PREFIX", None)
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("script", "args", "steps"),
    [
        ("demo.sh", [], ["build tools", "building and installing blob2gpu[azure]", "running"]),
        (
            "demo.sh",
            ["--model", "llama"],
            ["build tools", "torch 2.13.0", "blob2gpu[azure,transformers]", "running"],
        ),
        ("test.sh", [], ["torch 2.13.0", "build tools", "blob2gpu[test]", "running the tests"]),
    ],
)
def test_each_step_is_announced(stand_ins, script, args, steps):
    bin_dir, log = stand_ins
    result = run_script(bin_dir, script, *args)
    assert result.returncode == 0, result.stderr
    announced = [ln for ln in result.stderr.splitlines() if ln.startswith("==> ")]
    for step, line in zip(steps, [a for a in announced if "Azurite" not in a], strict=True):
        assert step in line
    assert "pip install" in log.read_text()  # the steps ran, with the stand-in


@pytest.mark.parametrize("script", ["demo.sh", "test.sh"])
def test_installing_outside_a_virtualenv_says_how_to_make_one_and_goes_on(stand_ins, script):
    bin_dir, log = stand_ins
    outside = run_script(bin_dir, script)
    assert outside.returncode == 0, outside.stderr
    notes = [ln for ln in outside.stderr.splitlines() if ln.startswith("note: ")]
    assert (
        len(notes) == 1 and "no virtualenv is active: installing into /usr's packages" in notes[0]
    )
    assert "python3 -m venv .venv && . .venv/bin/activate" in notes[0]
    assert "pip install" in log.read_text()  # it went on
    inside = run_script(bin_dir, script, STAND_IN_VENV="1")
    assert inside.returncode == 0 and "note: " not in inside.stderr


def test_the_readme_first_screen_says_how_to_install_run_and_test():
    readme = (ROOT / "README.md").read_text()
    first_screen = "\n".join(readme.splitlines()[:40])
    assert 'pip install "blob2gpu[azure]"' in first_screen
    for command in ("./scripts/demo.sh", "./scripts/test.sh"):  # each a line of its own
        assert f"\n{command}\n" in first_screen, command
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\n./scripts/test.sh\n" in ci  # CI runs the README's test command as written


def test_every_extra_is_named_in_the_readme():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    readme = (ROOT / "README.md").read_text()
    unnamed = [e for e in extras if e not in ("test", "dev") and f"blob2gpu[{e}]" not in readme]
    assert unnamed == []
