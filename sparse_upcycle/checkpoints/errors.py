"""The one exception type for bad checkpoint input; the CLI turns it into one line + exit 2."""


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, in an unsupported format or of the wrong shape."""
