"""FSOD-VFM's shot files -> ntt's refs json, so a run uses FSOD-VFM's references (`dataset.refs_file`).

FSOD-VFM (Intellindust-AI-Lab/FSOD-VFM at f5559b6) reads its references from its own files, e.g.
``data/coco/few_shot_10shot_seed33.json``, ``data/Pascal/vocsplit/split1/1shot_seed33.json``,
``data/CDFSOD/DIOR/annotations/1_shot_converted.json``: ``{class name: [{"image": <path>, "bbox": [x, y, w,
h]}, ...]}``, one box per listed image. ntt's references are annotations of the dataset's reference json
(method.md §1.2), so each entry is matched to one: the class by name, the image by file name (the path's last
part), the box by the highest IoU among that image's annotations of that class (at least ``min_iou``: FSOD-VFM's
VOC boxes are 1-based, ntt's 0-based, so they differ by a pixel). An entry without such an annotation is an
error naming it.

    ntt prepare fsod-vfm-shots SHOT_JSON --ref-json REF_JSON --out REFS_JSON
    ntt run recipe=fsod_vfm dataset=coco_fewshot shots=10 dataset.refs_file=REFS_JSON proposer.boxes_json=...
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import Any

from ntt.prepare.errors import PrepareError

log = logging.getLogger(__name__)


def _iou_xywh(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def refs_from_shots(
    shots: dict[str, Any], ref_coco: dict[str, Any], *, min_iou: float = 0.5, source: str = "shots"
):
    """FSOD-VFM's ``{class name: [{image, bbox}]}`` as ntt references of `ref_coco`.

    Args:
        shots: the shot file's content.
        ref_coco: the reference json the run reads (`dataset.ref_json`).
        min_iou: the least IoU between the listed box and the annotation it becomes.
        source: the shot file's name, for the messages.

    Returns:
        ``{category_id: [RefEntry]}`` in the file's class and entry order.

    Raises:
        PrepareError: an unknown class name, an image not in `ref_coco`, or no annotation of the class in the
            image with IoU >= `min_iou`.
    """
    from ntt.refs import RefEntry

    if not isinstance(shots, dict) or not all(isinstance(v, list) for v in shots.values()):
        raise PrepareError(f"{source}: not an FSOD-VFM shot file ({{class name: [{{image, bbox}}, ...]}})")
    cat_of = {str(c["name"]): int(c["id"]) for c in ref_coco.get("categories", [])}
    image_of: dict[str, int] = {}
    for img in ref_coco.get("images", []):
        image_of.setdefault(PurePosixPath(str(img["file_name"])).name, int(img["id"]))
    anns: dict[tuple[int, int], list[dict]] = {}
    for ann in ref_coco.get("annotations", []):
        anns.setdefault((int(ann["image_id"]), int(ann["category_id"])), []).append(ann)
    unknown = [name for name in shots if name not in cat_of]
    if unknown:
        raise PrepareError(
            f"{source}: class(es) {unknown} are not categories of the reference json (its names: "
            f"{', '.join(sorted(cat_of))})"
        )
    refs: OrderedDict[int, list] = OrderedDict()
    for name, entries in shots.items():
        cat_id = cat_of[name]
        refs[cat_id] = []
        for k, entry in enumerate(entries):
            where = f"{source}: {name!r} entry {k} ({entry.get('image')})"
            file_name = PurePosixPath(str(entry.get("image", ""))).name
            if file_name not in image_of:
                raise PrepareError(f"{where}: no image {file_name!r} in the reference json")
            image_id = image_of[file_name]
            box = [float(v) for v in entry["bbox"]]
            scored = [
                (_iou_xywh(box, [float(v) for v in a["bbox"]]), a) for a in anns.get((image_id, cat_id), [])
            ]
            best = max(scored, key=lambda pair: pair[0], default=(0.0, None))
            if best[1] is None or best[0] < min_iou:
                raise PrepareError(
                    f"{where}: no {name!r} annotation of image {image_id} overlaps its box {box} with IoU >= "
                    f"{min_iou} (best {best[0]:.2f})"
                )
            refs[cat_id].append(RefEntry(cat_id, image_id, [int(best[1]["id"])]))
    return refs


def convert_shots(shot_json: Path, ref_json: Path, out: Path, *, min_iou: float = 0.5) -> Path:
    """Read both jsons, match (`refs_from_shots`), write ntt's refs json at `out` (`ntt.refs.save_refs`)."""
    from ntt.refs import save_refs

    docs = []
    for path in (shot_json, ref_json):
        try:
            docs.append(json.loads(Path(path).read_text()))
        except FileNotFoundError as err:
            raise PrepareError(f"{path} not found: check the path") from err
        except ValueError as err:
            raise PrepareError(f"{path} is not valid json: {err}") from err
    refs = refs_from_shots(docs[0], docs[1], min_iou=min_iou, source=Path(shot_json).name)
    meta = {
        "source": f"FSOD-VFM shot file {Path(shot_json).name} matched to {Path(ref_json).name}",
        "category_names": {str(c): n for n, c in _names(docs[1]).items() if c in refs},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_refs(out, refs, meta)
    log.info("%d classes, %d references -> %s", len(refs), sum(map(len, refs.values())), out)
    return out


def _names(coco: dict[str, Any]) -> dict[str, int]:
    return {str(c["name"]): int(c["id"]) for c in coco.get("categories", [])}
