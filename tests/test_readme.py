"""The README's config reference lists every config key with its real default, and nothing else."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import yaml

from ecapa_accel.config import Config

README = Path(__file__).resolve().parents[1] / "README.md"


def config_defaults(cls=Config, prefix: str = "") -> dict[str, object]:
    """Dotted key -> default for every leaf of the config dataclasses (list entries as `key[].field`)."""
    hints = typing.get_type_hints(cls)
    found = {}
    for field in dataclasses.fields(cls):
        key, kind = f"{prefix}{field.name}", hints[field.name]
        if dataclasses.is_dataclass(kind):
            found.update(config_defaults(kind, key + "."))
        elif typing.get_origin(kind) is list and dataclasses.is_dataclass(typing.get_args(kind)[0]):
            found.update(config_defaults(typing.get_args(kind)[0], key + "[]."))
        else:
            found[key] = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return found


def test_config_reference_matches_the_dataclasses():
    rows = re.findall(r"^\| `([a-z0-9_.\[\]]+)` \| (.+?) \| (.+?) \|$", README.read_text(), flags=re.MULTILINE)
    documented = {key: default for key, default, _ in rows if "." in key}
    expected = config_defaults()
    assert documented.keys() == expected.keys()
    for key, cell in documented.items():
        if cell == "(required)":
            assert expected[key] == "", key
        else:
            assert yaml.safe_load(cell.strip("`")) == expected[key], key


def test_readme_opens_with_the_two_commands():
    block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ['pip install -e ".[dev]" && ecapa-accel demo', "pytest"]
