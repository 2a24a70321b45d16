"""The user-facing error every layer raises for bad input: the CLI prints its message as one line and exits 2."""
from __future__ import annotations


class ConfigError(ValueError):
    """A user-facing configuration or input error; the message names the key (or file) and the bad value."""
