"""Every imagescaler-admin / imagescaler-client command the docs show parses with the real tool.

docs/deployment.md showed `revoke --revocation-store URL`, an option that never existed.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tools import admin, client

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/deployment.md")
FENCED = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`]+)`")
COMMAND = re.compile(r"imagescaler-(admin|client)\b([^#<>|]*)")
# Placeholders the docs use where a real value would not parse.
PLACEHOLDERS = {"EXP": "1767225600"}
# As in the API pod, where the docs run `revoke` without --revocations.
POD_ENV = {"IMAGESCALER_REVOCATIONS": "redis://redis:6379/1"}


def commands(text: str) -> list[tuple[str, list[str]]]:
    """(tool, argv) of each command in code blocks, and in inline code when it has options
    (`imagescaler-admin inspect` in prose is a mention, not a command)."""
    blocks = [b.replace("\\\n", " ") for b in FENCED.findall(text)]
    lines = [(ln, True) for b in blocks for ln in b.splitlines()]
    spans = [(s.replace("\n", " "), False) for s in INLINE.findall(FENCED.sub("", text))]
    found = []
    for line, fenced in [*lines, *spans]:
        for tool, rest in COMMAND.findall(line):
            argv = [PLACEHOLDERS.get(a, a) for a in shlex.split(rest)]
            if fenced or any(a.startswith("-") for a in argv):
                found.append((tool, argv))
    return found


DOCUMENTED = [(doc, *cmd) for doc in DOCS for cmd in commands((ROOT / doc).read_text())]


def test_the_docs_show_the_commands_checked_here() -> None:
    shown = {(tool, argv[0]) for _, tool, argv in DOCUMENTED if tool == "admin"}
    assert {("admin", c) for c in ("keygen", "mint", "certs", "revoke", "tenants")} <= shown
    assert sum(tool == "client" for _, tool, _ in DOCUMENTED) >= 3


@pytest.mark.parametrize(
    ("doc", "tool", "argv"), DOCUMENTED, ids=[f"{d}: {t} {' '.join(a)}" for d, t, a in DOCUMENTED]
)
def test_documented_command_parses(doc: str, tool: str, argv: list[str]) -> None:
    if tool == "admin":
        parser, env = admin.build_parser(POD_ENV)
        env.resolve(parser.parse_args(argv))
    else:
        client.parser().parse_args(argv)
