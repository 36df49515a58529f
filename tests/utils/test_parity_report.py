"""seg_methods.utils.parity: the report of the official-code comparison tools, and the random
weights they load."""

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


def test_randomize_state_rules_and_seed():
    import torch

    from seg_methods.utils.parity import randomize_state

    def model():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.BatchNorm2d(64))
        m.register_buffer("index", torch.arange(5))
        m.register_parameter("token", torch.nn.Parameter(torch.zeros(1, 4)))
        return m

    a, b, c = model(), model(), model()
    init = a[0].weight.detach().clone()
    state = randomize_state(a, 3)
    assert torch.equal(state["index"], torch.arange(5))  # integer buffers kept
    assert all(torch.equal(state[k], v) for k, v in a.state_dict().items())  # loaded
    rv, rm, w = a[1].running_var, a[1].running_mean, a[1].weight
    assert ((rv >= 0.5) & (rv <= 2.0)).all() and ((w >= 0.5) & (w <= 1.5)).all()
    assert rm.abs().max() < 0.6 and a[0].bias.abs().max() < 0.6 and rm.std() > 0.05
    rel = (a[0].weight / init - 1).std()  # "noise": the initialisation times (1 + N(0, 0.01))
    assert 0.08 < float(rel) < 0.12
    assert torch.equal(a.token, torch.zeros(1, 4))  # zero stays zero under multiplicative noise
    # the same seed gives the same values; the special rule wins over the generic ones
    randomize_state(b, 3)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in state.items())
    special = randomize_state(
        c,
        3,
        matrices="fresh",
        special=lambda k, v, g: torch.full(v.shape, 7.0) if k == "token" else None,
    )
    assert torch.equal(special["token"], torch.full((1, 4), 7.0))
    fan_in = 3 * 3 * 3  # "fresh": N(0, 1 / fan_in)
    assert abs(float(c[0].weight.std()) * fan_in**0.5 - 1.0) < 0.1
    with pytest.raises(ValueError, match="matrices"):
        randomize_state(c, 3, matrices="xavier")
