"""The one exception type that `framepack.io` raises for bad user input."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input (a path, a size, a file); the message is one sentence a CLI can print as is."""


class InputWarning(UserWarning):
    """Input that was used with a change (a frame dropped, a prompt cut); one sentence to show."""
