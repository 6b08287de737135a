"""User-facing errors: the CLI prints them as one line, never as a traceback."""


class CliplabError(Exception):
    """An error caused by the user's input (bad path, corrupt file, bad config)."""


class DataError(CliplabError):
    """A problem with a dataset file, image or caption."""


class ConfigError(CliplabError):
    """A problem with a configuration value."""


class NumericError(CliplabError):
    """A computed value is NaN or infinite (embeddings, scores, a training loss): refused, never scored."""


def check_minimums(config: object, section: str, minimums: tuple[tuple[str, int], ...]) -> None:
    """Refuse a config field below its minimum, naming it as ``section.field`` (e.g. ``train.epochs``)."""
    for name, low in minimums:
        if int(getattr(config, name)) < low:
            raise ConfigError(f"{section}.{name} must be >= {low}, not {getattr(config, name)!r}")
