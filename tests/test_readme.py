"""The README works as written: its Python blocks run, and the commands and flags it shows exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from models import evaluate, prepare_ma52, train

REPO_ROOT = Path(__file__).resolve().parents[1]
README = (REPO_ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, re.S)
SCRIPTS = {
    "models/train.py": train.parse_args,
    "models/evaluate.py": evaluate.parse_args,
    "models/prepare_ma52.py": prepare_ma52.main,
}


def test_the_readme_has_blocks_to_check():
    assert len(PYTHON_BLOCKS) >= 2 and len(BASH_BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs_and_gives_finite_results(index):
    namespace: dict = {}
    torch.manual_seed(index)
    exec(compile(PYTHON_BLOCKS[index], f"README.md python block {index}", "exec"), namespace)
    results = [value for value in namespace.values() if isinstance(value, torch.Tensor)]
    assert results and all(torch.isfinite(t).all() for t in results if t.is_floating_point())


def _commands():
    for block in BASH_BLOCKS:
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            for command in filter(None, (part.strip() for part in line.split("&&"))):
                yield shlex.split(command.replace("[", "").replace("]", ""))


def test_every_command_names_an_existing_file():
    for words in _commands():
        for word in words:
            if word.endswith((".py", ".sh")) and not word.startswith("-"):
                assert (REPO_ROOT / word).is_file(), f"the README runs {word}, which does not exist"


def _help(script: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script](["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_every_documented_flag_exists(capsys):
    """Flags in commands belong to their script; flags the text names belong to train.py."""
    helps = {script: _help(script, capsys) for script in SCRIPTS}
    checked = 0
    for words in _commands():
        script = next((word for word in words if word in SCRIPTS), None)
        if script is None:
            continue
        for word in words[words.index(script) + 1 :]:
            if word.startswith("--"):
                assert re.search(rf"{re.escape(word)}\b", helps[script]), f"{script} has no {word}"
                checked += 1
    assert checked >= 8
    for flag in sorted(set(re.findall(r"`(--[a-z][a-z0-9-]*)", README))):
        assert re.search(rf"{re.escape(flag)}\b", helps["models/train.py"]), f"models/train.py has no {flag}"


def test_train_commands_parse():
    for words in _commands():
        if "models/train.py" in words:
            train.parse_args(words[words.index("models/train.py") + 1 :])
