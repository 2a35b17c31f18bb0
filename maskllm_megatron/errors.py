"""The errors a user can fix. The CLI prints them as one line, ``error: ...``, and exits 2;
any other exception is a bug in this package (or its dependencies) and keeps its traceback.

Each class also derives from the builtin that callers of a plain library would catch
(``ValueError`` for bad input, ``RuntimeError`` for a run that had to stop)."""


class UserError(Exception):
    """Something the user gave us is wrong; the message says what and what to do."""


class InputError(UserError, ValueError):
    """A bad argument, config or model shape (not divisible by M, unknown architecture,
    a TP/PP layout that does not divide the model, non-N:M weights at export, ...)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or model file that cannot be used: missing, truncated, corrupted (checksum
    mismatch), foreign, unsafe (would run code when read) or made for another model. The
    message names the file."""


class TrainingError(UserError, RuntimeError):
    """A run that must stop (non-finite loss beyond the skip budget, a broken run directory)."""
