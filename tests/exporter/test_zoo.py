"""The architecture zoo (bench/zoo.py) in CI: tiny random models of every family enginekit builds, each
through `enginekit build hf:DIR --target ort` at fp32 and fp16 with default options, must pass its gate;
the families without a recipe yet (encoder-decoder, captioning) must be refused with exit 2 and one
paragraph, never an internal error. About 4 minutes on 2 cores (two worker processes)."""

import pytest

from bench.zoo import REFUSED_GROUPS, ZOO, coverage_table, run_zoo

pytestmark = pytest.mark.slow


def test_every_zoo_architecture_builds_and_passes_its_gate(tmp_path):
    rows = run_zoo(tmp_path / "zoo", jobs=2)
    print(coverage_table(rows))
    built = [r for r in rows if r["group"] not in REFUSED_GROUPS]
    failed = [f"{r['arch']} {r['precision']}: {r['verdict']} (exit {r['exit_code']}): {r.get('message', '')[:300]}"
              for r in built if r["verdict"] != "pass"]
    assert not failed, "\n".join(failed)
    assert len({r["arch"] for r in built}) >= 35
    refused = [r for r in rows if r["group"] in REFUSED_GROUPS]
    assert refused and all(r["exit_code"] == 2 and "no recipe for it" in r["message"] for r in refused), refused
    assert len(rows) == 2 * len(ZOO)
