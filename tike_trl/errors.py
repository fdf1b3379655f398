"""The error for bad user input: the command line prints its message on one line, without a traceback."""


class InputError(ValueError):
    """A model, dataset, config file or output directory the user gave cannot be used."""
