"""Command-line options that are also environment variables and config-file keys.

Every option ``--some-flag`` can be given as ``IMAGESCALER_SOME_FLAG`` or as ``some-flag``
(or ``some_flag``) in a TOML file named by ``--config``. Flags win over the environment,
the environment over the file, the file over built-in defaults. Each service builds its
typed settings object from the ``dict`` that :func:`parse` returns.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ENV_PREFIX = "IMAGESCALER_"


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true/false, got {text!r}")


@dataclass(frozen=True)
class _Spec:
    flag: str
    dest: str
    default: Any
    convert: Callable[[str], Any]
    kind: str  # "value", "bool" or "list"


class Options:
    """An argparse parser whose options also come from the environment and a config file."""

    def __init__(self, prog: str, description: str) -> None:
        self.parser = argparse.ArgumentParser(
            prog=prog,
            description=description,
            argument_default=argparse.SUPPRESS,
            epilog="Every option is also an environment variable (IMAGESCALER_ plus the flag in "
            "upper snake case) and a key of the TOML file given by --config. Precedence: "
            "flags, then environment, then config file, then defaults.",
        )
        self.parser.add_argument(
            "--config", metavar="FILE", help=f"TOML config file (env {env_name('config')})"
        )
        self._specs: list[_Spec] = []

    def add(
        self,
        flag: str,
        default: Any,
        help: str,
        convert: Callable[[str], Any] = str,
        metavar: str | None = None,
        kind: str = "value",
        show: Callable[[Any], str] = str,
    ) -> None:
        """Register ``--flag``; ``convert`` turns a string (flag, env or file) into the value,
        ``show`` a value (a list's item) back into that string, for the help's default."""
        dest = flag.replace("-", "_")
        shown = "" if default in (None, [], "") else f"; default {_show(default, show)}"
        text = f"{help} (env {env_name(flag)}{shown})"
        if kind == "bool":
            self.parser.add_argument(
                f"--{flag}", dest=dest, action=argparse.BooleanOptionalAction, help=text
            )
        else:
            self.parser.add_argument(
                f"--{flag}",
                dest=dest,
                type=_argparse_type(flag, _items(convert) if kind == "list" else convert),
                metavar=metavar,
                action="extend" if kind == "list" else "store",
                help=text + ("; repeatable or comma-separated" if kind == "list" else ""),
            )
        self._specs.append(_Spec(flag, dest, default, convert, kind))

    def parse(
        self, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Resolve every option; exit with status 2 and a message naming the option on error."""
        environ = os.environ if environ is None else environ
        given = vars(self.parser.parse_args(sys.argv[1:] if argv is None else list(argv)))
        config_path = given.get("config") or environ.get(env_name("config"))
        file_values = self._read_config(config_path) if config_path else {}
        return {spec.dest: self._resolve(spec, given, environ, file_values) for spec in self._specs}

    def fail(self, message: str) -> None:
        self.parser.error(message)

    def build(
        self,
        factory: Callable[..., T],
        argv: Sequence[str] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> T:
        """Parse, then build the frozen settings object; its ValueError exits naming the option."""
        values = {
            key: tuple(value) if isinstance(value, list) else value
            for key, value in self.parse(argv, environ).items()
        }
        try:
            return factory(**values)
        except ValueError as exc:
            self.fail(str(exc))
            raise

    def add_lifecycle(self) -> None:
        """Options every server has: drain timing and log level."""
        self.add(
            "grace",
            25.0,
            "seconds in-flight requests get to finish on SIGTERM",
            seconds,
            "SECONDS",
        )
        self.add(
            "drain-delay",
            1.0,
            "seconds between reporting NOT_SERVING and refusing new "
            "calls on SIGTERM, so balancers route elsewhere first",
            pause_seconds,
            "SECONDS",
        )
        self.add(
            "log-level",
            "info",
            "debug, info, warning or error",
            choice("debug", "info", "warning", "error"),
            "LEVEL",
        )

    def _resolve(
        self, spec: _Spec, given: dict[str, Any], environ: Mapping[str, str], file: dict[str, Any]
    ) -> Any:
        if spec.dest in given:
            return given[spec.dest]
        name = env_name(spec.flag)
        if name in environ:
            return self._convert(spec, environ[name], name)
        for key in (spec.flag, spec.dest):
            if key in file:
                return self._convert(spec, file[key], f"{key} in the config file")
        return spec.default

    def _convert(self, spec: _Spec, raw: Any, where: str) -> Any:
        try:
            if spec.kind == "bool":
                return raw if isinstance(raw, bool) else parse_bool(str(raw))
            if spec.kind == "list":
                items = raw if isinstance(raw, list) else str(raw).split(",")
                return [spec.convert(str(item).strip()) for item in items if str(item).strip()]
            return spec.convert(str(raw))
        except (ValueError, TypeError) as exc:
            self.fail(f"{where} (--{spec.flag}): {exc}")
            raise AssertionError("unreachable") from exc

    def _read_config(self, path: str) -> dict[str, Any]:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            self.fail(f"--config {path}: {exc}")
            raise AssertionError("unreachable") from exc
        known = {key for spec in self._specs for key in (spec.flag, spec.dest)}
        unknown = sorted(set(data) - known)
        if unknown:
            self.fail(f"--config {path}: unknown option(s) {', '.join(unknown)}")
        return data


def _items(convert: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """A list option's flag value: one item or several, comma-separated as in env/file."""
    return lambda text: [convert(item.strip()) for item in text.split(",") if item.strip()]


def _argparse_type(flag: str, convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def checked(text: str) -> Any:
        try:
            return convert(text)
        except (ValueError, TypeError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    checked.__name__ = flag  # argparse names the type in its error message
    return checked


def _show(value: Any, show: Callable[[Any], str]) -> str:
    """A default as the option reads it (switches and lists as in the environment)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(show, value))
    return show(value)


# Converters shared by the services' settings.


def host_port(text: str) -> str:
    """``HOST:PORT`` (``[::1]:P`` for IPv6); port 0 picks a free port."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return text


def size(text: str) -> tuple[int, int]:
    """``WxH`` with both sides positive and at most 16384."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise ValueError(f"expected WIDTHxHEIGHT such as 1024x768, got {text!r}")
    w, h = int(width), int(height)
    if not (0 < w <= 16384 and 0 < h <= 16384):
        raise ValueError(f"both sides must be between 1 and 16384, got {text!r}")
    return w, h


def size_text(value: tuple[int, int]) -> str:
    """What :func:`size` reads back as ``value``."""
    return f"{value[0]}x{value[1]}"


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"port must be 0-65535, got {value}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"must be a positive integer, got {value}")
    return value


# gRPC takes durations as int32 milliseconds (24.8 days): a longer one is an OverflowError.
MAX_SECONDS = 7 * 86400.0
# A request is one gRPC message, and channel limits are int32 bytes (with our envelope).
MAX_INPUT_BYTES = 1 << 30


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise ValueError(f"must be positive and finite, got {text}")
    return value


def seconds(text: str) -> float:
    """A duration: positive, at most a week (gRPC's limit is int32 milliseconds)."""
    value = positive_float(text)
    if value > MAX_SECONDS:
        raise ValueError(f"at most {MAX_SECONDS:g} seconds, got {text}")
    return value


def pause_seconds(text: str) -> float:
    """A pause that may be zero (``time.sleep`` refuses a negative one mid-drain)."""
    value = float(text)
    if not 0 <= value <= MAX_SECONDS:
        raise ValueError(f"must be between 0 and {MAX_SECONDS:g} seconds, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be 0 or more, got {value}")
    return value


def byte_size(text: str) -> int:
    """A byte count with an optional ``KB``/``MB``/``GB`` (binary) suffix, e.g. ``32MB``."""
    units = {
        "": 1,
        "B": 1,
        "KB": 1 << 10,
        "K": 1 << 10,
        "MB": 1 << 20,
        "M": 1 << 20,
        "GB": 1 << 30,
        "G": 1 << 30,
    }
    stripped = text.strip().upper()
    digits = stripped.rstrip("KMGB")
    unit = stripped[len(digits) :]
    if not digits.isdigit() or unit not in units:
        raise ValueError(f"expected a byte size such as 32MB, got {text!r}")
    value = int(digits) * units[unit]
    if value <= 0:
        raise ValueError(f"must be positive, got {text!r}")
    return value


def byte_size_text(value: int) -> str:
    """What :func:`byte_size` reads back as ``value``, in the largest exact unit (``32MB``)."""
    for unit, factor in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if value and value % factor == 0:
            return f"{value // factor}{unit}"
    return str(value)


def choice(*allowed: str) -> Callable[[str], str]:
    """Case-insensitive choice, returned in its canonical spelling."""
    canonical = {name.lower(): name for name in allowed}

    def convert(text: str) -> str:
        lowered = text.strip().lower()
        if lowered not in canonical:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {text!r}")
        return canonical[lowered]

    return convert


def quality(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise ValueError(f"quality must be 1-100, got {value}")
    return value


def existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise ValueError(f"no such file: {text}")
    return text
