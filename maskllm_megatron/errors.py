"""The errors a run reports to its user as one clear line (the CLI turns them into exit code 1)."""


class TrainingError(RuntimeError):
    """A run that must stop (non-finite loss beyond the skip budget, bad checkpoint, ...)."""
