"""Class-split tables (method.md §1.4) and class-name resolution.

A *class split* is a named list of category names; the dataset selects the json categories whose
``name`` matches exactly. Class indices downstream come from the ascending-sorted category ids, so
the order of the names in a split is irrelevant.

Tables:

- ``default_classes``: the 80 COCO names (COCO id order).
- ``few_shot_classes``: the 20 COCO novel classes (the VOC classes in COCO naming).
- ``voc_all`` and ``voc_split{1,2,3}``: the 20 VOC names (alphabetical) and the 5 novel classes of
  the standard TFA splits.
- ``coco_semantic_split_{1..4}``: COCO-20i folds (every 4th class of the 80, starting at offset f-1).
- ``cdfsod_{artaxor,clipart1k,dior,fish,neu_det,uodd}``: CD-FSOD class names per dataset.

The LVIS name lists (``lvis*``) are not shipped here (1203 names; read them from the LVIS json).
"""

from __future__ import annotations

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# COCO novel classes = the 20 VOC classes in COCO naming (ascending COCO ids 1..72).
COCO_NOVEL_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "boat", "bird", "cat",
    "dog", "horse", "sheep", "cow", "bottle", "chair", "couch", "potted plant", "dining table", "tv",
)  # fmt: skip

# VOC names, alphabetical (VOC category ids 0..19 in the mmdet-style conversion).
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

_VOC_NOVEL = {
    1: ("bird", "bus", "cow", "motorbike", "sofa"),
    2: ("aeroplane", "bottle", "cow", "horse", "sofa"),
    3: ("boat", "cat", "motorbike", "sheep", "sofa"),
}

CDFSOD_CLASSES: dict[str, tuple[str, ...]] = {
    "artaxor": ("Araneae", "Coleoptera", "Diptera", "Hemiptera", "Hymenoptera", "Lepidoptera", "Odonata"),
    "clipart1k": VOC_CLASSES,
    "dior": (
        "Expressway-Service-area", "Expressway-toll-station", "airplane", "airport", "baseballfield",
        "basketballcourt", "bridge", "chimney", "dam", "golffield", "groundtrackfield", "harbor",
        "overpass", "ship", "stadium", "storagetank", "tenniscourt", "trainstation", "vehicle", "windmill",
    ),
    "fish": ("fish",),
    "neu_det": ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"),
    "uodd": ("seacucumber", "seaurchin", "scallop"),
}  # fmt: skip


def _build_splits() -> dict[str, list[str]]:
    splits: dict[str, list[str]] = {
        "default_classes": list(COCO_CLASSES),
        "few_shot_classes": list(COCO_NOVEL_CLASSES),
        "voc_all": list(VOC_CLASSES),
    }
    for s, names in _VOC_NOVEL.items():
        splits[f"voc_split{s}"] = sorted(names)
    for fold in range(1, 5):
        splits[f"coco_semantic_split_{fold}"] = list(COCO_CLASSES[fold - 1 :: 4])
    for dataset, names in CDFSOD_CLASSES.items():
        splits[f"cdfsod_{dataset}"] = list(names)
    return splits


CLASS_SPLITS: dict[str, list[str]] = _build_splits()


def resolve_class_names(class_split: str | None, class_names: list[str] | str | None) -> list[str]:
    """Return the list of category names to select.

    ``class_split`` wins over ``class_names`` when both are given (as in the reference, where the
    split table overrides ``cat_names``).

    Args:
        class_split: A key of :data:`CLASS_SPLITS` (config key ``dataset.class_split``), or None.
        class_names: Explicit category names (config key ``dataset.class_names``): a list, or a
            comma-separated string as on the reference CLI (``"bird,boat"``). Names must match the
            json ``categories[].name`` exactly.

    Returns:
        A new list of unique names (order kept, duplicates dropped).

    Raises:
        KeyError: ``class_split`` is not a known split (the message lists the known keys).
        ValueError: neither argument is given, or ``class_names`` is empty.
    """
    if class_split is not None:
        if class_split not in CLASS_SPLITS:
            known = ", ".join(sorted(CLASS_SPLITS))
            raise KeyError(f"unknown dataset.class_split {class_split!r}; known splits: {known}")
        names: list[str] = list(CLASS_SPLITS[class_split])
    elif class_names is not None:
        if isinstance(class_names, str):
            names = [n.strip() for n in class_names.split(",") if n.strip()]
        else:
            names = [str(n) for n in class_names]
        if not names:
            raise ValueError("dataset.class_names is empty; give at least one category name")
    else:
        raise ValueError("no classes selected: set dataset.class_split or dataset.class_names")
    return list(dict.fromkeys(names))
