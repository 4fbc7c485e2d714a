"""Named exceptions: the job maps ConfigError and InputError to exit 2, anything else to exit 1."""


class MfdistError(Exception):
    """Base class of the errors whose message tells the user what to change."""


class ConfigError(MfdistError):
    """A config key is unknown, has the wrong type or an invalid value."""


class InputError(MfdistError):
    """An input path, file, column or the data itself cannot be used."""


class ModelFitError(MfdistError):
    """Training produced an unusable model (for example NaN factors)."""
