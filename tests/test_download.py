"""`download.fetch` and `deeplab models pull` against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import os
import threading
from pathlib import Path

import cv2
import pytest
from PIL import Image

from conftest import LENET, assert_one_line_error, files_in, run_cli
from deeplab_cli.model import registry
from deeplab_cli.model.download import fetch
from deeplab_cli.errors import DownloadError, ModelError
from deeplab_cli.synthetic import natural_image

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


def use_model(monkeypatch, urls, sha256=None, archive=None) -> registry.ModelInfo:
    """Make the registry's largefov-voc12 (for the CLI too) fetch from `urls`, then from `archive` + each
    URL when given (never from the real Internet Archive), and check `sha256`."""
    info = dataclasses.replace(registry.get_model("largefov-voc12"), urls=tuple(urls), sha256=sha256,
                               archive=archive)
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
               progress=lambda n, total: received.append((n, total))) as (tmp, digest, source):
        assert tmp.parent == tmp_path / "d"
        assert tmp.read_bytes() == body
        assert digest == sha256(body)
        assert source == url
    assert files_in(tmp_path / "d") == []
    assert sum(n for n, _ in received) == len(body)
    assert {total for _, total in received} == {len(body)}


def test_fetch_keeps_a_file_the_caller_renamed(server, tmp_path):
    body = b"weights" * 1000
    with fetch([server.serve("/w", body)], tmp_path) as fetched:
        os.replace(fetched.path, tmp_path / "kept")
    assert files_in(tmp_path) == ["kept"]
    assert (tmp_path / "kept").read_bytes() == body


def test_fetch_temp_file_mode_follows_the_umask(server, tmp_path):
    # A shared DEEPLAB_HOME needs the cached weights readable by others, not mkstemp's 0o600.
    previous = os.umask(0o022)
    try:
        with fetch([server.serve("/w", b"x" * 100)], tmp_path) as fetched:
            mode = fetched.path.stat().st_mode & 0o777
    finally:
        os.umask(previous)
    assert mode == 0o644


def test_fetch_falls_back_to_the_next_url(server, tmp_path):
    body = b"weights" * 1000
    urls = [server.url("/missing/" + FILE), server.serve("/mirror/" + FILE, body)]
    with fetch(urls, tmp_path, sha256=sha256(body)) as fetched:
        assert fetched.path.read_bytes() == body
        assert fetched.url == urls[1]
    assert server.requests == ["/missing/" + FILE, "/mirror/" + FILE]


def test_fetch_moves_on_when_the_check_refuses_a_file(server, tmp_path):
    urls = [server.serve("/error-page", b"<html>gone</html>"), server.serve("/real", b"weights" * 1000)]
    checked = []

    def check(path):
        checked.append(path.read_bytes())
        return "not weights" if path.read_bytes().startswith(b"<html>") else None

    with fetch(urls, tmp_path, check=check) as fetched:
        assert fetched.url == urls[1] and fetched.path.read_bytes() == b"weights" * 1000
        assert files_in(tmp_path) == [fetched.path.name]  # the refused file is already gone
    assert checked == [b"<html>gone</html>", b"weights" * 1000]

    with pytest.raises(DownloadError, match=f"{urls[0]}: not weights"):
        with fetch(urls[:1], tmp_path, check=check):
            pytest.fail("a refused file must not reach the caller")
    assert files_in(tmp_path) == []


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
    # The SHA-256 goes to stderr, so users can pin it; stdout stays the path for scripts.
    assert result.stderr.strip() == f"deeplab: {info.name}: sha256 {sha256(largefov_bytes)} from {info.urls[0]}"
    assert files_in(home) == [info.name]
    assert files_in(home / info.name) == ["model.onnx", "source.json", FILE]
    assert (home / info.name / FILE).read_bytes() == largefov_bytes
    record = json.loads((home / info.name / "source.json").read_text())
    assert record.pop("date").endswith("+00:00")
    assert record == {"file": FILE, "sha256": sha256(largefov_bytes), "source": info.urls[0]}
    assert run_cli("models", "path", "largefov-voc12").stdout.strip() == str(onnx_file)
    assert run_cli("models", "list").stdout.startswith(f"{info.name}\tcached\t{sha256(largefov_bytes)}\t")

    # Cached: ensure() neither downloads nor converts again.
    requests, mtime = len(server.requests), onnx_file.stat().st_mtime_ns
    assert registry.ensure(info) == onnx_file
    assert len(server.requests) == requests and onnx_file.stat().st_mtime_ns == mtime


def test_mirror_replaces_the_published_urls(server, monkeypatch, home):
    # The published URL and the archive are on the same server, so a request to them would be recorded.
    use_model(monkeypatch, [server.serve("/published/" + FILE, LENET.read_bytes())], archive=server.url("/web/"))
    monkeypatch.setenv("DEEPLAB_MIRROR", server.url("/site/"))  # the trailing slash is not doubled

    result = run_cli("models", "pull", "largefov-voc12")

    assert_model_error(result, server.url("/site/" + FILE), "HTTP 404", "deeplab models import FILE")
    assert server.requests == ["/site/" + FILE]


def test_pull_tries_the_archived_copies_after_the_published_urls(server, monkeypatch, home, largefov_bytes):
    published = [server.url("/ucla/" + FILE), server.url("/jhu/" + FILE)]
    archive = server.url("/web/2016id_/")
    # The archive holds the second mirror's file only; its copy of the first is a 404 like the mirrors.
    server.serve("/web/2016id_/" + published[1], largefov_bytes)
    info = use_model(monkeypatch, published, archive=archive)

    result = run_cli("models", "pull", "largefov-voc12")

    assert result.exit_code == 0, result.output
    assert server.requests == ["/ucla/" + FILE, "/jhu/" + FILE,
                               "/web/2016id_/" + published[0], "/web/2016id_/" + published[1]]
    assert f"from {archive}{published[1]}" in result.stderr
    assert registry.read_source(info).source == archive + published[1]
    assert files_in(home / info.name) == ["model.onnx", "source.json", FILE]


def test_pull_that_finds_nothing_names_every_url_and_how_to_import(server, monkeypatch, home):
    info = use_model(monkeypatch, [server.url("/ucla/" + FILE), "http://127.0.0.1:9/" + FILE],
                     archive=server.url("/web/2016id_/"))
    urls = registry.download_urls(info)
    assert len(urls) == 4

    result = run_cli("models", "pull", "largefov-voc12")

    # One line: each URL with its status or error, then what to do with a file found elsewhere.
    assert_model_error(result, f"{urls[0]}: HTTP 404", f"{urls[2]}: HTTP 404", f"{urls[3]}: HTTP 404",
                       "deeplab models import FILE --name largefov-voc12")
    line = result.stderr.strip()
    assert line.index(urls[0] + ":") < line.index(urls[1] + ":") < line.index(urls[2] + ":") < line.index(urls[3] + ":")
    assert "refused" in line.split(urls[1] + ":")[1].split(";")[0].lower()  # connection refused, port 9
    assert files_in(home / info.name) == []


def test_pull_moves_past_a_url_that_serves_another_model(server, monkeypatch, home, largefov_bytes):
    # A mirror (or an archive capture) with the wrong file under the right name must not end the search.
    urls = [server.serve("/lenet/" + FILE, LENET.read_bytes()), server.serve("/good/" + FILE, largefov_bytes)]
    info = use_model(monkeypatch, urls)

    result = run_cli("models", "pull", "largefov-voc12")

    assert result.exit_code == 0, result.output
    assert server.requests == ["/lenet/" + FILE, "/good/" + FILE]
    assert (home / info.name / FILE).read_bytes() == largefov_bytes
    assert registry.read_source(info).source == urls[1]


def test_pull_of_a_verified_model_does_nothing_unless_forced(server, monkeypatch, home, largefov_bytes):
    info = use_model(monkeypatch, [server.serve("/" + FILE, largefov_bytes)])
    assert run_cli("models", "pull", "largefov-voc12").exit_code == 0
    onnx_file = home / info.name / "model.onnx"
    requests, mtime = len(server.requests), onnx_file.stat().st_mtime_ns

    result = run_cli("models", "pull", "largefov-voc12")

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(onnx_file)
    assert len(result.stderr.strip().splitlines()) == 1
    assert "already cached and verified" in result.stderr and sha256(largefov_bytes) in result.stderr
    assert len(server.requests) == requests and onnx_file.stat().st_mtime_ns == mtime

    result = run_cli("models", "pull", "--force", "largefov-voc12")

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(onnx_file)
    assert len(server.requests) == requests + 1 and onnx_file.stat().st_mtime_ns != mtime


def test_pull_fetches_again_when_the_cache_is_not_verified(server, monkeypatch, home, largefov_bytes):
    # A graph and weights cached before sources were recorded: no source.json, so not verified.
    info = use_model(monkeypatch, [server.serve("/" + FILE, largefov_bytes)])
    (home / info.name).mkdir(parents=True)
    (home / info.name / "model.onnx").write_bytes(b"graph")
    (home / info.name / FILE).write_bytes(largefov_bytes)
    assert run_cli("models", "list").stdout.startswith(f"{info.name}\tunverified\t-\t")

    result = run_cli("models", "pull", "largefov-voc12")

    assert result.exit_code == 0, result.output
    assert server.requests == ["/" + FILE]
    assert registry.verified(info).sha256 == sha256(largefov_bytes)


def test_pull_from_a_mirror_that_serves_a_file_that_is_not_largefov(server, monkeypatch, home):
    server.serve("/" + FILE, LENET.read_bytes())
    use_model(monkeypatch, ["http://127.0.0.1:9/" + FILE])
    monkeypatch.setenv("DEEPLAB_MIRROR", server.url())

    result = run_cli("models", "pull", "largefov-voc12")

    assert_model_error(result, f"{server.url('/' + FILE)}: not usable", "not DeepLab-LargeFOV")
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
    assert "could not be fetched" in message and f"{info.urls[0]}: HTTP 404" in message
    assert "deeplab models import FILE" in message and "\n" not in message
    assert files_in(home / info.name) == []


def test_ensure_converts_cached_weights_without_the_network(server, monkeypatch, home, largefov_bytes):
    info = use_model(monkeypatch, [server.serve("/" + FILE, largefov_bytes)])
    (home / info.name).mkdir(parents=True)
    (home / info.name / FILE).write_bytes(largefov_bytes)
    monkeypatch.setenv("DEEPLAB_OFFLINE", "1")

    assert registry.ensure(info) == home / info.name / "model.onnx"
    assert files_in(home / info.name) == ["model.onnx", FILE]
    assert server.requests == []


# -- git blob ids and sizes ----------------------------------------------------------------------------


def test_git_blob_id_is_gits(tmp_path):
    # Ids git itself gives: `git hash-object` of an empty file and of "hello\n".
    from deeplab_cli.model.download import git_blob_id

    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "hello").write_bytes(b"hello\n")
    assert git_blob_id(tmp_path / "empty") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert git_blob_id(tmp_path / "hello") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_fetch_checks_the_git_blob_id(server, tmp_path):
    good = server.serve("/good", b"hello\n")
    with fetch([good], tmp_path, git_blob_sha1="CE013625030BA8DBA906F756967F9E9CA394464A") as fetched:
        assert fetched.path.read_bytes() == b"hello\n"
    other = server.serve("/other", b"hullo\n")
    with pytest.raises(DownloadError, match=f"{other}: git blob id [0-9a-f]{{40}} does not match the expected ce01"):
        with fetch([other], tmp_path, git_blob_sha1="ce013625030ba8dba906f756967f9e9ca394464a"):
            pass
    assert files_in(tmp_path) == []


# -- the default model: the authors' weights, else the PyTorch port's -----------------------------------

PORT_FILE = "model_last_20000_poly2.pth"


@pytest.fixture(scope="module")
def port_bytes(weights, tmp_path_factory) -> bytes:
    """The port's checkpoint of `weights`, as PyTorch 1.2 saved it: legacy format, DataParallel keys."""
    from pth_writer import write_pth
    from reference import port_state_dict

    path = tmp_path_factory.mktemp("pth") / PORT_FILE
    write_pth(path, port_state_dict(weights), zip_format=False, location="cuda:0")
    return path.read_bytes()


def use_models(monkeypatch, authors_urls, port_urls, port_blob=None):
    """The registry's two VOC models, fetching from the given URLs (no archive): (authors', port's)."""
    authors = dataclasses.replace(registry.get_model(registry.DEFAULT_MODEL), urls=tuple(authors_urls), archive=None)
    port = dataclasses.replace(registry.get_model(registry.FALLBACK_MODEL), urls=tuple(port_urls),
                               git_blob_sha1=port_blob)
    monkeypatch.setattr(registry, "known_models", lambda: {authors.name: authors, port.name: port})
    return authors, port


def git_blob(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_pull_of_the_port_checks_its_git_blob_id(server, monkeypatch, home, port_bytes):
    _, port = use_models(monkeypatch, [], [server.serve("/bad/" + PORT_FILE, port_bytes + b"\0"),
                                           server.serve("/good/" + PORT_FILE, port_bytes)], git_blob(port_bytes))

    result = run_cli("models", "pull", port.name)

    assert result.exit_code == 0, result.output
    assert server.requests == ["/bad/" + PORT_FILE, "/good/" + PORT_FILE]  # the altered file was refused
    assert files_in(home / port.name) == ["model.onnx", PORT_FILE, "source.json"]


def test_the_default_falls_back_to_the_port_when_the_authors_weights_cannot_be_had(
        server, monkeypatch, home, port_bytes, tmp_path):
    authors, port = use_models(monkeypatch, [server.url("/dead/" + FILE)],
                               [server.serve("/port/" + PORT_FILE, port_bytes)], git_blob(port_bytes))
    images = tmp_path / "img"
    images.mkdir()
    cv2.imwrite(str(images / "even.png"), natural_image(40, 64, seed=1))  # even sides: the port pads to 41x65

    result = run_cli("segment", images, "--out", tmp_path / "masks", "--json", "--device", "cpu", "-j", "0")

    # The README's first command ends with masks, and says on stderr and in the JSON which model made them.
    assert result.exit_code == 0, result.output
    assert server.requests == ["/dead/" + FILE, "/port/" + PORT_FILE]
    assert f"deeplab: using {port.name}: {authors.name} could not be fetched" in result.stderr
    line = json.loads(result.stdout)
    assert line["status"] == "ok" and line["model"] == port.name
    assert Image.open(line["outputs"][0]).size == (64, 40)

    # Later runs use the cached port without asking the dead hosts again, and still say so, even with -q.
    result = run_cli("segment", images, "--out", tmp_path / "again", "-q", "--device", "cpu", "-j", "0")
    assert result.exit_code == 0, result.output
    assert server.requests == ["/dead/" + FILE, "/port/" + PORT_FILE]
    assert f"deeplab: using {port.name}: {authors.name} is not in the cache" in result.stderr


def test_a_named_model_is_never_replaced(server, monkeypatch, home, port_bytes, tmp_path):
    authors, port = use_models(monkeypatch, [server.url("/dead/" + FILE)], [server.serve("/port/" + PORT_FILE, port_bytes)])
    (tmp_path / "img").mkdir()

    result = run_cli("segment", tmp_path / "img", "--out", tmp_path / "masks", "-m", authors.name)

    assert_model_error(result, f"{authors.name} is not in the cache", "HTTP 404")
    assert server.requests == ["/dead/" + FILE]


def test_the_default_says_what_failed_when_neither_model_can_be_had(server, monkeypatch, home, tmp_path):
    authors, port = use_models(monkeypatch, [server.url("/dead/" + FILE)], [server.url("/gone/" + PORT_FILE)])
    (tmp_path / "img").mkdir()

    result = run_cli("segment", tmp_path / "img", "--out", tmp_path / "masks")

    assert_model_error(result, f"{authors.name} is not in the cache", f"the fallback {port.name} could not be had",
                       "/dead/" + FILE, "/gone/" + PORT_FILE)
    assert files_in(home / authors.name) == [] and files_in(home / port.name) == []


def test_the_authors_weights_are_used_when_cached(server, monkeypatch, home, largefov_bytes, port_bytes):
    authors, port = use_models(monkeypatch, [server.serve("/" + FILE, largefov_bytes)],
                               [server.serve("/port/" + PORT_FILE, port_bytes)])
    assert run_cli("models", "pull", port.name).exit_code == 0
    assert run_cli("models", "pull", authors.name).exit_code == 0
    requests = len(server.requests)

    info, path, note = registry.ensure_default()

    assert (info.name, path, note) == (authors.name, home / authors.name / "model.onnx", None)
    assert len(server.requests) == requests
