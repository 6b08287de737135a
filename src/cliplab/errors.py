"""User-facing errors: the CLI prints them as one line, never as a traceback."""


class CliplabError(Exception):
    """An error caused by the user's input (bad path, corrupt file, bad config)."""


class DataError(CliplabError):
    """A problem with a dataset file, image or caption."""


class ConfigError(CliplabError):
    """A problem with a configuration value."""


class NumericError(CliplabError):
    """A computed value is NaN or infinite (embeddings, scores, a training loss): refused, never scored."""
