"""Checkpoint registry, resolution errors (ntt/backbones/checkpoints.py) and the resumable, verified downloader
(ntt/backbones/download.py, local HTTP server)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ntt.backbones import checkpoints as ck
from ntt.backbones.checkpoints import (
    OFFICIAL_CHECKPOINTS,
    CheckpointInfo,
    MissingCheckpointError,
    check_checkpoints,
    resolve_checkpoint,
)
from ntt.backbones.download import ChecksumMismatchError, DownloadError, download, download_main

PAYLOAD = os.urandom(3 * 1024 * 1024 + 12345)  # a few MB, not a multiple of the chunk size
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Server:
    """A local HTTP file server with configurable Range support and connection drops."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.support_range = True
        self.drop_first = 0  # drop the connection mid-body on this many first GET requests
        self.requests: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # silence
                pass

            def do_GET(self):  # noqa: N802
                server.requests.append({k: v for k, v in self.headers.items()})
                data = server.files.get(self.path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start, status = 0, 200
                rng = self.headers.get("Range")
                if rng and server.support_range:
                    m = re.fullmatch(r"bytes=(\d+)-", rng)
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                if server.support_range:
                    self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if server.drop_first > 0:
                    server.drop_first -= 1
                    self.wfile.write(body[: len(body) // 3])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # abrupt end: fewer bytes than Content-Length
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server({"/files/model.pt": PAYLOAD})
    yield s
    s.close()


def _dl(server, tmp_path, **kw):
    kw.setdefault("sha256", PAYLOAD_SHA)
    kw.setdefault("progress", False)
    kw.setdefault("retry_wait", 0.0)
    return download(server.url("/files/model.pt"), tmp_path, chunk_size=64 * 1024, **kw)


# ----------------------------------------------------------------------------------------------------
# Download
# ----------------------------------------------------------------------------------------------------


def test_download_success_verified_and_skip_existing(server, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        path = _dl(server, tmp_path)
    assert path == tmp_path / "model.pt" and path.read_bytes() == PAYLOAD
    assert not (tmp_path / "model.pt.part").exists()
    assert "sha256 verified" in caplog.text
    assert len(server.requests) == 1 and "Range" not in server.requests[0]
    # the final file exists and verifies: no request at all
    assert _dl(server, tmp_path) == path
    assert len(server.requests) == 1


def test_existing_file_that_does_not_verify_is_downloaded_again(server, tmp_path):
    (tmp_path / "model.pt").write_bytes(b"corrupt")
    path = _dl(server, tmp_path)
    assert path.read_bytes() == PAYLOAD and len(server.requests) == 1


def test_checksum_mismatch_raises_and_leaves_no_file(server, tmp_path):
    with pytest.raises(ChecksumMismatchError, match="sha256 mismatch") as err:
        _dl(server, tmp_path, sha256="0" * 64)
    assert PAYLOAD_SHA in str(err.value) and "0" * 64 in str(err.value)
    assert not (tmp_path / "model.pt").exists()
    assert not (tmp_path / "model.pt.part").exists()


def test_resume_from_part_file(server, tmp_path):
    half = len(PAYLOAD) // 2
    (tmp_path / "model.pt.part").write_bytes(PAYLOAD[:half])
    path = _dl(server, tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert server.requests[0]["Range"] == f"bytes={half}-"
    assert not (tmp_path / "model.pt.part").exists()


def test_interrupted_transfer_is_resumed_by_the_next_call(server, tmp_path):
    server.drop_first = 1
    with pytest.raises(DownloadError, match="run the same command again to resume"):
        _dl(server, tmp_path, retries=0)
    part = tmp_path / "model.pt.part"
    have = part.stat().st_size
    assert 0 < have < len(PAYLOAD) and part.read_bytes() == PAYLOAD[:have]
    assert not (tmp_path / "model.pt").exists()
    path = _dl(server, tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert server.requests[-1]["Range"] == f"bytes={have}-"


def test_interrupted_transfer_is_resumed_within_one_call(server, tmp_path):
    server.drop_first = 2
    path = _dl(server, tmp_path, retries=3)
    assert path.read_bytes() == PAYLOAD
    assert len(server.requests) == 3
    assert (
        "Range" not in server.requests[0] and "Range" in server.requests[1] and "Range" in server.requests[2]
    )


def test_server_without_range_support_restarts_cleanly(server, tmp_path, caplog):
    server.support_range = False
    (tmp_path / "model.pt.part").write_bytes(b"\0" * 1000)  # would corrupt the file if appended to
    with caplog.at_level(logging.WARNING):
        path = _dl(server, tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert server.requests[0]["Range"] == "bytes=1000-"
    assert "ignored the Range request" in caplog.text


def test_complete_part_file_answered_416(server, tmp_path):
    (tmp_path / "model.pt.part").write_bytes(PAYLOAD)
    path = _dl(server, tmp_path)
    assert path.read_bytes() == PAYLOAD and len(server.requests) == 1


def test_unknown_hash_is_recorded_with_a_warning(server, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        path = download(server.url("/files/model.pt"), tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert "could NOT verify" in caplog.text
    assert (tmp_path / "model.pt.sha256").read_text().split()[0] == PAYLOAD_SHA


def test_http_error(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(server.url("/files/nope.pt"), tmp_path, progress=False)
    assert not list(tmp_path.iterdir()) or not (tmp_path / "nope.pt").exists()


def test_unknown_name(tmp_path):
    with pytest.raises(KeyError, match="sam2_hiera_l"):
        download("sam3_giant", tmp_path)


def test_registry_name_uses_registry_url_and_hash(server, tmp_path, monkeypatch):
    info = CheckpointInfo("fake_model", "sam2", server.url("/files/model.pt"), "fake.pt", PAYLOAD_SHA, "test")
    monkeypatch.setitem(OFFICIAL_CHECKPOINTS, "fake_model", info)
    path = download("fake_model", tmp_path, progress=False)
    assert path == tmp_path / "fake.pt" and path.read_bytes() == PAYLOAD
    bad = CheckpointInfo("bad_model", "sam2", server.url("/files/model.pt"), "bad.pt", "1" * 64, "test")
    monkeypatch.setitem(OFFICIAL_CHECKPOINTS, "bad_model", bad)
    with pytest.raises(ChecksumMismatchError):
        download("bad_model", tmp_path, progress=False)
    # --no-verify escape hatch: downloads and records the computed hash
    path = download("bad_model", tmp_path, progress=False, verify=False)
    assert path.read_bytes() == PAYLOAD and (tmp_path / "bad.pt.sha256").is_file()


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def test_download_main_list(capsys, tmp_path):
    (tmp_path / "sam2_hiera_large.pt").write_bytes(b"x")
    assert download_main(["--list", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in OFFICIAL_CHECKPOINTS:
        assert name in out
    line = next(ln for ln in out.splitlines() if ln.startswith("sam2_hiera_l "))
    assert (
        " yes " in line
        and "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_large.pt" in line
    )


def test_download_main_usage_errors(tmp_path):
    from ntt import cli

    assert cli.main(["download", "--dir", str(tmp_path)]) == 2
    assert cli.main(["download", "not_a_model", "--dir", str(tmp_path)]) == 2


def test_download_main_downloads_and_reports_failures(server, tmp_path, monkeypatch):
    good = CheckpointInfo("fake_model", "dinov2", server.url("/files/model.pt"), "fake.pt", PAYLOAD_SHA, "")
    gone = CheckpointInfo("gone_model", "dinov2", server.url("/files/gone.pt"), "gone.pt", None, "")
    monkeypatch.setitem(OFFICIAL_CHECKPOINTS, "fake_model", good)
    monkeypatch.setitem(OFFICIAL_CHECKPOINTS, "gone_model", gone)
    assert download_main(["fake_model", "--dir", str(tmp_path), "--quiet"]) == 0
    assert (tmp_path / "fake.pt").read_bytes() == PAYLOAD
    assert download_main(["gone_model", "fake_model", "--dir", str(tmp_path), "--quiet"]) == 1


def test_default_checkpoint_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("NTT_CHECKPOINTS", str(tmp_path))
    assert ck.default_checkpoint_dir() == tmp_path
    monkeypatch.delenv("NTT_CHECKPOINTS")
    assert ck.default_checkpoint_dir() == Path("checkpoints")


# ----------------------------------------------------------------------------------------------------
# Registry and resolution
# ----------------------------------------------------------------------------------------------------


def test_registry_is_complete_and_consistent():
    sam2 = {n for n, i in OFFICIAL_CHECKPOINTS.items() if i.family == "sam2"}
    assert sam2 == {f"{v}_hiera_{s}" for v in ("sam2", "sam2.1") for s in ("t", "s", "bplus", "l")}
    dino = {n for n, i in OFFICIAL_CHECKPOINTS.items() if i.family == "dinov2"}
    assert {"dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14"} <= dino
    for name, info in OFFICIAL_CHECKPOINTS.items():
        assert info.name == name
        assert info.url.startswith("https://dl.fbaipublicfiles.com/") and info.url.endswith(
            "/" + info.filename
        )
        assert info.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", info.sha256)
    assert OFFICIAL_CHECKPOINTS["sam2_hiera_l"].url == (
        "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_large.pt"
    )
    assert OFFICIAL_CHECKPOINTS["sam2.1_hiera_bplus"].url == (
        "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_base_plus.pt"
    )
    assert OFFICIAL_CHECKPOINTS["dinov2_vitl14"].url == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
    )
    hashes = [i.sha256 for i in OFFICIAL_CHECKPOINTS.values() if i.sha256]
    assert len(hashes) == len(set(hashes))


def test_resolve_checkpoint(tmp_path):
    f = tmp_path / "sam2_hiera_large.pt"
    f.write_bytes(b"x")
    assert resolve_checkpoint(str(f), name="sam2_hiera_l") == f
    missing = tmp_path / "sub" / "sam2.1_hiera_large.pt"
    with pytest.raises(MissingCheckpointError) as err:
        resolve_checkpoint(missing, name="sam2.1_hiera_l")
    msg = str(err.value)
    assert "sam2.1_hiera_large.pt" in msg and str(missing.resolve()) in msg
    assert "ntt download sam2.1_hiera_l" in msg and "make checkpoints" in msg
    with pytest.raises(MissingCheckpointError, match="official file is named dinov2_vitl14_pretrain.pth"):
        resolve_checkpoint(tmp_path / "vitl.pth", name="dinov2_vitl14")
    with pytest.raises(MissingCheckpointError, match="not an official checkpoint"):
        resolve_checkpoint(tmp_path / "mine.pt", name="my_model")
    with pytest.raises(MissingCheckpointError, match="No checkpoint given"):
        resolve_checkpoint(None, name="sam2_hiera_l")
    assert isinstance(MissingCheckpointError("x"), FileNotFoundError)


def test_every_missing_checkpoint_is_named_at_once_with_one_fetch_command(tmp_path, monkeypatch):
    monkeypatch.delenv(ck.ENV_CHECKPOINT_DIR, raising=False)
    monkeypatch.chdir(tmp_path)
    here = tmp_path / "sam2.1_hiera_tiny.pt"
    here.write_bytes(b"x")
    sam2 = {"name": "sam2.1_hiera_t", "checkpoint": str(tmp_path / "ck" / "sam2.1_hiera_tiny.pt")}
    dino = {"name": "dinov2_vits14", "checkpoint": str(tmp_path / "ck" / "dinov2_vits14_pretrain.pth")}
    check_checkpoints([{**sam2, "checkpoint": str(here)}, {**dino, "checkpoint": None, "random_init": True}])
    with pytest.raises(MissingCheckpointError) as one:  # one missing: its own message, unchanged
        check_checkpoints([{**sam2, "checkpoint": str(here)}, dino])
    assert "2 checkpoints" not in str(one.value) and "ntt download dinov2_vits14 --dir" in str(one.value)
    with pytest.raises(MissingCheckpointError) as two:
        check_checkpoints([sam2, dino])
    msg = str(two.value)
    assert msg.startswith("2 checkpoints are missing:")
    assert "sam2.1_hiera_tiny.pt" in msg and "dinov2_vits14_pretrain.pth" in msg
    assert f"fetch them all with: `ntt download sam2.1_hiera_t dinov2_vits14 --dir {tmp_path / 'ck'}`" in msg
    with pytest.raises(MissingCheckpointError) as default_dir:  # the default folder needs no --dir
        check_checkpoints(
            [{**sam2, "checkpoint": "checkpoints/a.pt"}, {**dino, "checkpoint": "checkpoints/b.pth"}]
        )
    assert "fetch them all with: `ntt download sam2.1_hiera_t dinov2_vits14`" in str(default_dir.value)
    with pytest.raises(MissingCheckpointError) as two_folders:  # no one command fetches into two folders
        check_checkpoints([sam2, {**dino, "checkpoint": str(tmp_path / "other" / "d.pth")}])
    assert "2 checkpoints are missing" in str(two_folders.value) and "fetch them all" not in str(
        two_folders.value
    )


def test_unresolvable_host_fails_at_once_without_retry_waits(tmp_path):
    """Offline (no DNS) is a definite answer: no retries, no backoff sleeps, nothing left behind."""
    import time

    t0 = time.perf_counter()
    with pytest.raises(DownloadError, match="nothing kept"):
        download("http://ntt-test.invalid/model.pt", tmp_path, retries=3, retry_wait=5.0, progress=False)
    assert time.perf_counter() - t0 < 5.0
    assert list(tmp_path.iterdir()) == []
