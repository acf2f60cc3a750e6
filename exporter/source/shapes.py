"""Dynamic-dim options of the CLI: --shapes NAME=MIN:OPT:MAX and --dynamic NAME,..."""

from __future__ import annotations

import re
from collections.abc import Mapping

from runtimes.errors import UsageError
from runtimes.manifest import DimRange

_RANGE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*=\s*(\d+)(?::(\d+)(?::(\d+))?)?\s*$")


def parse_shapes(text: str | None) -> dict[str, DimRange]:
    """Parse --shapes 'batch=1:8:32,sequence=1:128:512' (N alone means fixed; MIN:MAX sets opt=MAX)."""
    out: dict[str, DimRange] = {}
    if not text:
        return out
    for part in text.split(","):
        if not part.strip():
            continue
        m = _RANGE.match(part)
        if not m:
            raise UsageError(
                f"Expected --shapes as NAME=MIN:OPT:MAX[,NAME=...] (e.g. batch=1:8:32,sequence=1:128:512), "
                f"found '{part.strip()}'. A single number fixes the dim; MIN:MAX uses MAX as opt."
            )
        name, a, b, c = m.groups()
        lo, hi = int(a), int(c or b or a)
        opt = int(b) if c else hi if b else lo
        try:
            out[name] = DimRange(lo, opt, hi)
        except ValueError as exc:
            raise UsageError(f"Invalid range for '{name}' in --shapes: {exc}.") from None
    return out


def merge_dims(defaults: Mapping[str, DimRange], overrides: Mapping[str, DimRange], dynamic: list[str] | None) -> dict[str, DimRange]:
    """Apply --shapes overrides and --dynamic (dims not listed are fixed at their opt value)."""
    unknown = [k for k in overrides if k not in defaults]
    if unknown:
        raise UsageError(
            f"--shapes names dim(s) {unknown}, but this model's dims are {sorted(defaults)}. "
            "Use those names (see `enginekit export --help`)."
        )
    dims = {k: overrides.get(k, v) for k, v in defaults.items()}
    if dynamic is not None:
        bad = [d for d in dynamic if d not in dims]
        if bad:
            raise UsageError(
                f"--dynamic names dim(s) {bad}, but this model's dims are {sorted(dims)}. "
                "List some of those, or 'none' for a fully static engine."
            )
        dims = {k: (v if k in dynamic else DimRange(v.opt, v.opt, v.opt)) for k, v in dims.items()}
    return dims
