"""What every ``servemesh`` subcommand shares: its parser (one-line usage errors, defaults in the
help), the common flags, checked argument types, the registry connection, and the error boundary
that turns any failure into one line and an exit code (2: usage, 1: runtime, 130: interrupted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NoReturn, TypeVar

from pydantic import ValidationError

from broker.connection import Connection
from broker.provision import check_provisioned
from broker.registry import Registry
from broker.settings import Settings
from schemas.errors import MeshError
from schemas.subjects import PRIORITIES

__all__ = [
    "CliError", "Parser", "UsageError", "add_common_flags", "command_group", "common_flags", "guarded", "kv_pairs",
    "on_registry",
    "print_json", "priorities", "require_provisioned",
]  # fmt: skip

T = TypeVar("T")


class UsageError(Exception):
    """The command line asks for something that cannot be (exit code 2)."""


class CliError(Exception):
    """What the command was asked to do cannot be done now (exit code 1)."""


class _Help(argparse.HelpFormatter):
    """Each option's default after its help, where it has one worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or not action.option_strings or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with a usage error on one line, and every option's default in its help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def common_flags(top: bool = False) -> Parser:
    """Flags every command takes, before or after its name. The top parser's copy carries the
    defaults; the subcommands' copies (their own action objects) leave unset what was not given,
    so that a flag given before the subcommand is not reset by it."""
    unset: Any = None if top else argparse.SUPPRESS
    flag: Any = False if top else argparse.SUPPRESS
    common = Parser(add_help=False)
    common.add_argument("--nats", default=unset, help="NATS URL (default: $SERVEMESH_NATS_URL)")
    common.add_argument("--log-level", default=unset, help="DEBUG, INFO, WARNING or ERROR")
    common.add_argument("--log-json", action="store_true", default=flag, help="logs as JSON lines")
    common.add_argument("--debug", action="store_true", default=flag,
                        help="show the traceback of an error (also SERVEMESH_DEBUG=1)")  # fmt: skip
    return common


def add_common_flags(parsers: Iterable[argparse.ArgumentParser]) -> None:
    for parser in parsers:
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def command_group(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    name: str,
    about: str,
    common: Parser,
    dest: str,
) -> Callable[[str, str], argparse.ArgumentParser]:
    """``servemesh NAME ACTION ...``: returns what adds an action (each with the common flags and --json)."""
    group = sub.add_parser(name, help=about, description=about, parents=[common])
    actions = group.add_subparsers(dest=dest, required=True, metavar="ACTION", parser_class=Parser)

    def action(verb: str, what: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(verb, help=what, description=what, parents=[common])
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        return parser

    return action


def priorities(text: str) -> list[str]:
    """``high,normal,low`` (any subset), checked."""
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PRIORITIES]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"{text!r}: give some of {','.join(PRIORITIES)}")
    return chosen


def kv_pairs(text: str) -> dict[str, str]:
    """``k=v,...`` → a dict; anything else is a usage error."""
    pairs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"expected key=value, got {item!r}")
        pairs[key.strip()] = value.strip()
    return pairs


def print_json(result: Any) -> None:
    print(json.dumps(result, indent=2))


async def on_registry(nats_url: str | None, call: Callable[[Registry], Awaitable[T]]) -> T:
    """Connect, check that the mesh is provisioned, run ``call`` on its registry, disconnect."""
    conn = await Connection.open(Settings.from_env(nats_url=nats_url), name="servemesh-cli")
    try:
        await require_provisioned(conn)
        return await call(await Registry.open(conn))
    finally:
        await conn.close()


async def require_provisioned(conn: Connection) -> None:
    """A command-line tool changes no stream or bucket: on a mesh not provisioned yet it says how to
    provision it and exits (``servemesh provision`` is the admin step)."""
    missing, _ = await check_provisioned(conn)
    if missing:
        url = conn.settings.nats_url
        raise CliError(f"the mesh at {url} is not provisioned (missing {', '.join(missing)}): "
                       f"run `servemesh provision --nats {url}` as the admin")  # fmt: skip


def _one_line(exc: BaseException) -> tuple[str, int]:
    """What the user reads of ``exc``, and the exit code."""
    if isinstance(exc, UsageError):
        return f"error: {exc}", 2
    if isinstance(exc, CliError):
        return f"error: {exc}", 1
    if isinstance(exc, MeshError):
        stage = exc.data.get("stage")
        where = f" (stage {stage})" if stage and str(stage) not in exc.message else ""
        return f"error {exc.status} ({exc.code}): {exc.message}{where}", 1
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first.get("loc", ())) or exc.title
        return f"error: {field}: {first.get('msg', exc)}", 1
    if isinstance(exc, OSError) and exc.strerror:
        target = f"{exc.filename}: " if exc.filename else ""
        return f"error: {target}{exc.strerror.lower()}", 1
    return f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1


def guarded(run: Callable[[], int], prog: str, debug: bool, as_json: bool = False) -> int:
    """Run a command; whatever goes wrong becomes one line on stderr (a JSON error on stdout with
    ``--json``) and an exit code. ``debug`` lets the traceback through."""
    debug = debug or os.environ.get("SERVEMESH_DEBUG", "").lower() in ("1", "true", "yes")
    try:
        return run()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): nothing more to say to it
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except SystemExit:
        raise
    except Exception as exc:
        if debug:
            raise
        line, code = _one_line(exc)
        if as_json and isinstance(exc, MeshError):
            print(json.dumps(exc.to_wire()))
        else:
            print(f"{prog}: {line}", file=sys.stderr)
        return code
