"""Check that this environment is the lock: every installed distribution at its locked version.

    python lock/check.py lock/requirements.txt [NAME==VERSION ...]   (extra exact pins, e.g. --no-deps data packages)

Run by `make install` after it installs, so a drifted environment fails the install, not a test an hour
later. enginekit itself (the editable install) is exempt; so are pip's own bootstrap packages when the
lock does not name them. Exit 1 with one line per mismatch.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)")
_EXEMPT = {"enginekit", "pip", "setuptools", "wheel"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        m = _PIN.match(line.strip())
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def local_free(version: str) -> str:
    """2.13.0+cpu satisfies ==2.13.0 (PEP 440: a pin without a local label matches any)."""
    return version.split("+", 1)[0]


def mismatches(pins: dict[str, str], installed: dict[str, str]) -> list[str]:
    problems = []
    for name, version in sorted(installed.items()):
        want = pins.get(name)
        if want is None:
            if name not in _EXEMPT:
                problems.append(f"{name}=={version} is installed but not in the lock")
        elif local_free(version) != local_free(want) and version != want:
            problems.append(f"{name}=={version} is installed, the lock says {want}")
    return problems


def main(argv: list[str]) -> int:
    lock = Path(argv[0])
    pins = read_pins(lock.read_text().splitlines() + argv[1:])
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}
    problems = mismatches(pins, installed)
    for p in problems:
        print(f"lock/check.py: {p}", file=sys.stderr)
    if problems:
        print(f"lock/check.py: this environment is not {lock}: recreate it (make clean install), or refresh the "
              "lock with `make lock` if pyproject.toml changed.", file=sys.stderr)
        return 1
    print(f"lock/check.py: {len(installed)} distributions, all at the versions of {lock}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
