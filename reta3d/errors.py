"""Errors that describe the user's input, not a bug: a file, folder or setting that cannot be
used. The scripts (`reta3d.cli.run`) print their message without a traceback; library callers
catch them as the built-in types they extend (ValueError, and FileNotFoundError for a path
that does not exist)."""


class InputError(ValueError):
    """A file, folder or setting the user gave that cannot be used; the message names it and
    says what to do."""


class MissingInputError(InputError, FileNotFoundError):
    """A path the user gave that does not exist."""


class MissingDependencyError(InputError, ImportError):
    """An optional package the user's command needs is not installed; the message says which
    requirements file or package installs it."""
