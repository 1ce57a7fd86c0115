"""Errors raised by the ring engine, split by who pays for them."""


class RingError(Exception):
    """The ring itself is unusable (bad avail index, head out of range, ring not mapped).

    The queue stops and the device needs a reset; no request on it can be trusted.
    """


class ChainError(Exception):
    """One descriptor chain is malformed; only that request fails."""
