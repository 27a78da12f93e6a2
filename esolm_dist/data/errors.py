"""The one exception type for bad data input: corrupt shards, mismatched manifests, bad corpora."""


class DataError(ValueError):
    """Bad input to the data pipeline. The message is one line naming the file and the fix."""
