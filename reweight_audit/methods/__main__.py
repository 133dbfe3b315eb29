"""``python -m reweight_audit.methods``: print the built-in methods table, or rewrite it in the docs.

    python -m reweight_audit.methods --markdown                   # the table, to stdout
    python -m reweight_audit.methods --write-docs docs/methods.md # replace the table between the markers
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reweight_audit.core.errors import AuditError
from reweight_audit.methods import methods_markdown, splice_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reweight_audit.methods", description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--markdown", action="store_true", help="print the methods table (Markdown)")
    action.add_argument("--write-docs", metavar="PATH", help="rewrite the generated table in PATH (docs/methods.md)")
    args = parser.parse_args(argv)
    table = methods_markdown()
    if args.markdown:
        sys.stdout.write(table)
        return 0
    path = Path(args.write_docs)
    try:
        path.write_text(splice_table(path.read_text(encoding="utf-8"), table), encoding="utf-8")
    except (OSError, AuditError) as exc:
        print(f"error: {path}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
