"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class SafepatchError(Exception):
    """An error a user can hit (bad path, mismatched checkpoints, corrupt shard, bad config
    value). The message must name the file, tensor or key at fault and fit on one line."""


class ConfigError(SafepatchError):
    """A bad or unknown configuration key or value."""


class CheckpointError(SafepatchError):
    """A checkpoint, score directory or shard that is missing, corrupt or inconsistent."""


class DataError(SafepatchError):
    """Training or evaluation data that is missing, empty or lacks required fields."""
