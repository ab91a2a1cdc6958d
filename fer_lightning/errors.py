"""Errors a user can cause; they import nothing else from the package, so every layer may raise them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value outside its allowed range; the message names the key."""
