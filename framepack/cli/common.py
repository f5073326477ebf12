"""What the `framepack` subcommands share: their errors, how one runs, their model and device options.

Bad input is a `UserError`: one sentence on stderr and exit status 2, never a traceback
(`run_command`). The subcommand modules import this module; `cli/main.py` imports them.
"""

from __future__ import annotations

import argparse
import sys

from ..devices import resolve_device
from .interrupts import interrupted, sigint_remembered

__all__ = [
    "DEVICE_HELP",
    "MODEL_HELP",
    "Interrupted",
    "UserError",
    "add_device_argument",
    "add_model_argument",
    "cli_device",
    "cli_model",
    "run_command",
]

MODEL_HELP = "bundle directory or named bundle (hunyuan-i2v, hunyuan-f1); default: the shipped demo model"
DEVICE_HELP = "cpu, cuda, cuda:1 ... (auto: cuda when available)"


class UserError(Exception):
    """Bad input; the message is shown to the user as one sentence."""


class Interrupted(UserError):
    """Ctrl-C, with what was kept; shown as one sentence, exit status 130 (128 + SIGINT)."""


def run_command(func, args: argparse.Namespace) -> int:
    """Run a subcommand: bad input becomes one sentence on stderr and exit status 2 (130 for Ctrl-C).

    A Ctrl-C ends it with 130 whatever became of its KeyboardInterrupt (`cli.interrupts`): one
    that a library swallowed or turned into its own error included."""
    with sigint_remembered():
        try:
            func(args)
        except Interrupted as e:
            return _say(str(e), 130)
        except KeyboardInterrupt:
            return _say("interrupted.", 130)
        except UserError as e:
            return _say("interrupted." if interrupted() else str(e), 130 if interrupted() else 2)
        except Exception:
            if not interrupted():
                raise
            return _say("interrupted.", 130)
        return _say("interrupted.", 130) if interrupted() else 0


def _say(message: str, code: int) -> int:
    print(f"framepack: {message}", file=sys.stderr)
    return code


def add_model_argument(p: argparse.ArgumentParser, help: str = MODEL_HELP) -> None:
    """`--model`: a bundle directory or a named bundle (`cli_model` fills in the default)."""
    p.add_argument("--model", help=help)


def add_device_argument(p: argparse.ArgumentParser, help: str = DEVICE_HELP) -> None:
    """`--device`, "auto" by default (`cli_device` resolves it)."""
    p.add_argument("--device", default="auto", help=help)


def cli_model(model: str | None) -> str:
    """The `--model` given, else the shipped demo bundle's path; a `UserError` if that is missing."""
    from ..pipeline.named import model_or_default

    try:
        return model_or_default(model)
    except ValueError as e:
        raise UserError(str(e)) from None


def cli_device(name: str) -> str:
    """The torch device a `--device` name stands for (`resolve_device`); a `UserError` if none."""
    try:
        return resolve_device(name)
    except ValueError as e:
        raise UserError(str(e)) from None
