"""Resumable, sha256-verified download of the official checkpoints, and the ``ntt download`` command.

What to fetch comes from the registry (:data:`ntt.backbones.checkpoints.OFFICIAL_CHECKPOINTS`) or an http(s)
URL. A file whose registry sha256 is unknown is downloaded all the same: its computed hash is written next to
it (``<file>.sha256``) with a warning that the download could not be verified.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

from ntt.backbones.checkpoints import ENV_CHECKPOINT_DIR, OFFICIAL_CHECKPOINTS, default_checkpoint_dir
from ntt.utils.errors import UserError
from ntt.utils.files import sha256_file, write_text_atomic

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1 << 20


class DownloadError(UserError, RuntimeError):
    """A download failed (HTTP error, connection dropped with no retries left, size mismatch)."""


class ChecksumMismatchError(DownloadError):
    """A downloaded file does not have the expected sha256."""


def _target(name_or_url: str, url: str | None, sha256: str | None) -> tuple[str, str, str | None, str]:
    """(url, filename, expected sha256, label) for a registry name or a URL."""
    info = OFFICIAL_CHECKPOINTS.get(name_or_url)
    if info is not None:
        return url or info.url, info.filename, sha256 or info.sha256, info.name
    parsed = urlparse(name_or_url)
    if parsed.scheme in ("http", "https") and parsed.path and not parsed.path.endswith("/"):
        return url or name_or_url, Path(parsed.path).name, sha256, Path(parsed.path).name
    raise KeyError(
        f"Unknown checkpoint '{name_or_url}'. Known names: {', '.join(OFFICIAL_CHECKPOINTS)} "
        "(or pass an http(s) URL)."
    )


def download(
    name_or_url: str,
    dest_dir: str | os.PathLike[str] | None = None,
    *,
    sha256: str | None = None,
    url: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 60.0,
    retry_wait: float = 2.0,
    verify: bool = True,
) -> Path:
    """Download a checkpoint with resume and sha256 verification; return the final path.

    The transfer goes to ``<file>.part``; an existing part file is resumed with an HTTP ``Range`` request
    (a server that answers 200 instead of 206 restarts it from zero). On success the part file is
    verified and renamed atomically to ``<file>``. A final file that already exists and verifies is kept
    (no request is made).

    Args:
        name_or_url: a registry name (``sam2_hiera_l``) or an http(s) URL.
        dest_dir: target directory (default: :func:`default_checkpoint_dir`).
        sha256: expected hex sha256 (default: the registry's; None = unknown).
        url: override the registry URL (mirrors, tests).
        chunk_size: bytes per read.
        progress: show a tqdm progress bar.
        retries: how many times a dropped connection is resumed within this call.
        timeout: socket timeout in seconds (connect and read).
        retry_wait: seconds to wait before the first resume (doubled on each further one).
        verify: check the sha256 when one is known (False: only record the computed hash).

    Raises:
        KeyError: unknown name.
        ChecksumMismatchError: the file does not have the expected sha256 (the part file is deleted).
        DownloadError: HTTP error, or the connection dropped more than ``retries`` times (the part file
            is kept, so the next call resumes).
    """
    import time

    import requests
    from tqdm import tqdm

    src, filename, expected, label = _target(name_or_url, url, sha256)
    expected = expected.lower() if (expected and verify) else None
    dest_dir = Path(dest_dir) if dest_dir is not None else default_checkpoint_dir()
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / filename
    part = dest_dir / (filename + ".part")

    if dest.is_file():
        if expected is None:
            log.info("%s: %s already exists (no known sha256: not verified); skipping", label, dest)
            return dest
        got = sha256_file(dest, chunk_size)
        if got == expected:
            log.info("%s: %s already exists and verifies; skipping", label, dest)
            return dest
        log.warning(
            "%s: existing %s has sha256 %s, expected %s: downloading it again", label, dest, got, expected
        )

    attempts_left = retries
    while True:
        offset = part.stat().st_size if part.is_file() else 0
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            with requests.get(src, stream=True, headers=headers, timeout=timeout, allow_redirects=True) as r:
                if offset and r.status_code == 416:
                    # Range not satisfiable: the part file is probably already complete.
                    log.info("%s: server reports the part file is complete (416); verifying", label)
                    break
                if r.status_code == 206 and offset:
                    content_range = r.headers.get("Content-Range", "")
                    if not content_range.startswith(f"bytes {offset}-"):
                        log.warning(
                            "%s: unexpected Content-Range %r; restarting from zero", label, content_range
                        )
                        part.unlink(missing_ok=True)
                        continue
                    mode = "ab"
                    log.info("%s: resuming %s at byte %d", label, part.name, offset)
                elif r.status_code == 200:
                    if offset:
                        log.warning("%s: server ignored the Range request (200); restarting from zero", label)
                    offset, mode = 0, "wb"
                else:
                    raise DownloadError(f"{label}: GET {src} answered HTTP {r.status_code} {r.reason}")
                length = r.headers.get("Content-Length")
                total = offset + int(length) if length is not None else None
                log.info("%s: downloading %s -> %s", label, src, dest)
                with (
                    open(part, mode) as f,
                    tqdm(
                        total=total,
                        initial=offset,
                        unit="B",
                        unit_scale=True,
                        unit_divisor=1024,
                        desc=filename,
                        disable=not progress,
                        leave=False,
                    ) as bar,
                ):
                    for block in r.iter_content(chunk_size=chunk_size):
                        if block:
                            f.write(block)
                            bar.update(len(block))
                size = part.stat().st_size
                if total is not None and size != total:
                    raise requests.exceptions.ChunkedEncodingError(f"got {size} of {total} bytes")
            break
        except (
            requests.exceptions.ConnectionError,
            requests.exceptions.ChunkedEncodingError,
            requests.exceptions.Timeout,
        ) as exc:
            have = part.stat().st_size if part.is_file() else 0
            # An unresolvable host is a definite "offline", not a dropped transfer: retrying only waits.
            offline = have == 0 and "NameResolutionError" in repr(exc)
            if attempts_left <= 0 or offline:
                kept = (
                    f"{have} bytes kept in {part}; run the same command again to resume"
                    if have
                    else "nothing kept"
                )
                raise DownloadError(
                    f"{label}: download of {src} failed ({type(exc).__name__}: {exc}); {kept}"
                ) from exc
            wait = retry_wait * 2 ** (retries - attempts_left)
            attempts_left -= 1
            log.warning(
                "%s: connection failed after %d bytes (%s); retrying in %.0f s", label, have, exc, wait
            )
            time.sleep(wait)

    got = sha256_file(part, chunk_size)
    if expected is not None and got != expected:
        part.unlink(missing_ok=True)
        raise ChecksumMismatchError(
            f"{label}: sha256 mismatch for {filename} from {src}: expected {expected}, got {got}. The partial file "
            "was deleted; run the command again to download it anew (or pass --no-verify if the registry hash "
            "is wrong)."
        )
    os.replace(part, dest)
    if expected is None:
        write_text_atomic(dest_dir / (filename + ".sha256"), f"{got}  {filename}\n")
        log.warning(
            "%s: no known sha256 for %s: could NOT verify the download; recorded the computed sha256 %s in %s",
            label,
            filename,
            got,
            filename + ".sha256",
        )
    else:
        log.info("%s: sha256 verified (%s)", label, got)
    log.info("%s: saved %s", label, dest)
    return dest


def _list(directory: Path) -> None:
    rows = [("name", "family", "file", "present", "sha256", "description", "url")]
    for info in OFFICIAL_CHECKPOINTS.values():
        present = "yes" if (directory / info.filename).is_file() else "no"
        sha = "known" if info.sha256 else "unknown"
        rows.append((info.name, info.family, info.filename, present, sha, info.description, info.url))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    print(f"checkpoint directory: {directory.resolve()}")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1])


def download_main(argv: list[str] | None = None) -> int:
    """Entry point of ``ntt download``: fetch official checkpoints by registry name.

    Args:
        argv: command-line arguments after ``download`` (default: ``sys.argv[1:]``).

    Returns:
        The process exit code (0 ok, 1 a download failed, 2 usage error).
    """
    parser = argparse.ArgumentParser(
        prog="ntt download",
        description="Download official SAM2 / DINOv2 checkpoints (resumable, sha256-verified).",
    )
    parser.add_argument(
        "names", nargs="*", help="registry names, e.g. sam2_hiera_l dinov2_vitl14 (see --list)"
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help=f"target directory (default: ${ENV_CHECKPOINT_DIR} or ./checkpoints)",
    )
    parser.add_argument("--all", action="store_true", help="download every registered checkpoint")
    parser.add_argument("--list", action="store_true", help="list the registry and what is present")
    parser.add_argument(
        "--no-verify", action="store_true", help="do not check sha256 (record the computed one)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    directory = args.dir if args.dir is not None else default_checkpoint_dir()

    if args.list:
        _list(directory)
        return 0
    names = list(OFFICIAL_CHECKPOINTS) if args.all else args.names
    if not names:
        parser.print_usage(sys.stderr)
        raise UserError("nothing to download: give names, --all or --list")
    unknown = [n for n in names if n not in OFFICIAL_CHECKPOINTS]
    if unknown:
        raise UserError(
            f"unknown checkpoint name(s): {', '.join(unknown)}. Known: {', '.join(OFFICIAL_CHECKPOINTS)}"
        )
    failed = []
    for name in names:
        try:
            download(name, directory, progress=not args.quiet, verify=not args.no_verify)
        except (DownloadError, OSError) as exc:
            log.error("%s", exc)
            failed.append(name)
    if failed:
        log.error("failed: %s", ", ".join(failed))
        return 1
    return 0


__all__ = ["ChecksumMismatchError", "DownloadError", "download", "download_main"]
