"""The download path against a real HTTP server on loopback, started by the tests."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import threading
from pathlib import Path

import pytest
from conftest import make_dataset

from fmnist import cli, data


class Server:
    """Serves files from a dict name -> bytes; `break_first[name] = k` cuts the first k answers mid-body."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.break_first, self.requests = files, {}, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                name = self.path.lstrip("/")
                outer.requests.append(name)
                body = outer.files.get(name)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.break_first.get(name, 0) > 0:
                    outer.break_first[name] -= 1
                    self.wfile.write(body[: len(body) // 2])  # then the server "dies": close the connection
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def served_files(directory: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    files, sums = {}, {}
    for stem in data.SHA256:
        body = (directory / (stem + ".gz")).read_bytes()
        files[stem + ".gz"] = body
        sums[stem] = hashlib.sha256(gzip.decompress(body)).hexdigest()
    return files, sums


@pytest.fixture
def synthetic_server(tmp_path, monkeypatch):
    files, sums = served_files(make_dataset(tmp_path / "src"))
    monkeypatch.setattr(data, "SHA256", sums)  # the tests' own files, with their own digests
    with Server(files) as s:
        yield s


def test_download_good_files(synthetic_server, tmp_path):
    dest = data.download(tmp_path / "dl", base_url=synthetic_server.url, progress=False, backoff=0)
    assert all(data.verify(dest).values())
    assert sorted(p.name for p in dest.iterdir()) == sorted(synthetic_server.files)
    before = len(synthetic_server.requests)
    data.download(dest, base_url=synthetic_server.url, progress=False, backoff=0)
    assert len(synthetic_server.requests) == before  # verified files are not fetched again


def test_download_corrupted_file_is_rejected_and_not_kept(synthetic_server, tmp_path):
    name = "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(synthetic_server.files[name]))
    raw[100] ^= 0xFF
    synthetic_server.files[name] = gzip.compress(bytes(raw))
    with pytest.raises(data.DataError, match="checksum mismatch"):
        data.download(tmp_path / "dl", base_url=synthetic_server.url, progress=False, retries=2, backoff=0)
    left = [p.name for p in (tmp_path / "dl").iterdir()]
    assert name not in left and not any(n.endswith(".part") for n in left)
    assert synthetic_server.requests.count(name) == 2  # retried


def test_download_survives_a_server_dying_midway(synthetic_server, tmp_path):
    name = "train-images-idx3-ubyte.gz"
    synthetic_server.break_first[name] = 2
    dest = data.download(tmp_path / "dl", base_url=synthetic_server.url, progress=False, retries=3, backoff=0)
    assert all(data.verify(dest).values())
    assert synthetic_server.requests.count(name) == 3


def test_download_gives_up_with_one_sentence(synthetic_server, tmp_path):
    name = "t10k-images-idx3-ubyte.gz"
    synthetic_server.break_first[name] = 99
    with pytest.raises(data.DataError) as e:
        data.download(tmp_path / "dl", base_url=synthetic_server.url, progress=False, retries=2, backoff=0)
    assert name in str(e.value) and "after 2 tries" in str(e.value)
    assert not (tmp_path / "dl" / name).exists()
    assert not list((tmp_path / "dl").glob("*.part"))


def test_download_unreachable_server(tmp_path):
    with pytest.raises(data.DataError, match="failed after 1 tries"):
        data.download(tmp_path / "dl", base_url="http://127.0.0.1:9/", progress=False, retries=1, backoff=0)


def test_cli_download_then_data(synthetic_server, tmp_path, capsys):
    dest = tmp_path / "dl"
    code = cli.main(["data", "--download", "--mirror", synthetic_server.url, "--data-dir", str(dest)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "verified:  yes" in out and str(dest) in out


@pytest.mark.realdata
def test_download_real_files_recompressed(real_dir, tmp_path):
    """The real files as a distribution ships them (recompressed) verify by their decompressed digest."""
    files = {}
    for stem in data.SHA256:
        body = data._find_file(real_dir, stem).read_bytes()
        files[stem + ".gz"] = body if body[:2] == b"\x1f\x8b" else gzip.compress(body)
    with Server(files) as s:
        dest = data.download(tmp_path / "dl", base_url=s.url, progress=False, backoff=0)
    assert all(data.verify(dest).values())


def test_download_replaces_a_damaged_file_in_its_destination(synthetic_server, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b damaged")  # what the error message advised fixing
    data.download(dest, base_url=synthetic_server.url, progress=False, backoff=0)
    assert data.read_idx(dest / "train-labels-idx1-ubyte.gz").shape == (600,)
    assert all(data.verify(dest).values())


def test_a_gzip_bomb_is_inflated_no_further_than_the_real_files_size(synthetic_server, tmp_path):
    import tracemalloc
    import zlib

    name = "train-images-idx3-ubyte.gz"
    inflater = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip: 200 MB of zeros in about 200 kB
    zeros = bytes(1 << 20)
    synthetic_server.files[name] = b"".join([*(inflater.compress(zeros) for _ in range(200)), inflater.flush()])
    assert len(synthetic_server.files[name]) < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(data.DataError, match="inflates beyond the 47,040,016 bytes of the real file"):
            data.download(tmp_path / "dl", base_url=synthetic_server.url, progress=False, retries=2, backoff=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # streamed a MiB at a time: it was inflated whole in memory (4.3 GiB for a real bomb)
    assert synthetic_server.requests.count(name) == 2
    assert not [p for p in (tmp_path / "dl").iterdir() if p.name.endswith(".part")]
