"""Where a benchmark's table goes when a `make bench-*` target runs it: `benchmarks/results/<name>.md`.

The docs' benchmark page includes these files as they are, so the tables there are the benchmarks' own
output, never typed by hand. A file is replaced whole (written under a temporary name, then renamed), so
a benchmark killed while writing leaves the previous result.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

from lightning_quant.utils.files import atomic_write


def publish(path: str | os.PathLike | None, text: str, command: str) -> Path | None:
    """Write ``text`` (the benchmark's printed table and notes) to ``path`` with the command and date above it.

    ``path`` is ``None`` when the benchmark was run without ``--publish``: nothing is written.
    """
    if path is None:
        return None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    header = f"<!-- written by `{command}` on {datetime.date.today().isoformat()}; not edited by hand -->\n"
    target = atomic_write(path, header + f"Command: `{command}`\n\n" + text.rstrip() + "\n")
    print(f"published to {target}", file=sys.stderr)
    return target
