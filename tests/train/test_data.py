import hashlib
import http.server
import threading

import pytest
import torch

from train.data import (
    HIHELL_VOCAB,
    CorpusError,
    build_vocab,
    chunks,
    default_text,
    fetch_verified,
    load_corpus,
    split,
    streams,
)


def test_hihell_corpus_is_the_lesson():
    c = load_corpus("hihell")
    assert c.text == "hihello"
    assert c.vocab == HIHELL_VOCAB == ("h", "i", "e", "l", "o")
    assert c.encode("hihell").tolist() == [0, 1, 0, 2, 3, 3]


def test_default_corpus_is_embedded_prose():
    text = default_text()
    assert len(text) >= 400_000
    assert "statement" in text and "the" in text
    c = load_corpus(None)
    assert c.name.startswith("default:")
    assert c.vocab == tuple(sorted(set(c.text)))


def test_vocab_is_sorted_and_distinct():
    assert build_vocab("banana") == ("a", "b", "n")


def test_file_and_folder_corpora(tmp_path):
    (tmp_path / "b.txt").write_text("world", encoding="utf-8")
    (tmp_path / "a.txt").write_text("héllo", encoding="utf-8")
    (tmp_path / "skip.md").write_text("ignored", encoding="utf-8")
    assert load_corpus(str(tmp_path)).text == "héllo\nworld"
    assert load_corpus(str(tmp_path / "a.txt")).text == "héllo"


@pytest.mark.parametrize("content,message", [(b"\xff\xfe\x00bad", "not UTF-8"), (b"x", "at least 2")])
def test_bad_corpus_files(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        load_corpus(str(path))


def test_missing_corpus_and_empty_folder(tmp_path):
    with pytest.raises(CorpusError, match="not 'hihell'"):
        load_corpus(str(tmp_path / "nope"))
    with pytest.raises(CorpusError, match=r"no \.txt files"):
        load_corpus(str(tmp_path))


def test_split_keeps_the_last_tenth_contiguous():
    ids = torch.arange(100)
    train, val = split(ids, 0.1)
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))


def test_streams_are_contiguous_with_next_char_targets():
    ids = torch.arange(23)  # 22 (input, target) pairs -> 4 streams of 5, 2 pairs dropped
    x, y = streams(ids, 4)
    assert x.shape == y.shape == (4, 5)
    assert x[1].tolist() == [5, 6, 7, 8, 9]
    assert (y == x + 1).all()
    windows = list(chunks(x, y, 2))
    assert [w[0].shape[1] for w in windows] == [2, 2, 1]
    assert torch.cat([w[0] for w in windows], dim=1).equal(x)  # windows tile each stream in order
    with pytest.raises(CorpusError, match="too few"):
        streams(torch.arange(3), 4)


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b""
    hits = 0

    def do_GET(self):
        type(self).hits += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def local_http():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/input.txt"
    server.shutdown()
    server.server_close()


def test_download_verifies_and_caches(local_http, tmp_path):
    _, url = local_http
    _Handler.body, _Handler.hits = b"First Citizen:\nBefore we proceed any further", 0
    digest = hashlib.sha256(_Handler.body).hexdigest()
    dest = tmp_path / "cache" / "ts.txt"
    assert fetch_verified(url, digest, dest).read_bytes() == _Handler.body
    assert fetch_verified(url, digest, dest) == dest
    assert _Handler.hits == 1  # the second call used the cache


def test_download_with_bad_checksum_is_an_error_and_caches_nothing(local_http, tmp_path):
    _, url = local_http
    _Handler.body = b"tampered"
    dest = tmp_path / "ts.txt"
    with pytest.raises(CorpusError, match="SHA-256 mismatch"):
        fetch_verified(url, "0" * 64, dest)
    assert not dest.exists()


def test_corrupt_cache_is_an_error(tmp_path):
    dest = tmp_path / "ts.txt"
    dest.write_text("not shakespeare")
    with pytest.raises(CorpusError, match="does not match"):
        fetch_verified("http://127.0.0.1:9/never", "0" * 64, dest)


def test_unreachable_download_is_an_error(tmp_path):
    with pytest.raises(CorpusError, match="could not download"):
        fetch_verified("http://127.0.0.1:9/input.txt", "0" * 64, tmp_path / "x.txt", timeout=2)
