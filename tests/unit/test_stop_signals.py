"""The daemon's SIGINT/SIGTERM handlers record a stop and do nothing else (no logging)."""

from __future__ import annotations

import logging
import os
import signal
import threading

import pytest

from pyvduse.ops.stop_signals import StopSignals


def test_first_signal_stops_second_hurries() -> None:
    stop = threading.Event()
    signals = StopSignals(stop).install()
    try:
        assert signals.describe() == "asked to stop"
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.is_set() and not signals.hurry.is_set()
        assert signals.describe() == "received SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.hurry.is_set()
        assert signals.received == ["SIGTERM", "SIGINT"]
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_in_the_middle_of_a_log_line_still_stops(caplog: pytest.LogCaptureFixture) -> None:
    """The failure this guards: the handler logged, which raised 'reentrant call' when the
    signal landed while the main thread was writing a log line, before it set the stop."""
    stop = threading.Event()
    signals = StopSignals(stop).install()

    class SignalWhileEmitting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs inside this emit
            assert stop.is_set()

    handler = SignalWhileEmitting()
    logger = logging.getLogger("pyvduse.test.stop_signals")
    logger.addHandler(handler)
    try:
        with caplog.at_level(logging.DEBUG, logger="pyvduse"):
            logger.warning("serving something")
        assert stop.is_set()
        assert [r.getMessage() for r in caplog.records] == ["serving something"]
    finally:
        logger.removeHandler(handler)
        signals.restore()
