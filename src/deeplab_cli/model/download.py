"""Downloads that never look complete unless they are: temporary file, length and hash check, then the
caller renames it into place."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import secrets
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from deeplab_cli.errors import DownloadError

Progress = Callable[[int, "int | None"], None]  # (bytes just received, total bytes or None)
Check = Callable[[Path], "str | None"]  # a downloaded file -> why it is unusable, or None to accept it


class Fetched(NamedTuple):
    path: Path  # the temporary file, deleted on leaving the `fetch` block unless the caller renamed it
    sha256: str
    url: str  # the one that answered


@contextlib.contextmanager
def fetch(
    urls: list[str], directory: Path, *, sha256: str | None = None, git_blob_sha1: str | None = None,
    check: Check | None = None, progress: Progress | None = None, timeout: float = 60.0,
) -> Iterator[Fetched]:
    """Download the first of `urls` that gives an acceptable file into a temporary file in `directory`.

    A file is acceptable when it arrived whole, matches `sha256` and `git_blob_sha1` (each when given) and `check(path)` returns None; otherwise it is deleted and the next URL is tried, since a mirror or an archive may serve an
    error page or another file where the real one is missing. The yielded file is deleted on leaving the
    block unless the caller has renamed it, so nothing partial or rejected is ever left behind. Raises
    DownloadError (one line) naming every URL tried and why it failed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in urls:
        tmp = directory / f".download-{secrets.token_hex(6)}.tmp"
        # Not mkstemp: its mode 0o600 would stay on the cached weights and lock out the other users of a
        # shared DEEPLAB_HOME. 0o666 lets the umask decide, as for every other file the package writes.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as out:
                digest = _copy(url, out, progress, timeout)
            if sha256 and digest != sha256.lower():
                raise _Failed(f"SHA-256 {digest} does not match the expected {sha256}")
            if git_blob_sha1 and (blob := git_blob_id(tmp)) != git_blob_sha1.lower():
                raise _Failed(f"git blob id {blob} does not match the expected {git_blob_sha1}")
            if check and (reason := check(tmp)):
                raise _Failed(reason)
        except _Failed as e:
            tmp.unlink(missing_ok=True)
            failures.append(f"{url}: {e}")
            continue
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        try:
            yield Fetched(tmp, digest, url)
        finally:
            tmp.unlink(missing_ok=True)
        return
    raise DownloadError("download failed: " + "; ".join(failures or ["no URL to try"]))


class _Failed(Exception):
    pass


def git_blob_id(path: Path) -> str:
    """The id git gives the file's bytes as a blob: SHA-1 of `blob <size>\\0` and the bytes."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _copy(url: str, out, progress: Progress | None, timeout: float) -> str:
    digest, received = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            while block := response.read(1 << 20):
                out.write(block)
                digest.update(block)
                received += len(block)
                if progress:
                    progress(len(block), total)
    except urllib.error.HTTPError as e:
        raise _Failed(f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise _Failed(str(getattr(e, "reason", e))) from None
    except http.client.HTTPException as e:  # IncompleteRead and friends when the server drops the connection
        raise _Failed(f"transfer broke off ({type(e).__name__})") from None
    if total is not None and received != total:
        raise _Failed(f"transfer broke off after {received} of {total} bytes")
    if received == 0:
        raise _Failed("empty response")

    return digest.hexdigest()
