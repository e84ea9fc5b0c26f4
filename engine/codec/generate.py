"""Write the Avro schemas of record types that have none yet, and check the others.

    python -m engine.codec.generate          # add missing schemas to schemas/
    python -m engine.codec.generate --check  # only report; exit 1 if anything is off

A new record type or version gets ``<kind>/<Name>.v<N>.avsc`` and the catalogue's next
id. A published schema is never rewritten: when a class no longer matches its schema,
this reports the difference and exits 1; the fix is a new ``VERSION`` of the class.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

from engine.codec import schemas_dir
from engine.codec._catalogue import (
    CATALOGUE,
    Catalogue,
    read_catalogue,
    read_schema,
    write_catalogue,
    write_schema,
)
from engine.codec._registry import RecordType, core_records


def generate(
    folder: Path,
    records: Iterable[RecordType] | None = None,
    *,
    check: bool = False,
) -> tuple[list[str], list[str]]:
    """Add the schemas missing from ``folder`` (unless ``check``).

    Returns the files added (or, with ``check``, missing) and one line per published
    schema that no longer matches its class.
    """
    catalogue = (
        read_catalogue(folder) if (folder / CATALOGUE).exists() else Catalogue((), next_id=1)
    )
    published = {entry.file: entry for entry in catalogue.entries}
    added: list[str] = []
    drifted: list[str] = []
    for record in core_records() if records is None else records:
        entry = published.get(record.file)
        if entry is not None:
            problem = record.drift(read_schema(folder, entry))
            if problem:
                drifted.append(f"{record.file}: {problem}")
            continue
        added.append(record.file)
        if not check:
            write_schema(folder, record.file, record.schema())
            catalogue, _ = catalogue.with_entry(record.file)
    if added and not check:
        write_catalogue(folder, catalogue)
    return added, drifted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.codec.generate",
        description=__doc__.split("\n\n")[0] if __doc__ else "",
    )
    parser.add_argument(
        "--schemas",
        type=Path,
        default=None,
        help="the schemas folder (default: $TERRANOHA_SCHEMAS or schemas/)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 when a schema is missing or stale",
    )
    args = parser.parse_args(argv)
    folder: Path = args.schemas or schemas_dir()
    added, drifted = generate(folder, check=args.check)
    for file in added:
        print(f"{'missing' if args.check else 'wrote'} {folder / file}")
    for line in drifted:
        print(f"stale {folder / line}: give the class a new VERSION", file=sys.stderr)
    return 1 if drifted or (args.check and added) else 0


if __name__ == "__main__":
    sys.exit(main())
