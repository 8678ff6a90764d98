"""The exception raised for bad input data."""


class DataError(ValueError):
    """Input data is malformed: the message names the file and the record key or byte offset."""
