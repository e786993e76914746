"""The inputs of `ntt prepare`, read and checked before any model is built or anything is written.

Every problem is a :class:`~ntt.prepare.errors.PrepareError` of one line that names the file (and the
record or image in it) and what to do; where there are several, the first few are named and the rest
counted. The checks are cheap: json structure, and image files present with the recorded size, read from
the image header in its stored frame (the size a json or a VOC xml records; EXIF orientation not applied).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from ntt.data.coco import load_coco_json
from ntt.prepare.errors import PrepareError

MAX_NAMED = 3  # problems named in one message; the others are counted
BOX_JSON_FIX = (
    "fix the json (each image needs id, file_name, width and height; each annotation id, image_id and "
    "bbox [x, y, width, height])"
)


def named(problems: list[str]) -> str:
    """The first few problems, then how many more."""
    more = len(problems) - MAX_NAMED
    return "; ".join(problems[:MAX_NAMED]) + (f" (and {more} more)" if more > 0 else "")


def read_coco_json(path: str | Path, *, fix: str) -> dict:
    """A COCO-format json (an object with ``images`` and ``categories`` lists), or a one-line error.

    Args:
        path: the json file.
        fix: what to do when it is broken (e.g. which archive to download again).
    """
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"{path} {'is not a file' if path.exists() else 'not found'}: check the path")
    try:
        return load_coco_json(path)
    except UnicodeDecodeError as exc:
        raise PrepareError(f"{path} is not valid json (not UTF-8 text at byte {exc.start}): {fix}") from exc
    except ValueError as exc:  # not json, or not a COCO object: the message names the file
        raise PrepareError(f"{exc}: {fix}") from exc
    except OSError as exc:
        raise PrepareError(f"cannot read {path}: {exc.strerror}: {fix}") from exc


def _positive_whole(value) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return False
    return value > 0 and value == int(value)


def _box(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def check_coco_records(data: dict, path: str | Path, *, fix: str = BOX_JSON_FIX) -> None:
    """Every image has a unique id, a file_name and a size; every annotation an id, image_id and bbox.

    Args:
        data: the json's content (as :func:`read_coco_json` returns it).
        path: its file (for the message).
        fix: what to do.
    """
    problems = []
    seen: set = set()
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict):
            problems.append(f"images[{i}] is not an object")
            continue
        name = im.get("id", f"images[{i}]")
        missing = [k for k in ("id", "file_name", "width", "height") if k not in im]
        if missing:
            problems.append(f"image {name} has no {', '.join(missing)}")
            continue
        if not isinstance(im["file_name"], str) or not im["file_name"]:
            problems.append(f"image {name} has file_name {im['file_name']!r}")
        if not (_positive_whole(im["width"]) and _positive_whole(im["height"])):
            problems.append(f"image {name} has width={im['width']!r} height={im['height']!r}")
        if im["id"] in seen:
            problems.append(f"image id {im['id']} is used twice")
        seen.add(im["id"])
    for i, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict):
            problems.append(f"annotations[{i}] is not an object")
            continue
        name = f"annotation {ann.get('id', f'[{i}]')} (image {ann.get('image_id')})"
        missing = [k for k in ("id", "image_id", "bbox") if k not in ann]
        if missing:
            problems.append(f"{name} has no {', '.join(missing)}")
        elif not _box(ann["bbox"]):
            problems.append(f"{name} has bbox {ann['bbox']!r}")
    if problems:
        raise PrepareError(f"{path}: {named(problems)}: {fix}")


def check_images(
    images: Iterable[tuple[Path, int, int, str]],
    *,
    fix_missing: str,
    fix_size: str,
    fix_unreadable: str | None = None,
) -> int:
    """Every image file is there, its header reads, and its size is the recorded one.

    Args:
        images: ``(file, width, height, where that size is recorded)`` per image.
        fix_missing: what to do about missing files (e.g. which archive to extract).
        fix_size: what to do about a size that disagrees.
        fix_unreadable: what to do about files that are not images (default: `fix_missing`).

    Returns:
        The number of images checked.
    """
    missing, unreadable, wrong = [], [], []
    n = 0
    for path, width, height, source in images:
        n += 1
        try:
            with Image.open(path) as im:
                w, h = im.size
        except FileNotFoundError:
            missing.append(str(path))
            continue
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            unreadable.append(f"{path} ({type(exc).__name__}: {exc})")
            continue
        if (w, h) != (int(width), int(height)):
            wrong.append(
                f"image {path} is {w}x{h} (width x height) but {source} says width={int(width)} "
                f"height={int(height)}"
            )
    parts = []
    if missing:
        parts.append(f"{len(missing)} image file(s) not found: {named(missing)}: {fix_missing}")
    if unreadable:
        parts.append(
            f"{len(unreadable)} image file(s) cannot be read: {named(unreadable)}: {fix_unreadable or fix_missing}"
        )
    if wrong:
        parts.append(f"{named(wrong)}: {fix_size}")
    if parts:
        raise PrepareError("; ".join(parts))
    return n
