"""``python -m lora_lab``: the demo runs, and bad arguments are one-line argparse errors
(exit 2) given before anything trains."""

import os
import subprocess
import sys

import pytest


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lora_lab", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def test_demo_trains_and_writes_its_files(tmp_path):
    out = tmp_path / "demo"
    done = run("demo", "--steps", "3", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "before:" in done.stdout and "after:" in done.stdout
    assert sorted(os.listdir(out)) == ["demo_lora_3_steps_00001_.safetensors", "loss.png"]


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    return str(path)


@pytest.mark.parametrize("args,message", [
    (["demo", "--steps", "0"], "argument --steps: '0' is not a step count; use 1..100000"),
    (["demo", "--steps", "many"], "argument --steps: 'many' is not a step count"),
    (["demo", "--out", "/proc/lora_lab_forbidden"], "argument --out: cannot write into"),
    (["demo", "--out", "FILE"], "is a file; give a folder"),
    (["demo", "--bogus"], "python -m lora_lab demo: error: unrecognized arguments: --bogus"),
    (["nonsense"], "invalid choice: 'nonsense'"),
])
def test_bad_arguments_are_one_line_errors(args, message, a_file, tmp_path):
    args = [a_file if a == "FILE" else a for a in args]
    done = run(*args, cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("usage: ") and len(lines) == 2, done.stderr
    assert message in lines[1]
    assert "Traceback" not in done.stderr and not os.listdir(tmp_path) == ["lora_lab_demo"]


def test_help_is_plain_text():
    for args in (["--help"], ["demo", "--help"]):
        done = run(*args)
        assert done.returncode == 0 and "``" not in done.stdout and "--seed" in run(
            "demo", "--help").stdout


def test_readme_quick_start_commands(tmp_path):
    """The Quick start block (what CI runs): two commands; the demo part of the first exits 0
    (shortened to 2 steps here), the second is the test run itself."""
    import pathlib
    import re
    import shlex

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Quick start\s+```\n(.*?)```", readme, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 2 and commands[1] == "python -m pytest"
    demo = shlex.split(commands[0].split("&&")[-1])
    assert demo[:4] == ["python", "-m", "lora_lab", "demo"]
    done = run(*demo[3:], "--steps", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
