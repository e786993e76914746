"""``ntt bank``: show and edit a saved reference bank (``bank.ntt``) without encoding its references again.

    ntt bank show BANK                                  classes, counts, each reference's source
    ntt bank add BANK --refs REFS [--ref-images D]      encode only the new references and append them
    ntt bank remove BANK CLASS [--ref I]                a class, or its reference I (0-based; see show)
    ntt bank rename BANK OLD NEW                        a class's new name (its id and references kept)
    ntt bank merge BANK OTHER --out OUT                 OTHER's classes and references after BANK's

Each edit writes ``--out`` (default: BANK itself, replaced atomically) and is exact: the file is the one a
new bank built from the same references would be (``ntt.bank_edit`` gives the order and id rules). ``add``
builds the models of the bank's config (``--device``, Hydra overrides such as ``paths.checkpoints=/models``)
and takes ``--refs`` in any of ``ntt segment``'s formats.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ntt.bank import MemoryBank
from ntt.bank_edit import describe, merge, remove_class, remove_reference, rename_class
from ntt.utils.errors import UserError

__all__ = ["main"]

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ntt bank",
        description="Show and edit a saved reference bank (bank.ntt) without encoding its references again.",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="classes, counts and each reference's source")
    show.add_argument("bank")
    add = sub.add_parser("add", help="encode new references (--refs) and append them to the bank")
    add.add_argument("bank")
    add.add_argument("--refs", required=True, help="a folder, a COCO json or a prompt json (as ntt segment)")
    add.add_argument("--ref-images", default=None, help="image folder of a COCO reference json")
    add.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1")
    remove = sub.add_parser("remove", help="remove a class, or one of its references (--ref)")
    remove.add_argument("bank")
    remove.add_argument("cls", metavar="CLASS")
    remove.add_argument("--ref", type=int, default=None, help="the reference's index (0-based, see show)")
    rename = sub.add_parser("rename", help="rename a class")
    rename.add_argument("bank")
    rename.add_argument("old")
    rename.add_argument("new")
    merge = sub.add_parser("merge", help="append a second bank's classes and references")
    merge.add_argument("bank")
    merge.add_argument("other")
    for p in (add, remove, rename, merge):
        p.add_argument("--out", default=None, required=p is merge, help="output file (default: BANK itself)")
    return ap


def _load(path: str) -> MemoryBank:
    try:
        return MemoryBank.load(path)
    except (OSError, ValueError) as err:
        raise UserError(str(err)) from err


def main(argv: list[str] | None = None) -> int:
    """``ntt bank``: show, add to, remove from, rename in or merge saved banks."""
    args, rest = _parser().parse_known_args(argv)
    if rest and args.command != "add":
        _parser().error(f"unrecognised arguments {rest}")
    if args.command == "show":
        print(f"{args.bank}: {describe(_load(args.bank))}")
        return 0
    if args.command == "add":
        bank = _add(args, rest)
    elif args.command == "remove":
        bank = _load(args.bank)
        bank = (
            remove_class(bank, args.cls) if args.ref is None else remove_reference(bank, args.cls, args.ref)
        )
    elif args.command == "rename":
        bank = rename_class(_load(args.bank), args.old, args.new)
    else:
        bank = merge(_load(args.bank), _load(args.other))
    out = bank.save(Path(args.out or args.bank))
    counts = ", ".join(f"{n}: {int(c)}" for n, c in zip(bank.category_names, bank.counts))
    print(f"{out}: {len(bank.category_names)} classes ({counts})")
    return 0


def _add(args, overrides: list[str]) -> MemoryBank:
    """The bank with the references of ``--refs`` appended (only they are encoded)."""
    from ntt.app.references import add_references, load_reference_specs
    from ntt.app.segmenter import Segmenter

    bad = [r for r in overrides if "=" not in r]
    if bad:
        raise UserError(f"ntt bank add: unrecognised arguments {bad} (extra arguments must be KEY=VALUE)")
    try:
        specs = load_reference_specs(args.refs, args.ref_images)
        seg = Segmenter.load(args.bank, device=args.device, overrides=overrides)
        add_references(seg, specs)
        return seg.build()
    except UserError:
        raise
    except (OSError, ValueError) as err:
        raise UserError(str(err)) from err
