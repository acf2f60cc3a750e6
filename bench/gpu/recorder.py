"""Budgeted stages for one device call (the lent GPU gives a command 10 minutes): each stage runs only
when the time it needs is left, its result or its error is recorded, and the JSON is rewritten after
every stage, so a call cut short keeps what it measured."""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path


class Recorder:
    def __init__(self, path: Path, budget_s: float):
        self.path, self.t0, self.budget = path, time.perf_counter(), budget_s
        self.data: dict = {"command": " ".join(sys.argv), "stages": {}, "rows": [], "notes": []}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")

    def stage(self, name: str, fn, need_s: float):
        if self.left() < need_s:
            self.data["stages"][name] = {"status": f"skipped: {self.left():.0f} s left of the budget, needs ~{need_s:.0f}"}
            self.save()
            return None
        t = time.perf_counter()
        try:
            result = fn()
            self.data["stages"][name] = {"status": "ok", "seconds": round(time.perf_counter() - t, 1)}
            return result
        except Exception as exc:
            self.data["stages"][name] = {"status": f"failed: {type(exc).__name__}: {str(exc)[:1500]}",
                                         "traceback": traceback.format_exc()[-3000:],
                                         "seconds": round(time.perf_counter() - t, 1)}
            print(f"stage {name} failed: {exc}", file=sys.stderr)
            return None
        finally:
            print(f"[{time.perf_counter() - self.t0:6.1f} s] {name}: {self.data['stages'][name]['status'][:200]}", flush=True)
            self.save()
