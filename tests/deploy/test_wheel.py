"""The container's install, done for real without Docker: copy what the Dockerfile copies, build
the wheel, install it with the pinned constraints into a fresh venv (the Dockerfile's own pip
arguments), then run every console script's ``--help`` from that venv. The wheel must also carry
the package data the scripts read at run time (imagescaler-bench's photos).

Slow (about a minute). The dependencies come from local wheels, never the package index (tests
talk to loopback only): ``make install`` downloads them into ``.venv/wheelhouse``;
``IMAGESCALER_WHEELHOUSE=DIR`` names another folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

from tests.deploy.test_dockerfile import DOCKERFILE, pip_install_args, stages
from tools import bench

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def run(*command: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def copy_build_context(dest: Path) -> None:
    """What the builder stage's COPY lines bring in, nothing else (no stale build/ dirs)."""
    builder = stages(DOCKERFILE.read_text())[0]
    for copy in builder.all("COPY"):
        *sources, _ = copy.split()
        for source in sources:
            path = ROOT / source.rstrip("/")
            if path.is_dir():
                shutil.copytree(
                    path, dest / path.name, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy2(path, dest / path.name)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our wheel, built from what the Dockerfile copies, as in its builder stage."""
    work = tmp_path_factory.mktemp("image")
    src, dist = work / "src", work / "dist"
    src.mkdir()
    copy_build_context(src)
    # The image builds with an isolated build env; here the dev venv's setuptools does it
    # (no index needed for this step).
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
        "--wheel-dir", dist, ".", cwd=src)  # fmt: skip
    (built,) = dist.glob("imagescaler-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path) -> Path:
    """A venv holding the wheel and its pinned dependencies, as /opt/imagescaler in the image."""
    src, env_dir = wheel.parents[1] / "src", wheel.parents[1] / "venv"
    venv.create(env_dir, with_pip=True)
    args = [
        a for a in pip_install_args(stages(DOCKERFILE.read_text())[0]) if not a.endswith(".whl")
    ]
    wheelhouse = os.environ.get("IMAGESCALER_WHEELHOUSE") or str(ROOT / ".venv" / "wheelhouse")
    assert Path(wheelhouse).is_dir(), f"no wheelhouse at {wheelhouse}: run make install"
    args += ["--no-index", "--find-links", wheelhouse]
    run(env_dir / "bin" / "pip", "install", "--quiet", *args, wheel, cwd=src)
    return env_dir


def scripts() -> dict[str, str]:
    return dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def clean_env() -> dict[str, str]:
    """No PYTHONPATH or working-tree imports: the venv must stand on its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "IMAGESCALER_"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@pytest.mark.parametrize("script", sorted(scripts()))
def test_console_script_runs_from_the_installed_wheel(installed: Path, script: str) -> None:
    out = run(installed / "bin" / script, "--help", cwd=installed, env=clean_env())
    assert out.startswith("usage:") and script in out.split("\n")[0]


def test_every_installed_dependency_is_pinned(installed: Path) -> None:
    """A runtime dependency added to pyproject.toml but not to constraints.txt fails here."""
    listing = run(installed / "bin" / "python", "-m", "pip", "list", "--format=json")
    have = {canonical(p["name"]): p["version"] for p in json.loads(listing)}
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonical(name)] = version
    for name in set(have) - {"imagescaler", "pip", "setuptools", "wheel"}:
        assert pins.get(name) == have[name], f"pin {name}=={have[name]} in constraints.txt"
    run(installed / "bin" / "python", "-m", "pip", "check")


def test_wheel_holds_only_our_packages(installed: Path) -> None:
    site = next(installed.glob("lib/python3*/site-packages"))
    (record,) = site.glob("imagescaler-*.dist-info/RECORD")
    tops = {line.split("/")[0] for line in record.read_text().splitlines()}
    packages = {t for t in tops if not t.endswith(".dist-info") and not t.startswith("..")}
    assert packages == {"api", "processor", "auth", "tools"}
    assert list(site.glob("api/pb/*.pyi")), "type stubs ship with the generated code"


def test_wheel_ships_the_benchmark_photos(wheel: Path) -> None:
    """imagescaler-bench reads its photos from beside itself (``--data`` defaults there)."""
    folder = bench.DATA_DIR.relative_to(ROOT).as_posix()
    needed = {f"{folder}/{w.file}" for w in bench.WORKLOADS.values()}
    with zipfile.ZipFile(wheel) as archive:
        missing = needed - set(archive.namelist())
    assert not missing, f"not in the wheel (package data in pyproject.toml): {sorted(missing)}"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
