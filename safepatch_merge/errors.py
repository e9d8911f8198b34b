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


def clip(value: object, limit: int = 120) -> str:
    """A bounded repr of `value` for an error message: nested containers are cut after a few
    items and levels, so a hostile value (a YAML alias bomb, a megabyte-long tensor name) can
    neither flood the message nor take long to format."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 2, 4, 4, 4, 4
    r.maxstring = r.maxother = r.maxlong = max(20, limit)
    text = r.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
