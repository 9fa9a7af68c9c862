"""Downloading a weights file into torch.hub's cache, the way torchvision's
weights arrive: the hash prefix in the file name checked, a progress bar, a
temporary file renamed into place, and what a broken transfer had received
kept and resumed.

A file already in the cache is used as it is (not re-hashed): its zip
checksums are still verified when it is read (weights.read_state_dict).
"""
import hashlib
import http.client
import os
import re
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from typing import BinaryIO, Callable, Iterator, Optional

import torch

# torch.hub's convention: "resnet50-11ad3fa6.pth" holds a file whose SHA-256
# starts with 11ad3fa6.
_HASH_PREFIX = re.compile(r"-([a-f0-9]{6,})\.")
_CHUNK = 1 << 20
# Attempts per download: a transfer that breaks off resumes where it stopped.
MAX_ATTEMPTS = 3
DEFAULT_TIMEOUT_S = 30.0


class WeightsDownloadError(RuntimeError):
    """A weights file could not be downloaded, or did not match its hash."""


def hub_checkpoint_dir() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _timeout_s() -> float:
    """Seconds without a byte before a transfer counts as stalled
    (RESNET_FAST_DOWNLOAD_TIMEOUT, default 30)."""
    raw = os.environ.get("RESNET_FAST_DOWNLOAD_TIMEOUT", "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"RESNET_FAST_DOWNLOAD_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"RESNET_FAST_DOWNLOAD_TIMEOUT must be positive, got {raw!r}")
    return value


def file_name_of(url: str) -> str:
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise ValueError(f"{url} does not end in a file name")
    return name


def cached_download(url: str, progress: bool = True) -> str:
    """The path of `url`'s file in torch.hub's cache, downloaded first if it
    is not there yet."""
    name = file_name_of(url)
    folder = hub_checkpoint_dir()
    path = os.path.join(folder, name)
    if os.path.isfile(path):
        return path
    os.makedirs(folder, exist_ok=True)
    with _exclusive(path + ".lock"):
        if os.path.isfile(path):  # another process finished it while this one waited
            return path
        _download(url, path, progress)
    return path


def _failure(url: str, path: str, reason: str) -> WeightsDownloadError:
    return WeightsDownloadError(
        f"could not download {url} to {path}: {reason}. On a machine without network, download the file "
        f"elsewhere and place it at {path} (or pass weights='path/to/{os.path.basename(path)}')"
    )


def _download(url: str, path: str, progress: bool) -> None:
    partial = path + ".partial"
    last_error = "no attempt made"
    for _ in range(MAX_ATTEMPTS):
        try:
            if _fetch_into(url, partial, progress):
                break
            last_error = "the server closed the connection before the whole file arrived"
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # what was kept is not a prefix the server can continue: start over
                os.remove(partial)
                last_error = "the server refused to resume (HTTP 416)"
                continue
            if exc.code < 500:
                raise _failure(url, path, f"HTTP {exc.code} {exc.reason}") from exc
            last_error = f"HTTP {exc.code} {exc.reason}"
        except (socket.timeout, TimeoutError):
            last_error = f"no data for {_timeout_s():g} s (RESNET_FAST_DOWNLOAD_TIMEOUT)"
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (socket.timeout, TimeoutError)):
                last_error = f"no data for {_timeout_s():g} s (RESNET_FAST_DOWNLOAD_TIMEOUT)"
                continue
            raise _failure(url, path, f"{exc.reason} (is this machine offline?)") from exc
        except (ConnectionError, http.client.HTTPException) as exc:  # incl. IncompleteRead
            last_error = f"the connection broke: {exc!r}"
    else:
        raise _failure(url, path, f"{last_error}, {MAX_ATTEMPTS} times; what arrived is kept in {partial} and the "
                                  f"next attempt resumes from it")
    _check_hash(url, path, partial)
    os.replace(partial, path)


def _fetch_into(url: str, partial: str, progress: bool) -> bool:
    """One transfer into `partial`, continuing what it already holds where the
    server allows. True when the whole file arrived (as far as the server's
    Content-Length tells)."""
    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    request = urllib.request.Request(url, headers={"User-Agent": "resnet_fast"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    with urllib.request.urlopen(request, timeout=_timeout_s()) as response:
        if response.status == 206 and _range_start(response) != have:  # not the part asked for: start over
            if os.path.exists(partial):
                os.remove(partial)
            return False
        resumed = have > 0 and response.status == 206
        if not resumed:
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(partial, "ab" if resumed else "wb") as out, _progress_bar(total, have, progress, url) as advance:
            received = _copy(response, out, advance)
    return total is None or have + received == total


def _range_start(response) -> Optional[int]:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _copy(source, out: BinaryIO, advance: Callable[[int], None]) -> int:
    received = 0
    while True:
        chunk = source.read(_CHUNK)
        if not chunk:
            return received
        out.write(chunk)
        received += len(chunk)
        advance(len(chunk))


def _check_hash(url: str, path: str, partial: str) -> None:
    match = _HASH_PREFIX.search(os.path.basename(path))
    if match is None:
        return
    digest = hashlib.sha256()
    with open(partial, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(match.group(1)):
        os.remove(partial)
        raise _failure(url, path, f"its SHA-256 {digest.hexdigest()[:16]}... does not start with the {match.group(1)} "
                                  "its name promises (the download was removed)")


@contextmanager
def _progress_bar(total: Optional[int], initial: int, enabled: bool, url: str) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda n: None
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        with tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"Downloading {os.path.basename(url)}", file=sys.stderr) as bar:
            yield bar.update
        return
    yield _text_progress(total, initial, url)
    print(file=sys.stderr)


def _text_progress(total: Optional[int], initial: int, url: str) -> Callable[[int], None]:
    """A one-line percentage on stderr, where tqdm is not installed."""
    done = [initial]

    def advance(n: int) -> None:
        done[0] += n
        shown = f"{100 * done[0] / total:5.1f}%" if total else f"{done[0] / 2**20:.1f} MiB"
        print(f"\rDownloading {os.path.basename(url)}: {shown}", end="", file=sys.stderr, flush=True)

    return advance


@contextmanager
def _exclusive(lock_path: str) -> Iterator[None]:
    """One process at a time per file (torchrun starts several): the others
    wait, then find the file in place."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; downloads are not shared
        yield
        return
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
