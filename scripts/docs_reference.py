"""The documentation's generated parts, from the code: docs/reference/cli.md and the README's table of commands
from the CLI's table (cnnlab/cli/table.py). `--check` exits 1 when a checked-in page differs from what the code makes now (CI).

    python scripts/docs_reference.py [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cnnlab.cli.table import commands_table, reference  # noqa: E402

START, END = "<!-- commands:start -->\n", "<!-- commands:end -->"


def readme() -> str:
    """README.md with its table of commands (between its markers) made anew."""
    text = (REPO / "README.md").read_text()
    head, rest = text.split(START, 1)
    return head + START + commands_table() + END + rest.split(END, 1)[1]


PAGES = {REPO / "docs" / "reference" / "cli.md": reference, REPO / "README.md": readme}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    ns = parser.parse_args()
    stale = []
    for path, make in PAGES.items():
        text = make()
        if ns.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    for path in stale:
        print(f"{path.relative_to(REPO)} is out of date: run python scripts/docs_reference.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
