"""seg_methods.utils.parity: the report of the official-code comparison tools."""

import pytest

from seg_methods.utils.parity import Report, Row


def test_report_rows_verdict_lookup_and_format():
    report = Report(model="m")
    report.rows += [
        Row("logits (1, 2)", 1e-7, 2.0, True),
        Row("logits argmax", 0.0, 1.0, True, "ties: 0"),
        Row("tokens", 0.5, 1.0, False),
    ]
    assert not report.ok and [r.name for r in report.failed()] == ["tokens"]
    assert report.row("logits argmax").note == "ties: 0"  # exact name first
    assert report.row("logits").name == "logits (1, 2)"  # else the first prefix match
    assert report.rows[0].rel_diff == pytest.approx(5e-8)
    with pytest.raises(KeyError, match="no comparison row named 'x'"):
        report.row("x")
    text = report.format()
    assert text.splitlines()[0] == "== m"
    assert "NO" in text.splitlines()[-1] and "ties: 0" in text
    report.rows.pop()
    assert report.ok
