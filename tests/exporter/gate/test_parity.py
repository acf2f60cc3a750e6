"""The parity module on arrays whose metrics are known by construction."""

import json

import numpy as np
import pytest

from exporter.gate.parity import (
    ParityReport,
    Tolerance,
    TolerancePolicy,
    compare_case,
    compare_output,
    parse_tolerance,
)
from exporter.gate.report import render_html
from runtimes.errors import UsageError


def test_identical_outputs_pass_with_zero_error():
    x = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    m = compare_output("y", x, x.copy(), Tolerance(rel_l2=1e-6, cosine=0.999999, max_abs=0.0))
    assert m.passed and m.max_abs == 0 and m.rel_l2 == 0 and m.cosine == pytest.approx(1.0)
    assert m.exact_zero == x.size


def test_metrics_match_their_definitions():
    ref = np.array([1.0, 2.0, -2.0, 4.0], dtype=np.float32)
    got = ref + np.array([0.1, 0.0, 0.0, -0.2], dtype=np.float32)
    m = compare_output("y", ref, got, Tolerance())
    assert m.max_abs == pytest.approx(0.2, rel=1e-5)
    assert m.mean_abs == pytest.approx(0.075, rel=1e-5)
    assert m.rel_l2 == pytest.approx(np.sqrt(0.05) / 5.0, rel=1e-5)
    expected_cos = float(ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got)))
    assert m.cosine == pytest.approx(expected_cos, rel=1e-7)
    assert m.max_rel == pytest.approx(0.1, rel=1e-3)


def test_each_threshold_can_fail_and_all_reasons_are_listed():
    ref = np.linspace(-1, 1, 100).astype(np.float32)
    got = ref * 1.1
    m = compare_output("y", ref, got, Tolerance(max_abs=0.05, rel_l2=0.05, cosine=1.0 + 1e-9))
    assert not m.passed
    joined = " ".join(m.failures)
    assert "max_abs" in joined and "rel_l2" in joined and "cosine" in joined


def test_nan_and_inf_in_engine_fail_even_without_thresholds():
    ref = np.ones(10, dtype=np.float32)
    got = ref.copy()
    got[3] = np.nan
    got[7] = np.inf
    m = compare_output("y", ref, got, Tolerance())
    assert m.nan == 1 and m.inf == 1 and not m.passed
    assert "NaN/Inf" in m.failures[0]


def test_nan_already_in_reference_is_not_blamed_on_the_engine():
    ref = np.array([1.0, np.nan, 3.0], dtype=np.float32)
    m = compare_output("y", ref, ref.copy(), Tolerance(rel_l2=1e-6))
    assert m.passed and m.ref_nonfinite == 1


def test_argmax_agreement_for_logits_with_ties_excused():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(100, 10))
    ref[:, 0] += 5.0  # class 0 wins every row decisively...
    ref[0, 1] = ref[0, 0] - 1e-4  # ...except row 0, a near-tie between classes 0 and 1
    got = ref + rng.normal(scale=1e-3, size=ref.shape)
    got[0, 1] = got[0, 0] + 1e-4  # the tie flips: within noise
    m = compare_output("logits", ref, got, Tolerance(argmax=1.0))
    assert m.argmax_raw == pytest.approx(0.99) and m.argmax_ties == 1 and m.argmax == 1.0 and m.passed
    got[1, 3] = got[1, 0] + 1.0  # a decisive flip: margin ~5, far beyond the noise
    m = compare_output("logits", ref, got, Tolerance(argmax=1.0))
    assert m.argmax == pytest.approx(0.99) and not m.passed and "1 rows flipped beyond noise" in m.failures[0]
    assert compare_output("hidden", ref, got, Tolerance(argmax=0.9)).argmax is None


def test_integer_outputs_compare_exactly():
    ref = np.array([1, 2, 3, 4])
    m = compare_output("classes", ref, np.array([1, 2, 0, 4]), Tolerance(equal=1.0))
    assert m.equal == pytest.approx(0.75) and not m.passed


def test_shape_mismatch_and_missing_output_fail():
    case = compare_case("opt", {"x": np.zeros((2, 3))}, {"a": np.zeros((2, 3)), "b": np.zeros(3)},
                        {"a": np.zeros((3, 2))}, TolerancePolicy(Tolerance()))
    assert [o.passed for o in case.outputs] == [False, False]
    assert "shape" in case.outputs[0].failures[0] and "missing" in case.outputs[1].failures[0]


def test_policy_defaults_by_precision_and_per_output_overrides():
    p = TolerancePolicy.for_precision("fp32", ["logits:argmax=0.5,cosine=0.9", "rel_l2=1e-3"])
    assert p.default.rel_l2 == 1e-3 and p.default.cosine == 0.99999
    assert p.for_output("logits").argmax == 0.5 and p.for_output("logits").cosine == 0.9
    assert p.for_output("other").argmax == 0.99
    assert TolerancePolicy.for_precision("fp16").default.rel_l2 > TolerancePolicy.for_precision("fp32").default.rel_l2


@pytest.mark.parametrize("bad", ["rel_l2", "foo=1", "logits:rel_l2=abc", ""])
def test_bad_tolerance_text_is_a_usage_error(bad):
    with pytest.raises(UsageError):
        parse_tolerance(bad)


def test_report_lists_every_failure_and_serializes(tmp_path):
    policy = TolerancePolicy.for_precision("fp32")
    report = ParityReport("fp32", policy)
    good = np.ones((2, 4), dtype=np.float32)
    report.cases.append(compare_case("opt", {"x": good}, {"a": good, "b": good}, {"a": good * 2, "b": good * 3}, policy))
    report.cases.append(compare_case("max", {"x": good}, {"a": good, "b": good}, {"a": good, "b": good}, policy))
    report.finish()
    assert report.status == "failed" and not report
    assert len(report.failures()) == 2 and all(f.startswith("opt/") for f in report.failures())
    data = json.loads(report.to_json())
    assert data["status"] == "failed" and len(data["cases"]) == 2
    page = render_html(report, title="t")
    assert "<svg" in page and "failed" in page and "<script" not in page and "http" not in page.split("xmlns")[0]


def test_empty_report_is_not_checked_never_passed():
    report = ParityReport("bf16", TolerancePolicy.for_precision("bf16")).finish()
    assert report.status == "not-checked" and not report.passed


def test_padded_positions_are_left_out_and_counted():
    """Values at positions the attention mask marks as padding are unspecified (ModernBERT's unpadded
    attention leaves other values there than torch): they do not fail a case, and the count is recorded."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2, 5, 4)).astype(np.float32)
    got = ref.copy()
    got[1, 3:] += 10.0  # garbage where row 1 is padded
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    policy = TolerancePolicy(Tolerance(rel_l2=1e-6))
    case = compare_case("c", {"input_ids": mask, "attention_mask": mask}, {"h": ref}, {"h": got}, policy)
    assert case.passed and case.outputs[0].masked == 2 and case.outputs[0].shape == [2, 5, 4]
    got[0, 0, 0] += 1.0  # a real position that differs still fails
    case = compare_case("c", {"attention_mask": mask}, {"h": ref}, {"h": got}, policy)
    assert not case.passed
    pooled = compare_case("c", {"attention_mask": mask}, {"p": ref[:, 0]}, {"p": ref[:, 0] + 1}, policy)
    assert pooled.outputs[0].masked == 0 and not pooled.passed  # (batch, hidden): not per position


def test_a_constant_reference_fails_unless_allowed():
    """A model whose outputs are exactly 0 for every input passed with cosine 1.0: an engine returning zeros
    would pass too. Such an output now fails; --tolerance OUTPUT:allow_constant=1 accepts it with a note."""
    from exporter.gate.cases import run_gate

    cases = [("a", {"x": np.ones((2, 3), np.float32)}), ("b", {"x": np.full((4, 3), 2, np.float32)})]

    def model(feeds):
        x = feeds["x"]
        return {"zeros": np.zeros_like(x), "y": x * 2}

    report = run_gate(model, model, cases, TolerancePolicy.for_precision("fp32"), "fp32")
    assert report.status == "failed"
    assert [f.split(": ")[0] for f in report.failures()] == ["a/zeros"]
    assert "the reference is 0 everywhere in all 2 cases" in report.failures()[0]
    allowed = run_gate(model, model, cases, TolerancePolicy.for_precision("fp32", ["zeros:allow_constant=1"]), "fp32")
    assert allowed.status == "passed" and any("allow_constant" in n for n in allowed.notes)
    varied = run_gate(lambda f: {"y": f["x"] * 2}, lambda f: {"y": f["x"] * 2}, cases,
                      TolerancePolicy.for_precision("fp32"), "fp32")
    assert varied.status == "passed"  # constant within a case, different across cases: informative


def test_an_engine_that_fails_at_run_time_fails_its_case():
    """A built engine that raises on valid inputs is a failed gate (exit 1, bundle kept as .rejected), not a
    bug of enginekit's (exit 3): found on a wav2vec2 whose FP16 frame lengths indexed past its mask."""
    from exporter.gate.cases import run_gate

    cases = [("a", {"x": np.arange(6, dtype=np.float32).reshape(2, 3)})]

    def broken(_feeds):
        raise RuntimeError("invalid indice found, indice = 49")

    report = run_gate(lambda f: {"y": f["x"] * 2}, broken, cases, TolerancePolicy.for_precision("fp32"), "fp32")
    assert report.status == "failed"
    assert report.failures() == ["a/(run): the engine failed on these inputs: invalid indice found, indice = 49"]
