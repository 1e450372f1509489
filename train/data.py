"""Corpora, the character vocabulary, and the stream layout for stateful truncated BPTT.

Corpus specs understood by `load_corpus`:
  hihell           the seed lesson: the text 'hihello' (input 'hihell', target 'ihello').
  default          the Python language reference shipped inside every CPython (pydoc_data.topics):
                   ~465 KB of English prose with code examples, present on any fresh machine, no network.
  tinyshakespeare  downloaded once from its public address, checked against its SHA-256, cached.
  PATH             a UTF-8 text file, or a folder whose *.txt files are read in name order.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

HIHELL_TEXT = "hihello"
HIHELL_VOCAB = ("h", "i", "e", "l", "o")  # the lesson's own index order
TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_CACHE = Path(os.environ.get("CHARRNN_CACHE", Path.home() / ".cache" / "charrnn"))


class CorpusError(Exception):
    """The corpus could not be read, downloaded or verified."""


@dataclass(frozen=True)
class Corpus:
    name: str
    text: str
    vocab: tuple[str, ...]

    def encode(self, text: str) -> torch.Tensor:
        index = {ch: i for i, ch in enumerate(self.vocab)}
        return torch.tensor([index[ch] for ch in text], dtype=torch.long)


def build_vocab(text: str) -> tuple[str, ...]:
    """Sorted distinct characters: stable across runs and machines for the same text."""
    return tuple(sorted(set(text)))


def default_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def fetch_verified(url: str, sha256: str, dest: Path, timeout: float = 60.0) -> Path:
    """Download url to dest once; a file already there, or a new download, must match sha256."""
    if dest.exists():
        if _sha256(dest.read_bytes()) == sha256:
            return dest
        raise CorpusError(f"{dest}: cached file does not match SHA-256 {sha256}; delete it to download again")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except OSError as exc:
        raise CorpusError(f"could not download {url}: {exc}") from exc
    got = _sha256(data)
    if got != sha256:
        raise CorpusError(f"{url}: SHA-256 mismatch: expected {sha256}, got {got}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, dest)
    return dest


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path}: not UTF-8 text ({exc})") from exc


def load_corpus(spec: str | None, cache_dir: Path = DEFAULT_CACHE) -> Corpus:
    if spec is None or spec == "default":
        text = default_text()
        return Corpus("default:python-language-reference", text, build_vocab(text))
    if spec == "hihell":
        return Corpus("hihell", HIHELL_TEXT, HIHELL_VOCAB)
    if spec == "tinyshakespeare":
        path = fetch_verified(TINYSHAKESPEARE_URL, TINYSHAKESPEARE_SHA256, cache_dir / "tinyshakespeare.txt")
        text = _read_utf8(path)
        return Corpus("tinyshakespeare", text, build_vocab(text))
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise CorpusError(f"{path}: folder holds no .txt files")
        text = "\n".join(_read_utf8(f) for f in files)
    elif path.is_file():
        text = _read_utf8(path)
    else:
        raise CorpusError(f"{spec}: not 'hihell', 'default', 'tinyshakespeare', a file or a folder")
    if len(text) < 2:
        raise CorpusError(f"{path}: needs at least 2 characters, has {len(text)}")
    return Corpus(str(path), text, build_vocab(text))


def split(ids: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The last val_fraction of the text, contiguous, is validation (as nanoGPT's shakespeare_char)."""
    n_val = int(len(ids) * val_fraction)
    return ids[: len(ids) - n_val], ids[len(ids) - n_val :]


def streams(ids: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay text out as batch_size contiguous streams: inputs [B, L] and their next-char targets [B, L].

    Row b is the b-th contiguous slice of the text, so a hidden state carried from one chunk of row b to the
    next has really read the preceding text. At most batch_size - 1 trailing characters are dropped.
    """
    pairs = len(ids) - 1
    length = pairs // batch_size
    if length < 1:
        raise CorpusError(f"{len(ids)} characters are too few for {batch_size} streams")
    n = length * batch_size
    return ids[:n].view(batch_size, length), ids[1 : n + 1].view(batch_size, length)


def chunks(inputs: torch.Tensor, targets: torch.Tensor, seq_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive [B, <=seq_len] windows along the streams, in order (the state threads through them)."""
    for t in range(0, inputs.shape[1], seq_len):
        yield inputs[:, t : t + seq_len], targets[:, t : t + seq_len]
