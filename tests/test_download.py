"""Weights by URL, downloaded into torch.hub's cache, against a local HTTP
server this test starts on 127.0.0.1: download, cache reuse, resuming a
broken transfer, a wrong hash, a truncated body, a 404, a stalled server and
no server at all. Nothing here reaches the internet."""
import hashlib
import io
import os
import threading
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import resnet_fast
from resnet_fast.models import download
from resnet_fast.models.download import WeightsDownloadError

from conftest import assert_rel


def _weights_bytes(num_classes: int = 5) -> bytes:
    model = resnet_fast.resnet18(num_classes=num_classes)
    for p in model.parameters():
        torch.nn.init.normal_(p.data, std=0.05)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


class _Handler(BaseHTTPRequestHandler):
    server: "_WeightsServer"

    def do_GET(self):  # noqa: N802 (http.server's naming)
        srv = self.server
        srv.requests.append({"path": self.path, "range": self.headers.get("Range")})
        body = srv.files.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        if srv.honour_range and self.headers.get("Range", "").startswith("bytes="):
            start = int(self.headers["Range"][len("bytes="):].split("-")[0])
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if srv.behaviour == "stall":
            srv.stall.wait(20)  # released when the test ends
            return
        cut = len(body) if srv.breaks_left == 0 else start + (len(body) - start) // 2
        if srv.breaks_left > 0:
            srv.breaks_left -= 1
        self.wfile.write(body[start:cut])

    def log_message(self, *args):
        pass


class _WeightsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = {}
        self.requests = []
        self.behaviour = "normal"
        self.breaks_left = 0  # responses that send half their body, then close
        self.honour_range = True
        self.stall = threading.Event()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


@pytest.fixture
def server():
    srv = _WeightsServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.stall.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def hub_dir(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    monkeypatch.setenv("RESNET_FAST_DOWNLOAD_TIMEOUT", "5")
    return hub / "checkpoints"


def _hashed_name(body: bytes, stem: str = "tiny") -> str:
    return f"{stem}-{hashlib.sha256(body).hexdigest()[:8]}.pth"


def _call_bounded(fn, seconds: float = 60):
    """fn() in a thread; a hang fails the test instead of blocking the suite."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 (handed back to the test)
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: a hang"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_download_loads_and_is_reused_from_the_cache(server, hub_dir, capsys):
    body = _weights_bytes()
    name = _hashed_name(body)
    server.files[name] = body
    model = resnet_fast.resnet18(weights=server.url(name), num_classes=5).eval()
    assert (hub_dir / name).read_bytes() == body
    assert not [p for p in os.listdir(hub_dir) if p.endswith(".partial")]
    assert f"Downloading {name}" in capsys.readouterr().err  # the progress bar
    expected = torch.load(io.BytesIO(body), weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())

    again = resnet_fast.resnet18(weights=server.url(name), num_classes=5, progress=False).eval()
    assert len(server.requests) == 1  # the second build read the cache
    assert capsys.readouterr().err == ""
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_rel(again(x), model(x))


def test_a_broken_transfer_resumes_where_it_stopped(server, hub_dir):
    body = _weights_bytes()
    name = _hashed_name(body)
    server.files[name] = body
    server.breaks_left = 1
    path = _call_bounded(lambda: download.cached_download(server.url(name), progress=False))
    assert open(path, "rb").read() == body
    assert [r["range"] for r in server.requests] == [None, f"bytes={len(body) // 2}-"]


def test_a_server_that_cannot_resume_sends_the_whole_file_again(server, hub_dir):
    body = _weights_bytes()
    name = _hashed_name(body)
    server.files[name] = body
    server.breaks_left = 1
    server.honour_range = False  # answers a Range request with 200 and the whole body
    path = _call_bounded(lambda: download.cached_download(server.url(name), progress=False))
    assert open(path, "rb").read() == body
    assert len(server.requests) == 2


def test_a_wrong_hash_is_refused_and_nothing_is_kept(server, hub_dir):
    body = _weights_bytes()
    name = "tiny-0123abcd.pth"
    assert not hashlib.sha256(body).hexdigest().startswith("0123abcd")
    server.files[name] = body
    with pytest.raises(WeightsDownloadError, match="does not start with the 0123abcd") as info:
        resnet_fast.resnet18(weights=server.url(name), num_classes=5, progress=False)
    assert server.url(name) in str(info.value) and str(hub_dir / name) in str(info.value)
    assert not (hub_dir / name).exists() and not (hub_dir / (name + ".partial")).exists()


def test_a_body_that_always_breaks_off_fails_naming_url_and_cache_path(server, hub_dir):
    body = _weights_bytes()
    name = _hashed_name(body)
    server.files[name] = body
    server.breaks_left = 10**6
    server.honour_range = False
    with pytest.raises(WeightsDownloadError) as info:
        _call_bounded(lambda: download.cached_download(server.url(name), progress=False))
    message = str(info.value)
    assert "before the whole file arrived" in message
    assert server.url(name) in message and f"place it at {hub_dir / name}" in message
    assert len(server.requests) == download.MAX_ATTEMPTS
    assert not (hub_dir / name).exists()


def test_404_fails_at_once_naming_url_and_cache_path(server, hub_dir):
    url = server.url("missing-12345678.pth")
    with pytest.raises(WeightsDownloadError, match="HTTP 404") as info:
        resnet_fast.resnet50(weights=url, progress=False)
    assert url in str(info.value) and str(hub_dir / "missing-12345678.pth") in str(info.value)
    assert len(server.requests) == 1  # a client error is not retried


def test_a_stalled_server_times_out(server, hub_dir, monkeypatch):
    monkeypatch.setenv("RESNET_FAST_DOWNLOAD_TIMEOUT", "0.3")
    body = _weights_bytes()
    name = _hashed_name(body)
    server.files[name] = body
    server.behaviour = "stall"
    with pytest.raises(WeightsDownloadError, match=r"no data for 0\.3 s"):
        _call_bounded(lambda: download.cached_download(server.url(name), progress=False))
    assert len(server.requests) == download.MAX_ATTEMPTS


def test_no_server_says_the_machine_may_be_offline(server, hub_dir):
    url = server.url("tiny-12345678.pth")
    server.shutdown()
    server.server_close()  # nothing listens on the port any more
    with pytest.raises(WeightsDownloadError, match="offline") as info:
        _call_bounded(lambda: download.cached_download(url, progress=False))
    assert "place it at" in str(info.value)


@pytest.mark.parametrize("value", ["soon", "0", "-1"])
def test_bad_timeout_setting_is_named(server, hub_dir, monkeypatch, value):
    monkeypatch.setenv("RESNET_FAST_DOWNLOAD_TIMEOUT", value)
    with pytest.raises(ValueError, match="RESNET_FAST_DOWNLOAD_TIMEOUT"):
        download.cached_download(server.url("tiny-12345678.pth"), progress=False)


def test_url_without_a_file_name_is_refused():
    with pytest.raises(ValueError, match="does not end in a file name"):
        download.cached_download("http://127.0.0.1:9/", progress=False)


def test_offline_torchvision_weights_name_url_and_cache_path(hub_dir, monkeypatch):
    torchvision = pytest.importorskip("torchvision")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(download.urllib.request, "urlopen", offline)
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    with pytest.raises(WeightsDownloadError) as info:
        resnet_fast.resnet18(weights="DEFAULT", progress=False)
    message = str(info.value)
    assert weights.url in message and str(hub_dir / os.path.basename(weights.url)) in message
    assert "offline" in message
