"""Errors that reach the user as one line (exit 2): each message names the file or key and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, unsafe or from another layout; the message names the file and the fix."""
