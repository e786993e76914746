# ruff: noqa
"""TEST-ONLY: the authors' reference sampler, copied verbatim, to run it on the same jsons as ntt's.

Source: github.com/miquel-espinosa/no-time-to-train at commit 214fc79d88b33153071fba1b4d4329374f65ad13
(the commit docs/method.md describes):

* ``is_valid_annotation``: no_time_to_train/dataset/data_utils.py, lines 35-55;
* ``sample_memory_dataset``: no_time_to_train/dataset/few_shot_sampling.py, lines 16-101.

Both are unchanged, byte for byte (hence ``# ruff: noqa`` and ``# fmt: off``). What the originals import
from the authors' package is given here: ``METAINFO`` (their ``no_time_to_train.dataset.metainfo``, class
names per split) is an empty dict that a test fills with the names of its crafted categories before the
call. Their command line seeds the module ``random`` (``random.seed(args.seed)``) and calls
``sample_memory_dataset(json, out, n_shot, remove_bad=False, dataset='lvis', allow_duplicates=True,
allow_invalid=True)`` for LVIS (scripts/lvis_pipeline.sh: seed 42); :func:`run_authors_lvis_sampler` does
the same. Apache-2.0 like the authors' repository.
"""

import pickle
import random
from collections import OrderedDict

from pycocotools.coco import COCO

METAINFO: dict = {}


# fmt: off
def is_valid_annotation(ann, img_info):
    img_w, img_h = img_info["width"], img_info["height"]

    # ann = coco.loadAnns([ann_id])[0]
    if ann.get("iscrowd", 0) == 1:
        return False
    # If the bbox is too small, ignore it
    if (
            ann["bbox"][2] < 32
            or ann["bbox"][3] < 32
    ):
        return False
    # Ignore objects that are too far away from the image center
    if (
            ann["bbox"][0] < 10
            or ann["bbox"][1] < 10
            or img_w - (ann["bbox"][0] + ann["bbox"][2]) < 10
            or img_h - (ann["bbox"][1] + ann["bbox"][3]) < 10
    ):
        return False
    return True


def sample_memory_dataset(json_file, out_path, memory_length, remove_bad, dataset='coco', allow_duplicates=False, allow_invalid=False):
    coco = COCO(json_file)
    if dataset == 'coco':
        cat_ids = coco.getCatIds(catNms=METAINFO['default_classes'])
    elif dataset == 'few_shot_classes':
        cat_ids = coco.getCatIds(catNms=METAINFO['few_shot_classes'])
    elif dataset == 'lvis':
        cat_ids = coco.getCatIds(catNms=METAINFO['lvis'])
    elif dataset == 'lvis_common':
        cat_ids = coco.getCatIds(catNms=METAINFO['lvis_common'])
    elif dataset == 'lvis_frequent':
        cat_ids = coco.getCatIds(catNms=METAINFO['lvis_frequent'])
    elif dataset == 'lvis_rare':
        cat_ids = coco.getCatIds(catNms=METAINFO['lvis_rare'])
    elif dataset == 'lvis_minival':
        cat_ids = coco.getCatIds(catNms=METAINFO['lvis_minival'])
    elif dataset == 'lvis_minival_common':
        cat_ids = coco.getCatIds(catNms=METAINFO['lvis_minival_common'])
    elif dataset == 'lvis_minival_frequent':
        cat_ids = coco.getCatIds(catNms=METAINFO['lvis_minival_frequent'])
    elif dataset == 'lvis_minival_rare':
        cat_ids = coco.getCatIds(catNms=METAINFO['lvis_minival_rare'])
    elif dataset == 'pascal_voc_split_1':
        cat_ids = coco.getCatIds(catNms=METAINFO['pascal_voc_split_1'])
    elif dataset == 'pascal_voc_split_2':
        cat_ids = coco.getCatIds(catNms=METAINFO['pascal_voc_split_2'])
    elif dataset == 'pascal_voc_split_3':
        cat_ids = coco.getCatIds(catNms=METAINFO['pascal_voc_split_3'])
    elif dataset == 'coco_semantic_split_1':
        cat_ids = coco.getCatIds(catNms=METAINFO['coco_semantic_split_1'])
    elif dataset == 'coco_semantic_split_2':
        cat_ids = coco.getCatIds(catNms=METAINFO['coco_semantic_split_2'])
    elif dataset == 'coco_semantic_split_3':
        cat_ids = coco.getCatIds(catNms=METAINFO['coco_semantic_split_3'])
    elif dataset == 'coco_semantic_split_4':
        cat_ids = coco.getCatIds(catNms=METAINFO['coco_semantic_split_4'])
    else:
        cat_ids = coco.getCatIds(catNms=METAINFO['default_classes'])

    cat_to_imgs_and_anns = {}
    for ann_id, ann in coco.anns.items():
        if ann["category_id"] not in cat_ids:
            continue
        if 'isimpossible' in ann.keys():
            if remove_bad and ann["isimpossible"] == 1:
                continue
        ann_cat_id = ann["category_id"]
        if ann_cat_id not in cat_to_imgs_and_anns.keys():
            cat_to_imgs_and_anns[ann_cat_id] = []
        cat_to_imgs_and_anns[ann_cat_id].append((ann['image_id'], ann_id))

    sampled_data_by_cat = OrderedDict()
    for cat_id, cat_data in cat_to_imgs_and_anns.items():
        sampled_data_by_cat[cat_id] = []
        sampled_img_ids_cat = []
        invalid_annotations = []
        random.shuffle(cat_data)
        for i in range(len(cat_data)):
            img_id, ann_id = cat_data[i]
            img_info = coco.loadImgs([img_id])[0]
            if not is_valid_annotation(coco.loadAnns([ann_id])[0], img_info):
                if allow_invalid:
                    invalid_annotations.append({'img_id': img_id, 'ann_ids': [ann_id]})
                continue
            if img_id in sampled_img_ids_cat:
                continue
            sampled_img_ids_cat.append(img_id)
            sampled_data_by_cat[cat_id].append({'img_id': img_id, 'ann_ids': [ann_id]})
            if len(sampled_img_ids_cat) >= memory_length:
                break
        if len(sampled_img_ids_cat) < memory_length:
            
            if len(sampled_data_by_cat[cat_id]) == 0 and allow_invalid:
                print("Warning: Class %d has no valid samples. But has %d invalid samples. We allow invalid samples." % (cat_id, len(invalid_annotations)))
                sampled_data_by_cat[cat_id] = invalid_annotations[:memory_length]
            if allow_duplicates:
                needed_samples = memory_length - len(sampled_data_by_cat[cat_id])
                print("Warning: Class %d has less than %d samples. We need %d more samples." % (cat_id, memory_length, needed_samples))
                # Allow duplicates. Add first, then second, until we have enough.
                for i in range(needed_samples):
                    sampled_data_by_cat[cat_id].append(sampled_data_by_cat[cat_id][i])
            else:
                raise ValueError("Reference for class %d is not enough" % cat_id)

    with open(out_path, 'wb') as fw:
        pickle.dump(sampled_data_by_cat, fw)
# fmt: on


def run_authors_lvis_sampler(json_file, out_path, n_shot, class_names, seed=42):
    """The authors' LVIS command line (``few_shot_sampling.py --dataset lvis --seed 42``) on ``json_file``.

    Args:
        json_file: the reference-pool json.
        out_path: where their pickle is written.
        n_shot: K.
        class_names: the names their ``METAINFO['lvis']`` would list (here: the crafted json's).
        seed: ``--seed`` (42 in scripts/lvis_pipeline.sh).

    Returns:
        Their pickled ``OrderedDict{cat_id: [{'img_id', 'ann_ids'}]}``, loaded back.
    """
    METAINFO["lvis"] = list(class_names)
    random.seed(seed)
    sample_memory_dataset(
        json_file,
        out_path,
        n_shot,
        remove_bad=False,
        dataset="lvis",
        allow_duplicates=True,
        allow_invalid=True,
    )
    with open(out_path, "rb") as f:
        return pickle.load(f)
