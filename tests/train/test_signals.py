"""StopRequests: a second signal exits at once, except one within the repeat grace, which DDP runs use
because torchrun forwards a terminal's Ctrl-C to workers that already had it."""

from __future__ import annotations

import os
import signal

import pytest

from train.signals import StopRequests


def test_a_repeat_within_the_grace_is_the_same_request():
    with StopRequests(repeat_grace=30.0) as stops:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        assert stops.received is signal.SIGINT and stops.exit_code == 130


def test_without_a_grace_the_second_signal_exits_at_once():
    with StopRequests() as stops, pytest.raises(SystemExit) as caught:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stops.received is signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)
    assert caught.value.code == 130
