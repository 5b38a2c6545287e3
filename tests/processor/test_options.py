"""Options shared by the servers: what --help shows is what the option reads."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

import pytest

from api import config as api_config
from processor import config as processor_config
from processor.options import Options, byte_size, byte_size_text, env_name

BUILDERS = {"api": api_config.build_options, "processor": processor_config.build_options}
SHOWN_DEFAULT = re.compile(r"; default (.+?)\)(?:;|$)")


def shown_defaults(options: Options) -> dict[str, tuple[argparse.Action, str]]:
    """Each option's default as its help text writes it, by dest."""
    shown = {}
    for action in options.parser._actions:
        found = SHOWN_DEFAULT.search(action.help or "")
        if found:
            shown[action.dest] = (action, found.group(1))
    return shown


def flag_forms(action: argparse.Action, text: str) -> list[str]:
    """The command line giving ``text``: each item of a list repeats the flag."""
    flag = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        return [flag if text == "on" else action.option_strings[1]]
    items = text.split(",") if isinstance(action, argparse._AppendAction) else [text]
    return [part for item in items for part in (flag, item)]


@pytest.mark.parametrize("build", BUILDERS.values(), ids=BUILDERS.keys())
def test_every_shown_default_reads_back_as_the_default(build: Callable[[], Options]) -> None:
    """--help showed `--pad-color #RRGGBB ... default 0` and `--target-size WxH ... default
    (1024, 768)`, neither of which the option accepts."""
    options = build()
    defaults = options.parse([], environ={})
    shown = shown_defaults(options)
    assert shown.keys() == {dest for dest, value in defaults.items() if value not in (None, [], "")}
    for dest, (action, text) in shown.items():
        from_env = options.parse([], environ={env_name(action.option_strings[0]): text})
        from_flags = options.parse(flag_forms(action, text), environ={})
        assert from_env[dest] == from_flags[dest] == defaults[dest], (dest, text)


def test_defaults_are_shown_as_operators_write_them() -> None:
    api = {dest: text for dest, (_, text) in shown_defaults(api_config.build_options()).items()}
    assert api["target_size"] == "1024x768"
    assert api["pad_color"] == "#000000"
    assert api["max_input_bytes"] == "32MB"
    assert api["processor_bytes_in_flight"] == "64MB"
    assert api["allow_source_port"] == "80,443"


@pytest.mark.parametrize("value", [1, 1000, 1024, 1536, 32 << 20, 320 << 20, 1 << 30, 3 << 30])
def test_byte_size_text_reads_back(value: int) -> None:
    assert byte_size(byte_size_text(value)) == value
