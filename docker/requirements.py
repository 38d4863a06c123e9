"""Print the pip requirements of TZD's base install plus the named extras, read from pyproject.toml.

The image installs its dependencies from this list before the project's code is copied in, so a code
change never reinstalls them; docker/test.sh fills the offline wheelhouse from the same list.

    python docker/requirements.py PYPROJECT EXTRA [EXTRA ...]    # e.g. pyproject.toml serve

Self-references (`tzd[core]`) are expanded; torch is left out (it is installed first, pinned).
"""

from __future__ import annotations

import re
import sys
import tomllib

_SELF = re.compile(r"^\s*tzd\s*\[([^\]]+)\]\s*$")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    out: list[str] = list(project.get("dependencies", []))
    seen: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"error: extra {extra!r} is not in pyproject.toml (have: {sorted(optional)})")
        seen.add(extra)
        for req in optional[extra]:
            m = _SELF.match(req)
            if m:
                todo.extend(e.strip() for e in m.group(1).split(","))
            else:
                out.append(req)
    unique: list[str] = []
    for req in out:
        name = _NAME.match(req)
        if name and name.group(1).lower() == "torch":
            continue
        if req not in unique:
            unique.append(req)
    return unique


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0], "rb") as f:
        data = tomllib.load(f)
    print("\n".join(requirements(data, argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
