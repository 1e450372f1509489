"""Feeding Generate prompts to the model before their first character: in CHUNK-character calls from
position 0, resumed from the prompt cache (serve/engine/prompt_cache.py) where it holds a prefix, and
each distinct prefix computed once however many streams arriving together share it.

Rounds: every prompt not yet fed moves one chunk a round. With the cache on, prompts whose next chunk
ends on the same key (same prefix) share one row of the round's calls; rows are grouped by chunk
length into calls of at most max_batch rows and MAX_CALL_CHARS characters. Every chunk's end goes
into the cache as it is computed, so a prompt arriving while another is fed finds its prefix there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from serve.engine.prompt_cache import PromptCache, chunk_ends
from serve.engine.protocol import StepMetrics
from serve.engine.stream import Stream

log = logging.getLogger(__name__)

Run = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]  # ids [B, T], state -> logits, state


@dataclass(eq=False)
class _Cursor:
    """How far one stream's prompt has been fed, and the state and logits there."""

    stream: Stream
    ends: list[int]          # where its chunks end
    keys: list[bytes] | None  # the cache's key at each end (None: no cache)
    at: int = -1             # index of the last end reached (-1: position 0)
    state: np.ndarray | None = None  # None: the zero state
    logits: np.ndarray | None = None

    @property
    def pos(self) -> int:
        return self.ends[self.at] if self.at >= 0 else 0

    def next(self) -> tuple[object, int, int]:
        """(what identifies its next chunk, start, end): equal for cursors that can share a row."""
        start, end = self.pos, self.ends[self.at + 1]
        return (self.keys[self.at + 1] if self.keys is not None else self), start, end

    def chunk(self) -> int:
        _, start, end = self.next()
        return end - start


# The scheduler's grouping (items, their length, max rows) -> calls: equal lengths, capped in rows and
# characters per call.
Group = Callable[[list[_Cursor], Callable[[_Cursor], int], int], list[list[_Cursor]]]


class Prefill:
    """Feeds prompts through `run` (the scheduler's timed onnxruntime call); `cache` None feeds the same
    chunks with nothing kept."""

    def __init__(self, run: Run, zero: np.ndarray, cache: PromptCache | None, metrics: StepMetrics,
                 stats: dict[str, float], group: Group, alive: Callable[[], None]) -> None:
        """alive(): called after every call, so that a prompt of 100,000 characters (seconds of
        calls) is not taken for a hung engine."""
        self._run = run
        self._zero = zero  # one row's zero state [L, S]
        self.cache = cache
        self._metrics = metrics
        self._stats = stats
        self._group = group
        self._alive = alive
        self._evictions = 0  # the cache's evictions already counted in metrics

    def feed(self, streams: list[Stream], max_batch: int,
             abandon: Callable[[list[Stream]], None]) -> dict[int, np.ndarray]:
        """Feeds every stream's (non-empty) prompt: sets `Stream.state` and returns {id(stream): last
        logits}. A failed call's streams go to abandon(streams) and are left out."""
        cache = self.cache
        cursors = []
        hits = 0
        for s in streams:
            if cache is None:
                cursors.append(_Cursor(s, chunk_ends(len(s.prompt)), None))
                continue
            ends, keys = cache.keys(s.prompt)
            at, entry = cache.longest(keys)
            cursor = _Cursor(s, ends, keys, at)
            if entry is not None:
                cursor.state, cursor.logits = entry.state, entry.logits
                hits += 1
            cursors.append(cursor)
        total = sum(len(s.prompt) for s in streams)
        computed = 0
        feeding = [c for c in cursors if c.at < len(c.ends) - 1]
        while feeding:
            rows: dict[object, list[_Cursor]] = {}
            for c in feeding:
                rows.setdefault(c.next()[0], []).append(c)
            leaders = [group[0] for group in rows.values()]
            for call in self._group(leaders, _Cursor.chunk, max_batch):
                computed += self._call(call, rows, abandon)
            feeding = [c for c in feeding if not c.stream.done and c.at < len(c.ends) - 1]
        first = {}
        for c in cursors:
            if not c.stream.done:
                assert c.logits is not None
                c.stream.state = c.state
                first[id(c.stream)] = c.logits
        self._stats["prefill_chars"] += computed
        if cache is not None:
            metrics = self._metrics
            if hits:
                metrics.prompt_cache_hits.inc(hits)
            if len(streams) - hits:
                metrics.prompt_cache_misses.inc(len(streams) - hits)
            if total - computed:
                metrics.prompt_cache_saved.inc(total - computed)
            if cache.evictions > self._evictions:
                metrics.prompt_cache_evictions.inc(cache.evictions - self._evictions)
                self._evictions = cache.evictions
            metrics.prompt_cache_bytes.set(cache.bytes)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("prompt cache: %d prompts, %d hits, %d of %d characters computed; %d entries, %d bytes",
                          len(streams), hits, computed, total, len(cache), cache.bytes)
        return first

    def _call(self, call: list[_Cursor], rows: dict[object, list[_Cursor]],
              abandon: Callable[[list[Stream]], None]) -> int:
        """One onnxruntime call for these leaders' next chunks; moves every cursor sharing a row with
        them. Returns the characters computed."""
        spans = [c.next() for c in call]
        ids = np.stack([c.stream.prompt[start:end] for c, (_, start, end) in zip(call, spans, strict=True)])
        state = np.stack([self._zero if c.state is None else c.state for c in call])
        try:
            logits, state_out = self._run(ids, state)
        except Exception:  # fail these rows only; other prompts keep going
            log.exception("onnxruntime failed on a prefill batch")
            abandon([c.stream for (key, _, _) in spans for c in rows[key]])
            return 0
        self._stats["prefill_calls"] += 1
        self._alive()
        cache = self.cache
        for i, (key, _, _) in enumerate(spans):
            row_state, row_logits = state_out[i], logits[i, -1]
            if cache is not None:
                assert isinstance(key, bytes)
                cache.put(key, row_state, row_logits)
            for c in rows[key]:
                c.at += 1
                c.state, c.logits = row_state, row_logits
        return int(ids.size)
