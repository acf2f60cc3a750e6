"""--tolerance values (exporter/gate/parity.py parse_tolerance, exporter/gate/task.py): finite numbers,
and an OUTPUT: prefix that names something the gate compares."""

from __future__ import annotations

import pytest

from exporter.gate.parity import Tolerance, parse_tolerance
from exporter.gate.task import check_tolerance_outputs, check_tolerances, split_tolerances
from runtimes.errors import UsageError


@pytest.mark.parametrize("text", ["max_abs=nan", "rel_l2=inf", "logits:cosine=nan", "cosine=-inf", "max_abs=-1",
                                  "argmax=-0.5", "equal=NaN"])
def test_non_finite_or_negative_tolerances_are_refused(text):
    with pytest.raises(UsageError, match="finite"):
        parse_tolerance(text)


def test_signed_and_forcing_values_stay_accepted():
    assert parse_tolerance("cosine=-0.5")[1].cosine == -0.5  # cosine's range is [-1, 1]
    assert parse_tolerance("cosine=1.5")[1].cosine == 1.5  # above 1 forces a failure (the CLI tests use it)
    assert parse_tolerance("logits:argmax=0.95,rel_l2=0")[1] == Tolerance(rel_l2=0.0, argmax=0.95)


@pytest.mark.parametrize("text", ["detections:matched=nan", "zero-shot:prob_delta=inf", "detections:mean_iou=-1",
                                  "zero-shot:order"])
def test_task_tolerances_are_checked_the_same_way(text):
    with pytest.raises(UsageError):
        split_tolerances([text])
    with pytest.raises(UsageError):
        check_tolerances([text])


def test_an_output_prefix_must_name_an_output_or_a_check():
    outputs = ["last_hidden_state", "pooler_output"]
    check_tolerance_outputs(["rel_l2=1e-3", "pooler_output:cosine=0.999"], outputs)
    with pytest.raises(UsageError, match=r"\(last_hidden_state, pooler_output\), found 'nosuchoutput'"):
        check_tolerance_outputs(["nosuchoutput:rel_l2=1e-3"], outputs)
    with pytest.raises(UsageError, match="'detections'"):  # not a detector: there is no such check
        check_tolerance_outputs(["detections:matched=0.9"], outputs)
    detector = ["num_detections", "boxes", "scores", "classes", "raw_boxes", "raw_scores"]
    check_tolerance_outputs(["detections:matched=0.9", "raw_scores:cosine=0.99"], detector)
    check_tolerance_outputs(["zero-shot:order=0.9"], ["logits_per_image", "logits_per_text"])
