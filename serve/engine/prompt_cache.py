"""The prompt state cache: the recurrent state and the last logits after prompt prefixes, so that a
prompt sharing a prefix with an earlier one is fed to the model only from where the two part.

Exact by construction: every prompt, cache on or off, is fed in CHUNK-character calls from position 0
(serve/engine/prefill.py), and checkpoints are kept only where a chunk ends. A prompt resumed from a
checkpoint so makes the very calls, from the very states, that feeding it from the start would make,
and its text and logprobs are equal to the bit. The checkpoint at a prompt's own end (mid-chunk) serves
only that same prompt again: a longer prompt's next chunk does not end there.

Keys: a chain of BLAKE2b digests seeded by the model's SHA-256, one link per chunk of token ids (and
one for a prompt's last, partial chunk), so a key names the model and every character before it (a
collision takes 2^64 prompts). A prompt's keys cost one pass over it; its longest cached prefix is
the last of them that is held. Entries are evicted least recently used first once their bytes pass the
capacity.

The cache lives in the engine (the engine process with --engine process), beside the states it holds:
a hit costs no copy across the pipe, and every caller of `Engine.generate` (Generate, and whatever
route comes to start streams) gets it. It is per engine, so per model and per worker process: a reload
starts a new engine with an empty cache.
"""

from __future__ import annotations

import collections
import hashlib
from typing import NamedTuple

import numpy as np

# Characters per prefill call, and so the spacing of checkpoints. Measured on GRU 2x256 (2 cores, one
# onnxruntime thread): feeding 4,096 characters in calls of 32/64/128/256 cost 42.4/41.7/40.3/40.6 us a
# character against 41.2 in one call, i.e. nothing, while a prompt that goes past a cached prefix
# recomputes at most CHUNK - 1 characters of it.
CHUNK = 64
# What an entry costs besides its two arrays' bytes (ndarray headers, the tuple, the dict slot: 431
# bytes by tracemalloc over 1,000 GRU 2x256 entries; the 16-byte key: 49), so that the bytes counted
# are what the process holds: 2,788 a GRU 2x256 entry.
ENTRY_OVERHEAD = 480
_DIGEST = 16
MB = 1 << 20  # what --prompt-cache-mb counts in


def entry_bytes(num_layers: int, state_size: int, vocab_size: int) -> int:
    """What one checkpoint of a model of this shape counts against the capacity (float32 arrays)."""
    return 4 * (num_layers * state_size + vocab_size) + ENTRY_OVERHEAD


class Entry(NamedTuple):
    state: np.ndarray   # [num_layers, state_size] after the prefix
    logits: np.ndarray  # [vocab] after its last character
    size: int           # bytes counted against the capacity


def chunk_ends(length: int) -> list[int]:
    """Where the chunks of a prompt of `length` characters end: every CHUNK, then at its end."""
    ends = list(range(CHUNK, length + 1, CHUNK))
    if length % CHUNK:
        ends.append(length)
    return ends


def prompt_keys(seed: bytes, ids: np.ndarray) -> tuple[list[int], list[bytes]]:
    """(ends, keys): keys[i] names the prefix ids[:ends[i]] (ends: chunk_ends(len(ids)))."""
    ends = chunk_ends(len(ids))
    data = np.ascontiguousarray(ids, dtype=np.int64).tobytes()
    keys, key, start = [], seed, 0
    for end in ends:
        key = hashlib.blake2b(data[start * 8:end * 8], digest_size=_DIGEST, key=key).digest()
        keys.append(key)
        start = end
    return ends, keys


class PromptCache:
    """Entries by key, least recently used first, holding at most `capacity` bytes."""

    def __init__(self, capacity: int, model_sha256: str) -> None:
        if capacity <= 0:
            raise ValueError("a prompt cache needs a capacity > 0 (0 means no cache: pass None instead)")
        self.capacity = capacity
        self.seed = hashlib.blake2b(model_sha256.encode(), digest_size=_DIGEST).digest()
        self.bytes = 0
        self.evictions = 0  # since the cache was made
        self._entries: collections.OrderedDict[bytes, Entry] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self, ids: np.ndarray) -> tuple[list[int], list[bytes]]:
        return prompt_keys(self.seed, ids)

    def longest(self, keys: list[bytes]) -> tuple[int, Entry | None]:
        """The index in keys of the longest prefix held (-1 and None: none); it becomes the most recent."""
        entries = self._entries
        for i in range(len(keys) - 1, -1, -1):
            entry = entries.get(keys[i])
            if entry is not None:
                entries.move_to_end(keys[i])
                return i, entry
        return -1, None

    def put(self, key: bytes, state: np.ndarray, logits: np.ndarray) -> None:
        """Keeps copies of state and logits under key (read-only: a state handed out is shared), then
        evicts the least recently used entries until the cache fits its capacity."""
        entries = self._entries
        if key in entries:
            entries.move_to_end(key)
            return
        state, logits = np.array(state, copy=True), np.array(logits, copy=True)
        state.flags.writeable = logits.flags.writeable = False
        size = state.nbytes + logits.nbytes + ENTRY_OVERHEAD
        entries[key] = Entry(state, logits, size)
        self.bytes += size
        while self.bytes > self.capacity and entries:
            _, old = entries.popitem(last=False)
            self.bytes -= old.size
            self.evictions += 1
