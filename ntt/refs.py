"""Reference sets: sampling (method.md §1.2), fixed shot files (§1.6), refs file I/O and validation.

A reference set maps a COCO category id to exactly K entries (memory slot k = position in the list). Each
entry names one image and the annotation id(s) of the instance; only ``ann_ids[0]`` is used to fill memory.

Parity notes:

* ``sample_references`` reproduces ``few_shot_sampling.py``: one ``random.Random(seed)`` stream (same
  Mersenne Twister stream as ``random.seed(seed)``), annotations scanned in JSON order, per-category lists
  in first-seen order, one ``shuffle`` per category in that order, invalid annotations skipped, at most one
  instance per image per class. LVIS-style padding appends ``list[i % count]``: the same entries as the
  reference's ``list[i]`` on the growing list (tests/test_refs_lvis.py runs both on the same jsons).
* ``refs_from_coco(mode="reference_pkl")`` reproduces ``coco_to_pkl.py`` including its duplication of the
  first instance of an image holding several instances of a class (method.md §9.1 item 9) and its
  padding with ``random.choices`` after ``random.seed(42)``; ``mode="per_annotation"`` is the fix (one
  entry per annotation), padded the same way.

Both are ports of the reference's scripts kept comparable with them line by line, which is why this module
is longer than most; the file formats (our json, the reference's pkl) and the validation complete it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import random
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ntt.utils.files import write_text_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "RefEntry",
    "REFS_FORMAT",
    "is_valid_annotation",
    "sample_references",
    "refs_from_coco",
    "save_refs",
    "load_refs",
    "load_refs_with_meta",
    "validate_refs",
]

REFS_FORMAT = "ntt-refs"
REFS_FORMAT_VERSION = 1
COCO_TO_PKL_SEED = 42  # module-level random.seed(42) in the reference's coco_to_pkl.py


@dataclass
class RefEntry:
    """One reference instance (one memory slot).

    Args:
        category_id: COCO category id of the class.
        image_id: COCO image id.
        ann_ids: annotation ids; the first one is the instance used to fill the memory.
    """

    category_id: int
    image_id: int
    ann_ids: list[int] = field(default_factory=list)

    @property
    def ann_id(self) -> int:
        """The annotation used to fill memory (``ann_ids[0]``)."""
        return self.ann_ids[0]

    def to_dict(self) -> dict:
        """JSON-able form ``{"image_id", "ann_ids"}`` (the class is the key it is stored under)."""
        return {"image_id": int(self.image_id), "ann_ids": [int(a) for a in self.ann_ids]}


RefSet = dict[int, list[RefEntry]]


# ----------------------------------------------------------------------------------------------------------
# Sampling (method.md §1.2)


def is_valid_annotation(ann: Mapping, img_w: float, img_h: float) -> bool:
    """The reference's validity filter for sampled references (method.md §1.2).

    Valid iff not crowd, bbox at least 32x32 and the box at least 10 px away from every image border.

    Args:
        ann: COCO annotation (``bbox`` xywh, optional ``iscrowd``).
        img_w: image width from the json.
        img_h: image height from the json.
    """
    if ann.get("iscrowd", 0) == 1:
        return False
    x, y, w, h = ann["bbox"][:4]
    if w < 32 or h < 32:
        return False
    if x < 10 or y < 10 or img_w - (x + w) < 10 or img_h - (y + h) < 10:
        return False
    return True


def _index_by_id(items: Iterable[Mapping], what: str) -> dict[Any, Mapping]:
    """Dict id -> item in list order, with pycocotools' semantics for repeated ids (last value wins)."""
    out: dict[Any, Mapping] = {}
    for item in items:
        if "id" not in item:
            raise ValueError(f"a COCO {what} entry has no 'id': {dict(item)!r:.200}")
        out[item["id"]] = item
    return out


def _category_names(coco: Mapping) -> dict[int, str]:
    return {int(c["id"]): str(c.get("name", c["id"])) for c in coco.get("categories", [])}


def sample_references(
    coco: Mapping,
    category_ids: Iterable[int],
    n_shot: int,
    seed: int,
    *,
    allow_invalid: bool = False,
    allow_duplicates: bool = False,
    remove_impossible: bool = True,
) -> RefSet:
    """Sample K reference instances per class exactly as the reference's ``few_shot_sampling.py``.

    Args:
        coco: the reference-pool COCO json (``json.load`` dict with images, annotations, categories).
        category_ids: selected category ids (as ``coco.getCatIds(catNms=...)``; order does not matter).
        n_shot: K, references per class.
        seed: the sampling seed (``random.seed(seed)`` in the reference).
        allow_invalid: LVIS mode: if a class has no valid instance, fall back to its first ``n_shot``
            invalid ones (in shuffled order).
        allow_duplicates: LVIS mode: pad a class with fewer than K entries by cycling through its entries
            (``list[i % count]``, the same entries as the reference's ``list[i]``); a class with no entry at
            all (the reference crashes there) is skipped with a warning.
        remove_impossible: skip annotations with ``isimpossible == 1`` when that key exists
            (``remove_bad``: True for COCO/VOC, False for LVIS in the reference).

    Returns:
        ``{category_id: [RefEntry] * K}`` in first-seen category order.

    Raises:
        ValueError: a class has fewer than K usable instances (the message names the class, how many it
            found and what to do).
    """
    if n_shot < 1:
        raise ValueError(f"sample_references: n_shot must be >= 1, got {n_shot}")
    rng = random.Random(seed)
    selected = {int(c) for c in category_ids}
    names = _category_names(coco)
    imgs = _index_by_id(coco.get("images", []), "image")
    anns = _index_by_id(coco.get("annotations", []), "annotation")

    per_cat: dict[int, list[tuple[Any, Any]]] = {}
    for ann_id, ann in anns.items():
        if ann["category_id"] not in selected:
            continue
        if "isimpossible" in ann and remove_impossible and ann["isimpossible"] == 1:
            continue
        per_cat.setdefault(ann["category_id"], []).append((ann["image_id"], ann_id))

    missing = sorted(selected - set(per_cat))
    if missing:
        desc = ", ".join(f"{c} ({names.get(c, '?')})" for c in missing)
        if allow_duplicates:
            logger.warning("sample_references: classes without any annotation are skipped: %s", desc)
        else:
            raise ValueError(
                f"sample_references: selected classes have no annotation in the reference pool: {desc}. "
                "Select other classes or use another reference json."
            )

    out: RefSet = OrderedDict()
    for cat_id, cands in per_cat.items():
        rng.shuffle(cands)
        entries: list[RefEntry] = []
        taken_imgs: list[Any] = []
        invalid: list[RefEntry] = []
        for img_id, ann_id in cands:
            if img_id not in imgs:
                raise ValueError(
                    f"sample_references: annotation {ann_id} refers to image {img_id}, "
                    "which is not in the json's images"
                )
            info = imgs[img_id]
            if not is_valid_annotation(anns[ann_id], info["width"], info["height"]):
                if allow_invalid:
                    invalid.append(RefEntry(int(cat_id), int(img_id), [int(ann_id)]))
                continue
            if img_id in taken_imgs:
                continue
            taken_imgs.append(img_id)
            entries.append(RefEntry(int(cat_id), int(img_id), [int(ann_id)]))
            if len(taken_imgs) >= n_shot:
                break
        if len(taken_imgs) < n_shot:
            if len(entries) == 0 and allow_invalid:
                logger.warning(
                    "sample_references: class %d (%s) has no valid instance; using %d of its %d invalid ones",
                    cat_id,
                    names.get(cat_id, "?"),
                    min(n_shot, len(invalid)),
                    len(invalid),
                )
                entries = invalid[:n_shot]
            if not allow_duplicates:
                raise ValueError(
                    f"sample_references: class {cat_id} ({names.get(cat_id, '?')}) has only {len(taken_imgs)} "
                    f"valid reference instances on distinct images (of {len(cands)} annotations), but "
                    f"n_shot={n_shot} are needed. Lower the number of shots, drop this class, or allow "
                    "LVIS-style padding (allow_invalid / allow_duplicates)."
                )
            count = len(entries)
            if count == 0:
                logger.warning("sample_references: class %d has 0 samples, skipping it", cat_id)
                continue
            logger.warning(
                "sample_references: class %d (%s) has %d < %d references: padding by repetition",
                cat_id,
                names.get(cat_id, "?"),
                count,
                n_shot,
            )
            for i in range(n_shot - count):
                e = entries[i % count]
                entries.append(RefEntry(e.category_id, e.image_id, list(e.ann_ids)))
        out[int(cat_id)] = entries
    return out


# ----------------------------------------------------------------------------------------------------------
# Fixed shot files (method.md §1.6)


def refs_from_coco(
    ref_json: Mapping | str | os.PathLike,
    category_ids: Iterable[int] | None,
    n_shot: int,
    *,
    mode: str = "per_annotation",
) -> RefSet:
    """Build a reference set from a COCO json whose annotations are the references (CD-FSOD shot files).

    Args:
        ref_json: the shot file (dict or path).
        category_ids: selected category ids (``None``: every category with an annotation).
        n_shot: K.
        mode: ``"reference_pkl"`` reproduces ``coco_to_pkl.py`` exactly (parity): one entry per
            (class, image), an image with m instances of the class becoming m copies of an entry listing all
            m ids (so only its first instance is used, m times). ``"per_annotation"`` (fix of method.md
            §9.1 item 9): one entry per annotation. In both modes a class with fewer than K entries is
            padded with ``random.Random(42).choices`` (the reference's module-level ``random.seed(42)``),
            classes processed in first-seen order over the whole file.

    Returns:
        ``{category_id: [RefEntry] * K}`` for the selected classes, in first-seen order.

    Raises:
        ValueError: unknown mode, or a selected class with more than K entries (the reference never
            truncates; its fill stage rejects such a file, method.md §12b item 9).
    """
    if mode not in ("per_annotation", "reference_pkl"):
        raise ValueError(f"refs_from_coco: mode must be 'per_annotation' or 'reference_pkl', got {mode!r}")
    source = "<dict>"
    if not isinstance(ref_json, Mapping):
        source = str(ref_json)
        with open(ref_json) as f:
            ref_json = json.load(f)
    names = _category_names(ref_json)

    grouped: dict[int, list[dict]] = OrderedDict()
    for ann in ref_json.get("annotations", []):
        cat_id = ann["category_id"]
        lst = grouped.setdefault(cat_id, [])
        if mode == "reference_pkl":
            existing = next((e for e in lst if e["img_id"] == ann["image_id"]), None)
            if existing is not None:
                existing["ann_ids"].append(ann["id"])
            else:
                lst.append({"img_id": ann["image_id"], "ann_ids": [ann["id"]]})
        else:
            lst.append({"img_id": ann["image_id"], "ann_ids": [ann["id"]]})

    if mode == "reference_pkl":
        for cat_id, lst in grouped.items():
            new: list[dict] = []
            for e in lst:
                new.extend([e] * len(e["ann_ids"]) if len(e["ann_ids"]) > 1 else [e])
            grouped[cat_id] = new

    wanted = list(grouped) if category_ids is None else [int(c) for c in category_ids]
    rng = random.Random(COCO_TO_PKL_SEED)  # every class draws, selected or not (the reference's order)
    padded = []
    for cat_id, lst in grouped.items():
        if len(lst) < n_shot:
            if cat_id in wanted:
                padded.append(f"class {cat_id} ({names.get(cat_id, '?')}): {len(lst)}")
            lst.extend(rng.choices(lst, k=n_shot - len(lst)))
    if padded:
        logger.warning(
            "refs_from_coco: %s: %d class(es) have fewer than shots=%d reference entries and are padded with "
            "duplicates of their own (random.choices, seed %d, as the reference's coco_to_pkl), which add no "
            "information: %s. Give more references of these classes, or lower `shots`.",
            source,
            len(padded),
            n_shot,
            COCO_TO_PKL_SEED,
            "; ".join(padded),
        )

    out: RefSet = OrderedDict()
    for cat_id, lst in grouped.items():
        if cat_id not in wanted:
            continue
        if len(lst) > n_shot:
            raise ValueError(
                f"refs_from_coco: class {cat_id} ({names.get(cat_id, '?')}) has {len(lst)} reference entries "
                f"in {source} (mode={mode}) but shots={n_shot}. References are never truncated (the reference "
                f"fill stage rejects this file): set shots={len(lst)} or use a shot file with at most "
                f"{n_shot} instances of this class."
            )
        out[int(cat_id)] = [
            RefEntry(int(cat_id), int(e["img_id"]), [int(a) for a in e["ann_ids"]]) for e in lst
        ]
    return out


# ----------------------------------------------------------------------------------------------------------
# File I/O


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves ``collections.OrderedDict`` and plain builtin containers."""

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("builtins", "dict"),
        ("builtins", "list"),
        ("builtins", "tuple"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "int"),
        ("builtins", "str"),
    }

    def __init__(self, file, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"{self._source}: refusing to unpickle global {module}.{name}; a reference pkl may only hold "
            "an OrderedDict of lists of {'img_id', 'ann_ids'} dicts"
        )


def _refs_from_mapping(data: Mapping, source: str) -> RefSet:
    """``{cat_id: [{'img_id'|'image_id', 'ann_ids'|'ann_id'}]}`` (reference pkl / plain json) -> RefSet."""
    out: RefSet = OrderedDict()
    for key, lst in data.items():
        try:
            cat_id = int(key)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: category key {key!r} is not an integer category id") from err
        if not isinstance(lst, list):
            raise ValueError(
                f"{source}: class {cat_id}: expected a list of entries, got {type(lst).__name__}"
            )
        entries = []
        for k, e in enumerate(lst):
            if not isinstance(e, Mapping):
                raise ValueError(
                    f"{source}: class {cat_id} entry {k}: expected a dict, got {type(e).__name__}"
                )
            img_id = e.get("img_id", e.get("image_id"))
            if "ann_ids" in e:
                ann_ids = list(e["ann_ids"])
            elif "ann_id" in e:
                ann_ids = [e["ann_id"]]
            else:
                ann_ids = []
            if img_id is None or not ann_ids:
                raise ValueError(
                    f"{source}: class {cat_id} entry {k} needs 'img_id' and 'ann_ids': {dict(e)!r}"
                )
            entries.append(RefEntry(cat_id, int(img_id), [int(a) for a in ann_ids]))
        out[cat_id] = entries
    return out


def load_refs_with_meta(
    path: str | os.PathLike,
    *,
    category_ids: Iterable[int] | None = None,
    n_shot: int | None = None,
    coco_mode: str = "per_annotation",
) -> tuple[RefSet, dict]:
    """Read a reference set and its metadata from any supported file.

    Supported: ntt's refs JSON (``save_refs``), the reference's pkl (``OrderedDict{cat_id: [{'img_id',
    'ann_ids'}]}``, unpickled with a restricted unpickler), a plain JSON of the same layout (string keys,
    ``ann_ids`` or ``ann_id``), and a COCO json whose annotations are the references (via
    ``refs_from_coco``; needs ``n_shot``).

    Args:
        path: the file.
        category_ids: for a COCO json: the selected classes (``None``: all).
        n_shot: for a COCO json: K (required there).
        coco_mode: for a COCO json: ``"per_annotation"`` or ``"reference_pkl"``.

    Returns:
        ``(refs, meta)``; ``meta`` is empty for formats without metadata (except ``"format"``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"refs file not found: {path}")
    raw = path.read_bytes()
    if path.suffix.lower() in (".pkl", ".pickle") or raw[:1] == b"\x80":
        try:
            data = _RestrictedUnpickler(io.BytesIO(raw), str(path)).load()
        except pickle.UnpicklingError:
            raise
        except Exception as err:
            raise ValueError(f"cannot read reference pkl {path}: {err}") from err
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: expected a dict of category id -> entries, got {type(data).__name__}")
        return _refs_from_mapping(data, str(path)), {"format": "reference_pkl"}
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: neither a pickle nor valid JSON ({err})") from err
    if not isinstance(doc, Mapping):
        raise ValueError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    if doc.get("format") == REFS_FORMAT:
        meta = {k: v for k, v in doc.items() if k != "refs"}
        return _refs_from_mapping(doc["refs"], str(path)), meta
    if "annotations" in doc:
        if n_shot is None:
            raise ValueError(f"{path} is a COCO json of reference annotations: pass n_shot (the shots K)")
        refs = refs_from_coco(doc, category_ids, n_shot, mode=coco_mode)
        return refs, {"format": "coco_json", "coco_mode": coco_mode, "source_json": str(path)}
    return _refs_from_mapping(doc, str(path)), {"format": "plain_json"}


def load_refs(
    path: str | os.PathLike,
    *,
    category_ids: Iterable[int] | None = None,
    n_shot: int | None = None,
    coco_mode: str = "per_annotation",
) -> RefSet:
    """Read a reference set (see ``load_refs_with_meta`` for the formats and arguments).

    Args:
        path: the refs file (ntt JSON, reference pkl, plain JSON, or COCO json of references).
        category_ids: for a COCO json: selected classes.
        n_shot: for a COCO json: K.
        coco_mode: for a COCO json: ``"per_annotation"`` or ``"reference_pkl"``.
    """
    return load_refs_with_meta(path, category_ids=category_ids, n_shot=n_shot, coco_mode=coco_mode)[0]


def save_refs(
    path: str | os.PathLike, refs: Mapping[int, list[RefEntry]], meta: Mapping | None = None
) -> None:
    """Write a reference set as self-describing JSON (atomic: temp file + rename).

    Classes are written in ascending id order, entries in slot order; keys are sorted.

    Args:
        path: output file.
        refs: ``{category_id: [RefEntry]}``.
        meta: extra JSON-able metadata, e.g. ``shots``, ``seed``, ``source_json``, ``category_names``
            (``{id: name}``), ``mode``. ``shots`` and ``category_ids`` default to what ``refs`` holds.
    """
    meta = dict(meta or {})
    cat_ids = sorted(int(c) for c in refs)
    shots = {len(refs[c]) for c in refs}
    doc: dict[str, Any] = {
        "format": REFS_FORMAT,
        "format_version": REFS_FORMAT_VERSION,
        "category_ids": cat_ids,
        "shots": shots.pop() if len(shots) == 1 else None,
    }
    for k, v in meta.items():
        if k == "category_names" and isinstance(v, Mapping):
            v = {str(int(c)): str(n) for c, n in v.items()}
        doc[k] = v
    doc["refs"] = {str(c): [e.to_dict() for e in refs[c]] for c in cat_ids}
    text = json.dumps(doc, indent=1, sort_keys=True)
    write_text_atomic(Path(path), text + "\n")


# ----------------------------------------------------------------------------------------------------------
# Validation


def validate_refs(
    refs: Mapping[int, list[RefEntry]],
    coco: Mapping,
    category_ids: Iterable[int],
    n_shot: int,
) -> None:
    """Check a reference set against the dataset json before filling memory.

    Every selected class must be present with exactly ``n_shot`` entries; every entry's image and
    annotation ids must exist, the annotation must belong to that class and that image. Classes in
    ``refs`` that are not selected are ignored (as the reference does).

    Args:
        refs: the reference set.
        coco: the json the references come from (``dataset_json`` of fill_memory).
        category_ids: the selected category ids.
        n_shot: K.

    Raises:
        ValueError: listing every problem found (class, slot, image and annotation ids).
    """
    names = _category_names(coco)
    imgs = _index_by_id(coco.get("images", []), "image")
    anns = _index_by_id(coco.get("annotations", []), "annotation")
    problems: list[str] = []
    for cat_id in sorted(int(c) for c in category_ids):
        cname = f"class {cat_id} ({names.get(cat_id, '?')})"
        if cat_id not in refs:
            problems.append(f"{cname} has no references (present: {sorted(int(c) for c in refs)})")
            continue
        lst = refs[cat_id]
        if len(lst) != n_shot:
            problems.append(f"{cname} has {len(lst)} references but shots={n_shot}")
        for k, e in enumerate(lst):
            where = f"{cname} slot {k}"
            if not e.ann_ids:
                problems.append(f"{where}: no annotation id")
                continue
            if e.image_id not in imgs:
                problems.append(f"{where}: image {e.image_id} is not in the dataset json")
            for a in e.ann_ids:
                ann = anns.get(a)
                if ann is None:
                    problems.append(f"{where}: annotation {a} is not in the dataset json")
                    continue
                if ann["category_id"] != cat_id:
                    problems.append(
                        f"{where}: annotation {a} has category {ann['category_id']}, not {cat_id}"
                    )
                if ann["image_id"] != e.image_id:
                    problems.append(
                        f"{where}: annotation {a} is on image {ann['image_id']}, not {e.image_id}"
                    )
    if problems:
        shown = problems[:20]
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(
            "invalid reference set:\n  " + "\n  ".join(shown) + more + "\nRe-sample the references (stage "
            "sample_refs) or fix the refs file."
        )
