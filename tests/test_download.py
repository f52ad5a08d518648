"""`download.fetch` and `deeplab models pull` against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest

from conftest import LENET, assert_one_line_error, files_in, run_cli
from deeplab_cli import registry
from deeplab_cli.download import fetch
from deeplab_cli.errors import DownloadError, ModelError

FILE = "train2_iter_8000.caffemodel"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        site = self.server.site
        site.requests.append(self.path)
        if self.path not in site.routes:
            self.send_error(404)
            return
        body, claimed_length = site.routes[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(claimed_length))
        self.end_headers()
        self.wfile.write(body)
        # A claimed length beyond the body ends here: the connection closes mid-transfer.
        self.close_connection = True

    def log_message(self, *args):
        pass  # pytest output stays readable


class LocalServer:
    """HTTP on 127.0.0.1 (a free port) serving `routes` ({path: (body, Content-Length sent)}); every other
    path is a 404. `requests` records each path asked for, in order."""

    def __init__(self):
        self.routes: dict[str, tuple[bytes, int]] = {}
        self.requests: list[str] = []
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.site = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self._httpd.server_port}{path}"

    def serve(self, path: str, body: bytes, claimed_length: int | None = None) -> str:
        self.routes[path] = (body, len(body) if claimed_length is None else claimed_length)
        return self.url(path)


@pytest.fixture(scope="module")
def largefov_bytes(largefov_caffemodel) -> bytes:
    return largefov_caffemodel.read_bytes()


@pytest.fixture
def server():
    with LocalServer() as site:
        yield site


@pytest.fixture(autouse=True)
def home(deeplab_home) -> Path:
    return deeplab_home


def use_model(monkeypatch, urls, sha256=None) -> registry.ModelInfo:
    """Make the registry's largefov-voc12 (for the CLI too) fetch from `urls` and check `sha256`."""
    info = dataclasses.replace(registry.get_model("largefov-voc12"), urls=tuple(urls), sha256=sha256)
    monkeypatch.setattr(registry, "known_models", lambda: {info.name: info})
    return info


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_model_error(result, *phrases):
    """Exit 3 with one line on stderr that contains every phrase, and no traceback."""
    assert_one_line_error(result, ModelError.exit_code, *phrases)


# -- download.fetch ------------------------------------------------------------------------------------


def test_fetch_yields_verified_temp_file_and_removes_it(server, tmp_path):
    body = os.urandom(3 * (1 << 20) + 5)
    url = server.serve("/" + FILE, body)
    received = []
    with fetch([url], tmp_path / "d", sha256=sha256(body).upper(),
               progress=lambda n, total: received.append((n, total))) as (tmp, digest):
        assert tmp.parent == tmp_path / "d"
        assert tmp.read_bytes() == body
        assert digest == sha256(body)
    assert files_in(tmp_path / "d") == []
    assert sum(n for n, _ in received) == len(body)
    assert {total for _, total in received} == {len(body)}


def test_fetch_keeps_a_file_the_caller_renamed(server, tmp_path):
    body = b"weights" * 1000
    with fetch([server.serve("/w", body)], tmp_path) as (tmp, _):
        os.replace(tmp, tmp_path / "kept")
    assert files_in(tmp_path) == ["kept"]
    assert (tmp_path / "kept").read_bytes() == body


def test_fetch_temp_file_mode_follows_the_umask(server, tmp_path):
    # A shared DEEPLAB_HOME needs the cached weights readable by others, not mkstemp's 0o600.
    previous = os.umask(0o022)
    try:
        with fetch([server.serve("/w", b"x" * 100)], tmp_path) as (tmp, _):
            mode = tmp.stat().st_mode & 0o777
    finally:
        os.umask(previous)
    assert mode == 0o644


def test_fetch_falls_back_to_the_next_url(server, tmp_path):
    body = b"weights" * 1000
    urls = [server.url("/missing/" + FILE), server.serve("/mirror/" + FILE, body)]
    with fetch(urls, tmp_path, sha256=sha256(body)) as (tmp, digest):
        assert tmp.read_bytes() == body
    assert server.requests == ["/missing/" + FILE, "/mirror/" + FILE]


def test_fetch_names_every_failed_url(server, tmp_path):
    urls = [server.url("/a/" + FILE), server.url("/b/" + FILE)]
    with pytest.raises(DownloadError) as caught:
        with fetch(urls, tmp_path):
            pytest.fail("no URL works, the block must not run")
    message = str(caught.value)
    assert "\n" not in message
    assert f"{urls[0]}: HTTP 404" in message and f"{urls[1]}: HTTP 404" in message
    assert files_in(tmp_path) == []


def test_fetch_refuses_a_checksum_mismatch(server, tmp_path):
    url = server.serve("/w", b"not the published file")
    with pytest.raises(DownloadError, match="SHA-256"):
        with fetch([url], tmp_path, sha256="0" * 64):
            pytest.fail("a mismatching download must not reach the caller")
    assert files_in(tmp_path) == []


def test_fetch_refuses_a_transfer_that_broke_off(server, tmp_path):
    body = os.urandom(1 << 20)
    url = server.serve("/w", body, claimed_length=4 * len(body))
    with pytest.raises(DownloadError, match="broke off"):
        with fetch([url], tmp_path):
            pytest.fail("a short download must not reach the caller")
    assert files_in(tmp_path) == []


def test_fetch_removes_the_temp_file_when_the_block_fails(server, tmp_path):
    with pytest.raises(KeyError):
        with fetch([server.serve("/w", b"x" * 100)], tmp_path):
            raise KeyError("conversion failed")
    assert files_in(tmp_path) == []


# -- deeplab models pull -------------------------------------------------------------------------------


def test_pull_caches_the_weights_and_the_graph(server, monkeypatch, home, largefov_bytes):
    info = use_model(monkeypatch, [server.serve("/" + FILE, largefov_bytes)], sha256=sha256(largefov_bytes))

    result = run_cli("models", "pull", "largefov-voc12")

    assert result.exit_code == 0, result.output
    onnx_file = home / info.name / "model.onnx"
    assert result.stdout.strip() == str(onnx_file)
    assert files_in(home) == [info.name]
    assert files_in(home / info.name) == ["model.onnx", FILE]
    assert (home / info.name / FILE).read_bytes() == largefov_bytes
    assert run_cli("models", "path", "largefov-voc12").stdout.strip() == str(onnx_file)
    assert "\tcached\t" in run_cli("models", "list").stdout

    # Cached: ensure() neither downloads nor converts again.
    requests, mtime = len(server.requests), onnx_file.stat().st_mtime_ns
    assert registry.ensure(info) == onnx_file
    assert len(server.requests) == requests and onnx_file.stat().st_mtime_ns == mtime


def test_mirror_replaces_the_published_urls(server, monkeypatch, home):
    # The published URL is on the same server, so a request to it would be recorded.
    use_model(monkeypatch, [server.serve("/published/" + FILE, LENET.read_bytes())])
    monkeypatch.setenv("DEEPLAB_MIRROR", server.url("/site/"))  # the trailing slash is not doubled

    result = run_cli("models", "pull", "largefov-voc12")

    assert_model_error(result, server.url("/site/" + FILE), "HTTP 404")
    assert server.requests == ["/site/" + FILE]


def test_pull_from_a_mirror_that_serves_a_file_that_is_not_largefov(server, monkeypatch, home):
    server.serve("/" + FILE, LENET.read_bytes())
    use_model(monkeypatch, ["http://127.0.0.1:9/" + FILE])
    monkeypatch.setenv("DEEPLAB_MIRROR", server.url())

    result = run_cli("models", "pull", "largefov-voc12")

    assert_model_error(result, f"downloaded {FILE} is not usable", "not DeepLab-LargeFOV")
    assert ".download-" not in result.stderr  # the temporary file is gone; naming it would mislead
    assert "127.0.0.1:9/" not in result.stderr  # the published URL was never tried
    assert server.requests == ["/" + FILE]
    assert files_in(home / "largefov-voc12") == []


def test_pull_refuses_a_checksum_mismatch(server, monkeypatch, home, largefov_bytes):
    use_model(monkeypatch, [server.serve("/" + FILE, largefov_bytes)], sha256="ab" * 32)

    result = run_cli("models", "pull", "largefov-voc12")

    assert_model_error(result, "SHA-256", "ab" * 32)
    assert files_in(home / "largefov-voc12") == []


def test_pull_refuses_an_interrupted_transfer(server, monkeypatch, home, largefov_bytes):
    partial = largefov_bytes[: 1 << 20]
    use_model(monkeypatch, [server.serve("/" + FILE, partial, claimed_length=len(largefov_bytes))])

    result = run_cli("models", "pull", "largefov-voc12")

    assert_model_error(result, "broke off")
    assert files_in(home / "largefov-voc12") == []


def test_pull_offline_makes_no_request(server, monkeypatch, home):
    use_model(monkeypatch, [server.serve("/" + FILE, b"x")])
    monkeypatch.setenv("DEEPLAB_OFFLINE", "1")

    result = run_cli("models", "pull", "largefov-voc12")

    assert_model_error(result, "DEEPLAB_OFFLINE", "deeplab models import")
    assert server.requests == []
    assert files_in(home) == []


def test_ensure_offline_says_how_to_get_the_model(server, monkeypatch, home):
    info = use_model(monkeypatch, [server.serve("/" + FILE, b"x")])
    monkeypatch.setenv("DEEPLAB_OFFLINE", "yes")

    with pytest.raises(ModelError) as caught:
        registry.ensure(info)

    message = str(caught.value)
    assert "deeplab models pull largefov-voc12" in message and "deeplab models import" in message
    assert "\n" not in message
    assert server.requests == []


def test_ensure_reports_a_failed_pull_with_how_to_get_the_model(server, monkeypatch, home):
    info = use_model(monkeypatch, [server.url("/gone/" + FILE)])

    with pytest.raises(ModelError) as caught:
        registry.ensure(info)

    message = str(caught.value)
    assert "could not be fetched" in message and "HTTP 404" in message
    assert "deeplab models import" in message and "\n" not in message
    assert files_in(home / info.name) == []


def test_ensure_converts_cached_weights_without_the_network(server, monkeypatch, home, largefov_bytes):
    info = use_model(monkeypatch, [server.serve("/" + FILE, largefov_bytes)])
    (home / info.name).mkdir(parents=True)
    (home / info.name / FILE).write_bytes(largefov_bytes)
    monkeypatch.setenv("DEEPLAB_OFFLINE", "1")

    assert registry.ensure(info) == home / info.name / "model.onnx"
    assert files_in(home / info.name) == ["model.onnx", FILE]
    assert server.requests == []
