"""The typed run configuration (models/training/config.py) and the command line derived from it."""

import dataclasses
import json
import re
import typing

import pytest

from models import train
from models.errors import ConfigError
from models.training.builders import OPTIMIZERS
from models.training.cli import build_parser, overrides_from_args
from models.training.config import FIELDS, GROUPS, TYPES, TrainConfig, choices, load_config_file, resolve_config


def _help_sections() -> dict:
    """`--help` split into its option groups: {group title: text}."""
    sections, title = {}, None
    for line in build_parser().format_help().splitlines():
        heading = re.fullmatch(r"(\w[\w ]*):", line)
        if heading:
            title = heading.group(1)
            sections[title] = ""
        elif title:
            sections[title] += line + "\n"
    return sections


def test_every_key_has_a_flag_in_its_help_group():
    sections = _help_sections()
    assert set(GROUPS) <= set(sections)
    for f in FIELDS:
        assert f.metadata["group"] in GROUPS, f.name
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        assert re.search(rf"(^|\s|,){re.escape(flag)}(\s|,|$)", sections[f.metadata["group"]], re.M), (
            f"{f.name}: {flag} not under '{f.metadata['group']}' in --help"
        )


def test_every_key_round_trips_through_its_flag():
    """Each key's flag sets exactly that key, to the value given (other than the default where
    the key has another choice)."""
    for f in FIELDS:
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        default = getattr(TrainConfig(), f.name)
        if isinstance(default, bool):
            argv, expected = ([flag] if not default else ["--no-" + flag[2:]]), not default
        elif f.metadata["choices"] and not isinstance(default, list):
            argv, expected = [flag, f.metadata["choices"][-1]], f.metadata["choices"][-1]
        elif f.name == "tfam_stages":
            argv, expected = [flag, "res4,res5"], ["res4", "res5"]
        elif f.name == "lr_milestones":
            argv, expected = [flag, "5,9"], [5, 9]
        elif f.name == "synthetic_options":
            argv, expected = [flag, '{"persons_train": 3}'], {"persons_train": 3}
        elif f.name in ("data_root", "pretrained", "out_dir"):
            argv, expected = [flag, "some/path"], "some/path"
        else:
            number = 0.5 if float in (TYPES[f.name], *typing.get_args(TYPES[f.name])) else 3
            argv, expected = [flag, str(number)], number
        assert overrides_from_args(train.parse_args(argv)) == {f.name: expected}, f.name


def test_defaults_validate_and_serialize_flat():
    cfg = TrainConfig()
    flat = cfg.to_dict()
    assert list(flat) == [f.name for f in FIELDS] and TrainConfig.from_dict(flat) == cfg
    assert json.loads(json.dumps(flat)) == flat  # what config files and checkpoints hold


def test_every_configured_optimizer_is_built():
    assert set(choices("optimizer")) == set(OPTIMIZERS)


def test_unknown_key_in_a_config_file_is_named(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"_comment": "ignored", "lr": 0.01, "learning_rate": 0.1}))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: unknown config key\(s\) \['learning_rate'\]"):
        load_config_file(path)
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['learning_rate'\]"):
        train.main(["--config", str(path)])


def test_a_choice_violation_names_key_choices_and_value(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"fusion": "max"}))
    with pytest.raises(ConfigError, match=r"config 'fusion': expected one of \('consistency', 'mean'\), got 'max'"):
        resolve_config({}, path)
    with pytest.raises(ConfigError, match=r"config 'tfam_stages': expected one of .*'res5'\), got \['res6'\]"):
        resolve_config({"tfam_stages": ["res6"]})
    with pytest.raises(SystemExit):  # argparse refuses it before the config sees it
        train.parse_args(["--optimizer", "sgd"])


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("epochs", 2.5, "expected an integer, got 2.5"),
        ("epochs", 0, "expected a value >= 1, got 0"),
        ("lr", -1e-3, "expected a value > 0, got -0.001"),
        ("lr", True, "expected a finite number, got True"),
        ("compile", "yes", "expected true or false, got 'yes'"),
        ("max_train_clips", "8", "expected an integer or null, got '8'"),
        ("lr_milestones", [30, "60"], r"expected a list of integers, got \[30, '60'\]"),
        ("synthetic_options", [], "expected a JSON object, got \\[\\]"),
    ],
)
def test_type_and_bound_errors_name_key_expectation_and_value(key, value, expected):
    with pytest.raises(ConfigError, match=rf"config '{key}': {expected}"):
        TrainConfig(**{key: value})


def test_attribute_access_and_replace_revalidate():
    cfg = TrainConfig(lr=0.5)
    assert cfg.lr == 0.5 and cfg.replace(lr=0.25).lr == 0.25
    with pytest.raises(ConfigError, match="'lr'"):
        cfg.replace(lr=0)
    assert dataclasses.is_dataclass(cfg)
