"""Editing a practitioner's bank: class subsets, removing, renaming, merging (exact, from stored features).

A bank keeps one feature per reference (``MemoryBank.instance_means[c, :counts[c]]``), so every edit is a
re-arrangement of stored rows: nothing is encoded again, and the result is the bank a ``Segmenter`` would
build from scratch from the same references (same tensors, same metadata, the same file bytes).

Order rule. "From scratch" means: the references added class by class, in the bank's class order, each
class's references in their order in the bank. Classes are in order of first appearance (= ascending
category id), references in order of addition. Removing a class or a reference keeps the order of the
rest; a merge appends the second bank's classes after the first bank's and a class present in both gets
the second bank's references after its own (matched by name).

Category ids. A class added without an id gets max(ids so far) + 1, as ``Segmenter.add_reference`` gives
it, so a bank of such classes has ids 1..C in class order and keeps 1..C after any edit (removing class 2
of 3 renumbers the third to 2; ``ntt segment``'s ``dataset.json`` writes these ids). A class whose
references came with an id (``add_reference(..., category_id=)``: a COCO json's categories) keeps it: its
references record it (``"category_id"`` in their provenance). A bank written before references recorded
their sources (format version 1 or 2): its ids count as given unless they are 1..C. A class subset for one
call (:func:`subset`) keeps every id: the results are comparable with the whole bank's.

Exactness. The saved file holds no timestamp; its ``ntt_version`` is the running one for an edited bank as
for a new one, so the whole files compare equal (``tests/test_bank_edit.py``). Two limits: a bank written
before references recorded their sources keeps its references' older metadata (its tensors still equal a
new build's); and a stored feature is the one its encoder batch gave, so a grown bank equals a fresh build
bit for bit when the encoder gives a crop the same bits whatever its batch-mates (the CPU runs tested;
``matcher.memory.batch_size=1`` makes it so anywhere).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ntt.bank import MemoryBank
from ntt.utils.errors import UserError

__all__ = ["BankEditError", "subset", "remove_class", "remove_reference", "rename_class", "merge", "describe"]


class BankEditError(UserError, ValueError):
    """An edit the bank cannot take (unknown class, a benchmark bank, incompatible banks); one line."""


@dataclass
class _Class:
    """One class of a bank being edited: its name, id, whether the id was given, and its reference rows."""

    name: str
    category_id: int
    id_given: bool
    means: list[torch.Tensor]  # [D] each
    weight_sums: list[torch.Tensor]  # [] each
    refs: list[dict]


def _editable(bank: MemoryBank, what: str) -> None:
    if bank.shots is not None or bank.postprocessed or bank.patch_features is not None:
        raise BankEditError(
            f"{what}: this is a benchmark run's memory (K shots per class, or postprocessed, or with patch "
            "features): edit a practitioner's bank (Segmenter.save / ntt segment's bank.ntt) instead"
        )


def _ids_given(bank: MemoryBank) -> list[bool]:
    """Per class: whether its category id was given (kept through edits) or counted (1..C)."""
    auto = list(bank.category_ids) == list(range(1, len(bank.category_ids) + 1))
    given = []
    for c in range(len(bank.category_ids)):
        refs = bank.refs[c] if c < len(bank.refs) else []
        if any("category_id" in r for r in refs):
            given.append(True)
        elif refs and all("image_sha256" in r for r in refs):  # records its sources: no id was given
            given.append(False)
        else:  # a bank from before references recorded their sources
            given.append(not auto)
    return given


def _classes(bank: MemoryBank) -> list[_Class]:
    given = _ids_given(bank)
    out = []
    for c, (cid, name) in enumerate(zip(bank.category_ids, bank.category_names)):
        n = int(bank.counts[c])
        refs = list(bank.refs[c]) if c < len(bank.refs) else [{} for _ in range(n)]
        out.append(
            _Class(
                name=str(name),
                category_id=int(cid),
                id_given=given[c],
                means=[bank.instance_means[c, k] for k in range(n)],
                weight_sums=[bank.weight_sums[c, k] for k in range(n)],
                refs=refs,
            )
        )
    return out


def _number(classes: list[_Class], what: str) -> list[_Class]:
    """Ids as ``Segmenter.add_reference`` gives them when the classes are added in this order; then the
    classes sorted by id (a bank's rows are in ascending id order)."""
    used: dict[int, str] = {}
    for cls in classes:
        if not cls.id_given:
            cls.category_id = max(used, default=0) + 1
        elif cls.category_id in used:
            raise BankEditError(
                f"{what}: category id {cls.category_id} is used by both {used[cls.category_id]!r} and "
                f"{cls.name!r}: rename one class or remove one"
            )
        used[cls.category_id] = cls.name
    return sorted(classes, key=lambda c: c.category_id)


def _rebuild(template: MemoryBank, classes: list[_Class], what: str, *, renumber: bool = True) -> MemoryBank:
    """The bank of ``classes`` with ``template``'s settings: rows placed as ``ntt.memory.assemble_bank``
    places them (zero padding up to the widest class), so equal references give equal bytes."""
    from ntt.bank import _ntt_version

    if not classes:
        raise BankEditError(f"{what}: no class would be left in the bank")
    classes = _number(classes, what) if renumber else classes
    counts = [len(c.means) for c in classes]
    width, dim = max(counts), int(template.instance_means.shape[-1])
    means = torch.zeros((len(classes), width, dim), dtype=torch.float32)
    sums = torch.zeros((len(classes), width), dtype=torch.float32)
    for c, cls in enumerate(classes):
        if cls.means:
            means[c, : counts[c]] = torch.stack(cls.means)
            sums[c, : counts[c]] = torch.stack(cls.weight_sums)
    return MemoryBank(
        instance_means=means,
        weight_sums=sums,
        category_ids=[c.category_id for c in classes],
        category_names=[c.name for c in classes],
        counts=torch.tensor(counts, dtype=torch.int64),
        encoder=template.encoder,
        feature_dim=template.feature_dim,
        ntt_version=_ntt_version(),  # as a bank built now records
        refs=[list(c.refs) for c in classes],
        fill_settings=dict(template.fill_settings),
        config=dict(template.config),
    )


def _find(bank: MemoryBank, name: str, what: str) -> int:
    """Row of class ``name``; an unknown name is one line listing the close names and the bank's classes."""
    names = list(bank.category_names)
    if name in names:
        return names.index(name)
    close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.6)
    raise BankEditError(
        f"{what}: no class {name!r} in the bank"
        + (f" (did you mean {', '.join(close)}?)" if close else "")
        + f"; its classes: {', '.join(names)}"
    )


def subset(bank: MemoryBank, classes: Sequence[str], *, what: str = "classes") -> MemoryBank:
    """The bank holding only ``classes`` (in the bank's order; ids kept): predictions with it are those of
    a bank built from only these classes' references. Works on any bank (a benchmark run's too).

    Args:
        bank: the bank.
        classes: class names (a repeated name counts once).
        what: how messages name the option (``predict(classes=...)``, ``--classes``).
    """
    if isinstance(classes, str):
        classes = [classes]
    wanted = list(dict.fromkeys(str(c) for c in classes))
    if not wanted:
        raise BankEditError(f"{what}: the subset is empty; give at least one class name")
    rows = sorted(_find(bank, name, what) for name in wanted)
    keep = torch.as_tensor(rows, dtype=torch.long)
    counts = bank.counts[keep]
    width = int(counts.max())

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[keep, :width].clone()

    return MemoryBank(
        instance_means=pick(bank.instance_means),
        weight_sums=pick(bank.weight_sums),
        category_ids=[bank.category_ids[r] for r in rows],
        category_names=[bank.category_names[r] for r in rows],
        shots=bank.shots,
        counts=counts.clone(),
        seed=bank.seed,
        encoder=bank.encoder,
        feature_dim=bank.feature_dim,
        config_hash=bank.config_hash,
        ntt_version=bank.ntt_version,
        refs=[bank.refs[r] for r in rows] if bank.refs else [],
        postprocessed=bank.postprocessed,
        fill_settings=dict(bank.fill_settings),
        config=dict(bank.config),
        patch_features=pick(bank.patch_features),
        patch_weights=pick(bank.patch_weights),
    )


def remove_class(bank: MemoryBank, name: str) -> MemoryBank:
    """The bank without class ``name`` (counted ids renumbered 1..C, see the module docstring).

    Args:
        bank: a practitioner's bank.
        name: the class to remove.
    """
    _editable(bank, "remove_class")
    row = _find(bank, name, "remove_class")
    return _rebuild(bank, [c for i, c in enumerate(_classes(bank)) if i != row], "remove_class")


def remove_reference(bank: MemoryBank, name: str, index: int) -> MemoryBank:
    """The bank without reference ``index`` (0-based, in order of addition) of class ``name``; removing a
    class's last reference removes the class.

    Args:
        bank: a practitioner's bank.
        name: the class.
        index: which of its references (``describe`` lists them); negative counts from the end.
    """
    _editable(bank, "remove_reference")
    row = _find(bank, name, "remove_reference")
    classes = _classes(bank)
    cls = classes[row]
    n = len(cls.means)
    if not -n <= int(index) < n:
        raise BankEditError(
            f"remove_reference: class {name!r} has {n} reference(s) (0..{n - 1}), not {index}"
        )
    k = int(index) % n
    for items in (cls.means, cls.weight_sums, cls.refs):
        del items[k]
    if not cls.means:
        del classes[row]
    return _rebuild(bank, classes, "remove_reference")


def rename_class(bank: MemoryBank, old: str, new: str) -> MemoryBank:
    """The bank with class ``old`` named ``new`` (its id, references and place unchanged).

    Args:
        bank: a practitioner's bank.
        old: the class's name.
        new: its new name (not already a class of the bank).
    """
    _editable(bank, "rename_class")
    row = _find(bank, old, "rename_class")
    if not isinstance(new, str) or not new:
        raise BankEditError(f"rename_class: the new name must be a non-empty name, got {new!r}")
    if new in bank.category_names and new != old:
        raise BankEditError(
            f"rename_class: the bank already has a class {new!r}; to join the two, merge banks instead"
        )
    classes = _classes(bank)
    classes[row].name = new
    return _rebuild(bank, classes, "rename_class", renumber=False)


def merge(first: MemoryBank, second: MemoryBank) -> MemoryBank:
    """``first`` then ``second``: the second bank's new classes appended, a class of both (same name) with
    the second bank's references after its own. The result keeps the first bank's config.

    Args:
        first: a practitioner's bank.
        second: a bank of the same encoder and reference settings.

    Raises:
        BankEditError: other encoders or fill settings (the features would not compare), or a category id
            given to two classes.
    """
    _editable(first, "merge")
    _editable(second, "merge")
    if first.encoder != second.encoder or first.feature_dim != second.feature_dim:
        raise BankEditError(
            f"merge: the banks hold features of different encoders ({first.encoder}, D={first.feature_dim} "
            f"and {second.encoder}, D={second.feature_dim}): rebuild one with the other's encoder"
        )
    if first.fill_settings != second.fill_settings:
        raise BankEditError(
            f"merge: the banks encoded their references differently ({first.fill_settings} and "
            f"{second.fill_settings}): rebuild one with the other's matcher.memory settings"
        )
    classes = _classes(first)
    by_name = {c.name: c for c in classes}
    for cls in _classes(second):
        mine = by_name.get(cls.name)
        if mine is None:
            classes.append(cls)
            by_name[cls.name] = cls
            continue
        if cls.id_given and mine.id_given and cls.category_id != mine.category_id:
            raise BankEditError(
                f"merge: class {cls.name!r} has category id {mine.category_id} in the first bank and "
                f"{cls.category_id} in the second: rename it in one of them"
            )
        if cls.id_given and not mine.id_given:  # the id given in the second bank is the class's id
            mine.category_id, mine.id_given = cls.category_id, True
        mine.means += cls.means
        mine.weight_sums += cls.weight_sums
        mine.refs += cls.refs
    return _rebuild(first, classes, "merge")


def _source_line(ref: dict) -> str:
    """One reference's provenance, short: source file, prompt (geometry or mask digest), image digest."""
    if "image_id" in ref:  # a benchmark bank's reference: a COCO annotation
        return f"image {ref['image_id']}  annotation {ref.get('ann_id')}"
    parts = [str(ref.get("source", "?"))]
    if "box" in ref:
        parts.append(f"box {ref['box']}")
    elif "points" in ref:
        parts.append(f"points {ref['points']} labels {ref.get('point_labels')}")
    elif "mask_sha256" in ref:
        parts.append(f"mask sha256 {ref['mask_sha256'][:12]}")
    else:  # a bank from before references recorded their sources
        parts.append(str(ref.get("prompt", "?")))
    if "image_sha256" in ref:
        parts.append(f"image sha256 {ref['image_sha256'][:12]}")
    return "  ".join(parts)


def describe(bank: MemoryBank) -> str:
    """A few lines: the bank's encoder and format, then per class its id, name, count and each reference's
    source (file, prompt kind and geometry, content digests).

    Args:
        bank: any bank.
    """
    meta = bank.meta()
    total = int(bank.counts.sum())
    lines = [
        f"{len(bank.category_names)} classes, {total} references; encoder {bank.encoder} (D={bank.feature_dim}); "
        f"format {meta['format']} v{meta['format_version']}; ntt {bank.ntt_version}"
    ]
    for c, (cid, name) in enumerate(zip(bank.category_ids, bank.category_names)):
        n = int(bank.counts[c])
        lines.append(f"  [{cid}] {name}: {n} reference{'s' if n != 1 else ''}")
        refs = bank.refs[c] if c < len(bank.refs) else []
        for k, ref in enumerate(refs):
            lines.append(f"      {k}: {_source_line(ref)}")
    return "\n".join(lines)
