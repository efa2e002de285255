"""Exceptions with messages meant for the person at the keyboard."""


class VaelabError(Exception):
    """Base class: bad input that vaelab detected before (or instead of) doing work."""


class ConfigError(VaelabError, ValueError):
    """A config field or CLI option has a value vaelab cannot use."""


class DataError(VaelabError):
    """A dataset is missing, corrupt, or does not match what the model expects."""
