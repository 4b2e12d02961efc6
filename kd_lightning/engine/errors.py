"""Errors raised for bad user input, reported as one line naming the config key and the fix."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and how to fix it."""
