"""COCO-format datasets: json reading, class selection, image paths, annotations and masks.

One :class:`CocoDataset` wraps one annotation json (loaded once) plus an image folder, and a set of
*selected* categories (by names or by a class-split key, see :mod:`ntt.data.splits`). Class index =
position of a category id in the ascending-sorted list of selected ids.

Conventions (method.md §2, §12b item 5): image height/width always come from the json, never from the
decoded file. Annotations are normalised on load (copies; ``raw`` stays the json as read):
``iscrowd`` absent -> 0; ``area`` absent -> pixel count of the segmentation (or box area when the
annotation has no segmentation).

Boxes-only datasets (no ``segmentation`` key, e.g. NEU-DET) load fine; :attr:`CocoDataset.boxes_only`
tells callers, and asking for a reference mask raises with :data:`BOXES_ONLY_MESSAGE`.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ntt.data.splits import resolve_class_names

logger = logging.getLogger(__name__)

BOXES_ONLY_MESSAGE = (
    "this dataset has boxes only (its annotations have no 'segmentation'); reference masks are needed. "
    "Make them from the boxes with `ntt prepare masks <box json> <image folder>` (SAM masks, as the authors "
    "made them, method.md §1.5) and point the config at the *_with_segm.json it writes, or segment your own "
    "images from box references with `ntt segment` (it turns boxes into masks itself)"
)


# --------------------------------------------------------------------------------------------------
# json / annotation helpers


def load_coco_json(json_file: str | Path) -> dict:
    """Read a COCO-format annotation json.

    Args:
        json_file: Path to the json (config key ``dataset.json_file``).

    Returns:
        The parsed dict.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not valid json or lacks the ``images`` / ``categories`` lists.
    """
    path = Path(json_file)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path} (check dataset.json_file)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"COCO annotation file {path} is not valid json: {e}") from e
    _check_structure(data, str(path))
    return data


def _check_structure(data: Any, source: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(
            f"COCO annotation file {source}: top level must be an object, got {type(data).__name__}"
        )
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"COCO annotation file {source}: missing or invalid '{key}' list")
    if not isinstance(data.get("annotations", []), list):
        raise ValueError(f"COCO annotation file {source}: 'annotations' must be a list")


def has_segmentation(ann: dict) -> bool:
    """Whether an annotation carries a usable (non-empty) ``segmentation``.

    Args:
        ann: A COCO annotation dict.
    """
    seg = ann.get("segmentation")
    if seg is None:
        return False
    if isinstance(seg, dict):
        return "counts" in seg and "size" in seg
    if isinstance(seg, list):
        return any(isinstance(p, list) and len(p) >= 6 for p in seg)
    return False


def ann_to_rle(ann: dict, height: int, width: int) -> dict:
    """Convert an annotation's segmentation (polygons, uncompressed or compressed RLE) to compressed RLE.

    Args:
        ann: A COCO annotation with a ``segmentation``.
        height: Image height (from the json).
        width: Image width (from the json).

    Returns:
        A compressed RLE dict ``{"size": [h, w], "counts": bytes}``.

    Raises:
        ValueError: the annotation has no usable segmentation (message names the annotation id).
    """
    from pycocotools import mask as mask_utils

    if not has_segmentation(ann):
        raise ValueError(f"annotation id {ann.get('id')} has no usable 'segmentation'")
    seg = ann["segmentation"]
    h, w = int(height), int(width)
    if isinstance(seg, list):
        polys = [p for p in seg if isinstance(p, list) and len(p) >= 6]
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = dict(seg)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    return rle


def ann_to_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """Decode an annotation's segmentation to a boolean mask ``[height, width]``.

    Args:
        ann: A COCO annotation with a ``segmentation``.
        height: Image height (from the json).
        width: Image width (from the json).
    """
    from pycocotools import mask as mask_utils

    rle = ann_to_rle(ann, height, width)
    with warnings.catch_warnings():
        # pycocotools' Cython decode trips a numpy-2 copy-keyword DeprecationWarning; harmless
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def annotation_area(ann: dict, height: int, width: int) -> float:
    """Area of an annotation: its ``area`` key, else the segmentation pixel count, else the box area.

    Args:
        ann: A COCO annotation.
        height: Image height (from the json).
        width: Image width (from the json).
    """
    if "area" in ann and ann["area"] is not None:
        return float(ann["area"])
    if has_segmentation(ann):
        from pycocotools import mask as mask_utils

        return float(mask_utils.area(ann_to_rle(ann, height, width)))
    bbox = ann.get("bbox")
    if bbox is not None and len(bbox) == 4:
        return float(bbox[2]) * float(bbox[3])
    return 0.0


def image_record_problem(image: dict) -> str | None:
    """What makes an ``images`` record unusable (sizes come from the json, never from the file), or None.

    Args:
        image: a record of the json's ``images``.
    """
    missing = [k for k in ("file_name", "height", "width") if image.get(k) is None]
    if missing:
        return f"({image.get('file_name', 'no file name')}) has no {', '.join(missing)}"
    bad = [
        f"{k}={image[k]!r}"
        for k in ("height", "width")
        if isinstance(image[k], bool)
        or not isinstance(image[k], (int, float))
        or not float(image[k]).is_integer()
        or image[k] <= 0
    ]
    return f"({image['file_name']}) has {', '.join(bad)}" if bad else None


IMAGE_RECORD_ADVICE = (
    "give each image record its file_name, and its width and height in pixels of the stored file"
)


def normalize_annotation(ann: dict, height: int, width: int) -> dict:
    """Shallow copy of ``ann`` with ``iscrowd`` (default 0) and ``area`` (computed if absent) filled in.

    Args:
        ann: A COCO annotation.
        height: Image height (from the json).
        width: Image width (from the json).
    """
    out = dict(ann)
    out["iscrowd"] = int(out.get("iscrowd", 0) or 0)
    if out.get("area") is None:
        out["area"] = annotation_area(out, height, width)
    return out


def filter_coco_gt(
    data: dict, category_ids: Iterable[int], image_ids: Iterable[int] | None = None, *, source: str = "<dict>"
) -> dict:
    """Ground truth for evaluation restricted to some categories (method.md §6).

    All images are kept (or exactly ``image_ids``, in json order), annotations of other categories are
    removed, and the ``categories`` list still lists every category (so COCOeval averages over the
    categories that have ground truth, i.e. the selected ones). Annotations are normalised copies
    (``iscrowd``/``area`` filled in); the input is not modified.

    Args:
        data: A COCO-format dict (``images``, ``annotations``, ``categories``).
        category_ids: The selected category ids.
        image_ids: Optional subset of image ids to keep (all must exist in ``data``).
        source: Name of the data's origin, used in error messages.

    Returns:
        A new COCO-format dict.
    """
    _check_structure(data, source)
    cats = set(int(c) for c in category_ids)
    known_cats = {int(c["id"]) for c in data["categories"]}
    missing = sorted(cats - known_cats)
    if missing:
        raise ValueError(f"{source}: category ids {missing} are not in its categories list")
    images = data["images"]
    if image_ids is not None:
        wanted = set(int(i) for i in image_ids)
        known = {int(im["id"]) for im in images}
        unknown = sorted(wanted - known)
        if unknown:
            raise ValueError(
                f"{source}: image ids not in the json: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}"
            )
        images = [im for im in images if int(im["id"]) in wanted]
    sizes = {int(im["id"]): (im.get("height"), im.get("width")) for im in images}
    anns = []
    for ann in data.get("annotations", []):
        img_id = int(ann["image_id"])
        if int(ann["category_id"]) in cats and img_id in sizes:
            h, w = sizes[img_id]
            anns.append(normalize_annotation(ann, h, w))
    out = {k: v for k, v in data.items() if k not in ("images", "annotations", "categories")}
    out["images"] = [dict(im) for im in images]
    out["annotations"] = anns
    out["categories"] = [dict(c) for c in data["categories"]]
    return out


# --------------------------------------------------------------------------------------------------
# dataset


class CocoDataset:
    """A COCO-format annotation json plus its image folder, with a selection of categories.

    Args:
        json_file: Path to the annotation json (config key ``dataset.json_file``), or an already
            loaded COCO dict.
        image_root: Folder the json's ``file_name`` entries are relative to (``dataset.image_root``).
        class_names: Category names to select (list or comma-separated string), exact json names.
        class_split: A :data:`ntt.data.splits.CLASS_SPLITS` key; wins over ``class_names``.
            With neither, every category of the json is selected.

    Raises:
        FileNotFoundError: missing json file.
        ValueError: invalid json, duplicate ids, annotations pointing at unknown images, or a requested
            class name that is not in the json (the message lists the available names).
    """

    def __init__(
        self,
        json_file: str | Path | dict,
        image_root: str | Path | None = None,
        *,
        class_names: Sequence[str] | str | None = None,
        class_split: str | None = None,
    ) -> None:
        if isinstance(json_file, dict):
            self._source = "<in-memory COCO dict>"
            _check_structure(json_file, self._source)
            self.raw: dict = json_file
        else:
            self._source = str(json_file)
            self.raw = load_coco_json(json_file)
        self.image_root = Path(image_root) if image_root is not None else None

        self._cats: dict[int, dict] = {}
        for c in self.raw["categories"]:
            cid = int(c["id"])
            if cid in self._cats:
                raise ValueError(f"{self._source}: duplicate category id {cid}")
            self._cats[cid] = c

        self._images: dict[int, dict] = {}
        for im in self.raw["images"]:
            iid = int(im["id"])
            if iid in self._images:
                raise ValueError(f"{self._source}: duplicate image id {iid}")
            self._images[iid] = im

        self.category_ids: list[int] = self._select_categories(class_names, class_split)
        self.category_names: list[str] = [str(self._cats[c]["name"]) for c in self.category_ids]
        self._selected = set(self.category_ids)

        self._anns: dict[int, dict] = {}
        self._img_anns: dict[int, list[int]] = {iid: [] for iid in self._images}
        orphans = []
        for ann in self.raw.get("annotations", []):
            aid = int(ann["id"])
            if aid in self._anns:
                raise ValueError(f"{self._source}: duplicate annotation id {aid}")
            iid = int(ann["image_id"])
            if iid not in self._images:
                orphans.append(aid)
                continue
            im = self._images[iid]
            self._anns[aid] = normalize_annotation(ann, im.get("height"), im.get("width"))
            self._img_anns[iid].append(aid)
        if orphans:
            raise ValueError(
                f"{self._source}: annotations point at image ids not in 'images': annotation ids "
                f"{orphans[:10]}{' ...' if len(orphans) > 10 else ''}"
            )

        selected = [a for a in self._anns.values() if int(a["category_id"]) in self._selected]
        with_seg = sum(has_segmentation(a) for a in self._anns.values())
        #: the images holding an annotation of a selected class (the reference candidates)
        self.annotated_image_ids: list[int] = list(dict.fromkeys(int(a["image_id"]) for a in selected))
        #: True when every selected annotation has a segmentation (instance mask).
        self.has_masks: bool = all(has_segmentation(a) for a in selected)
        #: True when no annotation of the json has a segmentation (box-only dataset).
        self.boxes_only: bool = len(self._anns) > 0 and with_seg == 0
        logger.debug(
            "loaded %s: %d images, %d annotations, %d/%d categories selected%s",
            self._source,
            len(self._images),
            len(self._anns),
            len(self.category_ids),
            len(self._cats),
            " (boxes only)" if self.boxes_only else "",
        )

    # ---- categories -----------------------------------------------------------------------------

    def _select_categories(self, class_names, class_split) -> list[int]:
        if class_split is None and class_names is None:
            return sorted(self._cats)
        names = resolve_class_names(class_split, class_names)
        by_name: dict[str, list[int]] = {}
        for cid, c in self._cats.items():
            by_name.setdefault(str(c["name"]), []).append(cid)
        missing = [n for n in names if n not in by_name]
        if missing:
            available = ", ".join(repr(str(c["name"])) for c in self.raw["categories"])
            what = (
                f"dataset.class_split {class_split!r}" if class_split is not None else "dataset.class_names"
            )
            raise ValueError(
                f"{self._source}: class names {missing} (from {what}) are not categories of this json; "
                f"available names: {available}"
            )
        dup = [n for n in names if len(by_name[n]) > 1]
        if dup:
            raise ValueError(f"{self._source}: class names {dup} match several categories (ambiguous)")
        return sorted(by_name[n][0] for n in names)

    @property
    def categories(self) -> list[dict]:
        """All categories of the json (selected or not), in json order."""
        return list(self.raw["categories"])

    def name_of(self, cat_id: int) -> str:
        """Name of any category id of the json.

        Args:
            cat_id: A category id.
        """
        try:
            return str(self._cats[int(cat_id)]["name"])
        except KeyError:
            raise KeyError(f"category id {cat_id} is not in {self._source}") from None

    # ---- images ---------------------------------------------------------------------------------

    @property
    def image_ids(self) -> list[int]:
        """Image ids in json order."""
        return list(self._images)

    def __len__(self) -> int:
        return len(self._images)

    def _image(self, img_id: int) -> dict:
        try:
            return self._images[int(img_id)]
        except KeyError:
            raise KeyError(f"image id {img_id} is not in {self._source}") from None

    def image_info(self, img_id: int) -> dict:
        """``{"id", "file_name", "height", "width"}`` of an image; height/width come from the json.

        Args:
            img_id: An image id.

        Raises:
            KeyError: unknown image id.
            ValueError: the json record lacks ``height``/``width``/``file_name`` (or they are not usable).
        """
        im = self._image(img_id)
        problem = image_record_problem(im)
        if problem:
            raise ValueError(f"{self._source}: image {img_id} {problem}: {IMAGE_RECORD_ADVICE}")
        return {
            "id": int(im["id"]),
            "file_name": str(im["file_name"]),
            "height": int(im["height"]),
            "width": int(im["width"]),
        }

    def image_problems(self, img_ids: Iterable[int]) -> list[str]:
        """``image <id> (<file>) has <what>`` for every record of ``img_ids`` that `image_info` refuses."""
        problems = ((i, image_record_problem(self._image(i))) for i in img_ids)
        return [f"image {i} {p}" for i, p in problems if p]

    def image_path(self, img_id: int, *, check: bool = True) -> Path:
        """Path of an image file: ``image_root / file_name``.

        Args:
            img_id: An image id.
            check: Raise if the file does not exist.

        Raises:
            ValueError: no image root was given.
            FileNotFoundError: the file is missing (message names the path and ``dataset.image_root``).
        """
        info = self.image_info(img_id)
        if self.image_root is None:
            raise ValueError(f"no image root set for {self._source}; set dataset.image_root")
        path = self.image_root / info["file_name"]
        if check and not path.is_file():
            raise FileNotFoundError(
                f"image file not found: {path} (image id {img_id} of {self._source}); "
                f"check dataset.image_root (currently {self.image_root})"
            )
        return path

    # ---- annotations ----------------------------------------------------------------------------

    def annotations(self, img_id: int) -> list[dict]:
        """Annotations of the selected categories on one image, in json order (normalised copies).

        Args:
            img_id: An image id.
        """
        self._image(img_id)
        anns = (self._anns[aid] for aid in self._img_anns[int(img_id)])
        return [dict(a) for a in anns if int(a["category_id"]) in self._selected]

    def all_annotations(self) -> list[dict]:
        """All annotations of the selected categories, in json order (normalised copies)."""
        return [dict(a) for a in self._anns.values() if int(a["category_id"]) in self._selected]

    def mask(self, ann_id: int) -> np.ndarray:
        """Boolean instance mask ``[H, W]`` of an annotation (H, W from the json image record).

        Args:
            ann_id: An annotation id.

        Raises:
            ValueError: the annotation has no segmentation (boxes-only datasets say so explicitly).
        """
        ann = self._anns.get(int(ann_id))
        if ann is None:
            raise KeyError(f"annotation id {ann_id} is not in {self._source}")
        if not has_segmentation(ann):
            if self.boxes_only:
                raise ValueError(f"{self._source}: {BOXES_ONLY_MESSAGE} (annotation id {ann_id})")
            raise ValueError(f"{self._source}: annotation id {ann_id} has no usable 'segmentation'")
        info = self.image_info(ann["image_id"])
        return ann_to_mask(ann, info["height"], info["width"])

    def __repr__(self) -> str:
        return (
            f"CocoDataset({self._source!r}, images={len(self._images)}, annotations={len(self._anns)}, "
            f"classes={len(self.category_ids)}/{len(self._cats)}{', boxes_only' if self.boxes_only else ''})"
        )
