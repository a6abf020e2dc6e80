"""The error type of the command line: one line for the user, no traceback."""

PROG = "trl-refpo dpo"


class RecipeError(ValueError):
    """A problem with the recipe or the command line, reported as one line without a traceback."""
