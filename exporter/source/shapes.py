"""Dynamic-dim options of the CLI: --shapes NAME=MIN:OPT:MAX and --dynamic NAME,..."""

from __future__ import annotations

import re
from collections.abc import Mapping

from runtimes.errors import UsageError
from runtimes.manifest import DimRange

_NAME = re.compile(r"[A-Za-z_][\w.]*")
_FORM = ("Expected --shapes as NAME=MIN:OPT:MAX[,NAME=...] (e.g. batch=1:8:32,sequence=1:128:512; a single number "
         "fixes the dim, MIN:MAX uses MAX as opt)")


def parse_shapes(text: str | None) -> dict[str, DimRange]:
    """Parse --shapes 'batch=1:8:32,sequence=1:128:512' (N alone means fixed; MIN:MAX sets opt=MAX)."""
    out: dict[str, DimRange] = {}
    if not text:
        return out
    for part in text.split(","):
        if not part.strip():
            continue
        name, lo, opt, hi = _parse_range(part.strip(), text)
        try:
            out[name] = DimRange(lo, opt, hi)
        except ValueError:
            order = ":".join(str(v) for v in sorted((lo, opt, hi)))
            raise UsageError(
                f"Expected 1 <= MIN <= OPT <= MAX for '{name}' in --shapes '{text}', found {lo}:{opt}:{hi}. "
                + ("Every size must be at least 1." if min(lo, opt, hi) < 1 else f"Put them in order: {name}={order}.")
            ) from None
    return out


def _parse_range(part: str, text: str) -> tuple[str, int, int, int]:
    """One NAME=MIN[:OPT]:MAX of --shapes `text`, as (name, min, opt, max); the UsageError says which
    piece is wrong, quoting the user's text as given."""
    name, sep, values = (s.strip() for s in part.partition("="))
    where = f"'{part}'" + (f" of --shapes '{text}'" if part != text.strip() else "")
    if not sep:
        raise UsageError(f"{_FORM}, found {where}, which has no '='. Write it as {name or 'NAME'}=MIN:OPT:MAX.")
    if not _NAME.fullmatch(name):
        raise UsageError(f"{_FORM}, found {where}, whose NAME '{name}' is not a dim name (letters, digits, _ and "
                         ".; not starting with a digit). Use the model's dim names, e.g. batch or sequence.")
    pieces = [v.strip() for v in values.split(":")]
    if len(pieces) > 3:
        raise UsageError(f"{_FORM}, found {where}, which has {len(pieces)} numbers; give at most three (MIN:OPT:MAX).")
    roles = {1: ("value",), 2: ("MIN", "MAX"), 3: ("MIN", "OPT", "MAX")}[len(pieces)]
    for role, piece in zip(roles, pieces):
        if not piece.isdigit() or not piece.isascii():
            raise UsageError(f"{_FORM}, found {where}, whose {role} '{piece}' is not a whole number. Give whole "
                             f"numbers, e.g. {name}=1:8:32.")
    nums = [int(p) for p in pieces]
    lo, hi = nums[0], nums[-1]
    return name, lo, (nums[1] if len(nums) == 3 else hi if len(nums) == 2 else lo), hi


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
