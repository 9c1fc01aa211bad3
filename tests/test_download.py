"""The downloader against a local HTTP server (no network is reachable here)."""

import hashlib
import http.server
import io
import tarfile
import threading
import zipfile

import pytest

from tkpbench.data.download import DownloadError, fetch, safe_extract


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""
    cut_after: int | None = None  # close the connection after this many bytes, once
    requests: list = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        rng = self.headers.get("Range")
        type(self).requests.append(rng)
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = self.payload[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}")
        self.end_headers()
        if type(self).cut_after is not None:
            n = type(self).cut_after
            type(self).cut_after = None
            self.wfile.write(body[:n])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@pytest.fixture()
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _archive() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        data = bytes(range(256)) * 400
        info = tarfile.TarInfo("VOCdevkit/VOC2012/JPEGImages/x.jpg")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_resume_after_a_cut_connection(server, tmp_path):
    payload = _archive()
    _Handler.payload, _Handler.cut_after, _Handler.requests = payload, 30_000, []
    url = f"http://127.0.0.1:{server.server_port}/a.tar"
    md5 = "md5:" + hashlib.md5(payload).hexdigest()
    dest = tmp_path / "a.tar"
    with pytest.raises(DownloadError, match="Run the same command again to resume"):
        fetch(url, dest, md5, chunk=4096)
    assert not dest.exists() and (tmp_path / "a.tar.part").stat().st_size >= 1
    fetch(url, dest, md5, chunk=4096)
    assert dest.read_bytes() == payload
    assert _Handler.requests[-1].startswith("bytes=") and _Handler.requests[-1] != "bytes=0-"
    assert not (tmp_path / "a.tar.part").exists()
    safe_extract(dest, tmp_path / "out")
    assert (tmp_path / "out/VOCdevkit/VOC2012/JPEGImages/x.jpg").stat().st_size == 256 * 400


def test_bad_checksum_is_rejected_and_nothing_is_left(server, tmp_path):
    _Handler.payload, _Handler.cut_after = b"hello" * 100, None
    url = f"http://127.0.0.1:{server.server_port}/b.bin"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch(url, tmp_path / "b.bin", "md5:" + "0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_extraction_refuses_paths_escaping_the_root(tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("../../evil.txt", "x")
    with pytest.raises(DownloadError, match="outside"):
        safe_extract(bad, tmp_path / "root")
    assert not (tmp_path / "evil.txt").exists()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        t.addfile(info)
    (tmp_path / "bad.tar").write_bytes(buf.getvalue())
    with pytest.raises(DownloadError, match="link"):
        safe_extract(tmp_path / "bad.tar", tmp_path / "root2")


def test_download_command_with_a_mirror(server, tmp_path, monkeypatch):
    from tkpbench.data import download as dl

    payload = _archive()
    _Handler.payload, _Handler.cut_after = payload, None
    md5 = "md5:" + hashlib.md5(payload).hexdigest()
    monkeypatch.setitem(dl.RESOURCES, "voc", [dl.Resource("http://unused/a.tar", "a.tar", md5)])
    from tkpbench.data.__main__ import main

    assert main(["download", "voc", "--root", str(tmp_path), "--base-url", f"http://127.0.0.1:{server.server_port}"]) == 0
    assert (tmp_path / "VOCdevkit/VOC2012/JPEGImages/x.jpg").is_file()


def test_a_cut_that_surfaces_as_incomplete_read_is_a_resumable_download_error(server, tmp_path, monkeypatch):
    """http.client.IncompleteRead (a body shorter than its Content-Length) must not escape as a traceback."""
    import http.client
    import urllib.request

    payload = _archive()
    _Handler.payload, _Handler.cut_after, _Handler.requests = payload, None, []
    url = f"http://127.0.0.1:{server.server_port}/b.tar"
    md5 = "md5:" + hashlib.md5(payload).hexdigest()
    real_urlopen = urllib.request.urlopen

    def cut_urlopen(*a, **k):
        resp = real_urlopen(*a, **k)
        first = resp.read(10_000)
        reads = iter([first])
        resp.read = lambda n=-1: next(reads, None) or (_ for _ in ()).throw(http.client.IncompleteRead(b"", 5))
        return resp

    monkeypatch.setattr(urllib.request, "urlopen", cut_urlopen)
    with pytest.raises(DownloadError, match="Run the same command again to resume"):
        fetch(url, tmp_path / "b.tar", md5)
    monkeypatch.setattr(urllib.request, "urlopen", real_urlopen)
    fetch(url, tmp_path / "b.tar", md5)
    assert (tmp_path / "b.tar").read_bytes() == payload
    assert _Handler.requests[-1] == "bytes=10000-"
