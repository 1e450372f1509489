"""--event-loop: which loop constructor the server runs on."""

from __future__ import annotations

import asyncio
import sys

import pytest

from serve.errors import ConfigError
from serve.ops.loops import loop_factory


def test_auto_prefers_uvloop_where_installed():
    import uvloop

    assert loop_factory("auto") == (uvloop.new_event_loop, "uvloop")
    assert loop_factory("uvloop") == (uvloop.new_event_loop, "uvloop")
    assert loop_factory("asyncio") == (asyncio.new_event_loop, "asyncio")


def test_without_uvloop_auto_falls_back_and_uvloop_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes `import uvloop` raise ImportError
    assert loop_factory("auto") == (asyncio.new_event_loop, "asyncio")
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        loop_factory("uvloop")


def test_an_unknown_loop_is_a_config_error():
    with pytest.raises(ConfigError, match="choose from auto, uvloop, asyncio"):
        loop_factory("trio")
