"""tools/compare_methods.py: the method list, the compressed schedule, the table and the README
block (the training itself is what train_net.py runs, tested elsewhere)."""

import os

import pytest

from seg_methods.config import get_cfg
from repo_scripts import load_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
    return load_script("tools/compare_methods.py")


def test_every_method_config_exists_and_names_are_unique():
    tool = _tool()
    names = [m.name for m in tool.METHODS]
    assert len(set(names)) == len(names)
    assert len({tool.method_slug(n) for n in names}) == len(names)
    for m in tool.METHODS:
        assert os.path.isfile(os.path.join(REPO, "configs", m.config)), m.config
        assert m.config.startswith("synthetic/"), m.config


def test_unknown_method_is_refused_by_name():
    with pytest.raises(SystemExit, match="unknown method 'Nope'"):
        _tool().find_method("Nope")


def test_schedule_is_compressed_proportionally():
    tool = _tool()
    cfg = get_cfg()
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS = 1000, (500, 833), 100
    cfg.SOLVER.CHECKPOINT_PERIOD, cfg.TEST.EVAL_PERIOD = 5000, 0
    assert tool.scaled_schedule(cfg, 1000) == []  # fits: the config's own schedule
    assert tool.scaled_schedule(cfg, 2000) == []
    opts = dict(zip(*[iter(tool.scaled_schedule(cfg, 300))] * 2))
    assert opts["SOLVER.MAX_ITER"] == "300"
    assert opts["SOLVER.STEPS"] == "(150, 250)"
    assert opts["SOLVER.WARMUP_ITERS"] == "30"
    assert opts["SOLVER.CHECKPOINT_PERIOD"] == "300"  # a final checkpoint is written


def test_table_rows_and_readme_block(tmp_path):
    tool = _tool()
    rows = [
        {
            "method": "A",
            "config": "synthetic/a.yaml",
            "iters": 10,
            "config_iters": 20,
            "metrics": {"panoptic_seg": {"PQ": 12.34, "PQ_th": 1.0, "PQ_st": 20.0}},
            "train_s_per_iter": 0.5,
            "infer_ms": 81.2,
            "params_m": 13.5,
        },
        {
            "method": "B",
            "config": "synthetic/b.yaml",
            "iters": None,
            "trained": "loaded x.pth",
            "metrics": {
                "refinement": {"IoU": 80.0, "mBA": 60.0, "coarse_IoU": 70.0, "coarse_mBA": 50.0}
            },
        },
        {"method": "C", "config": "synthetic/c.yaml", "error": "exit code 1"},
    ]
    lines = tool.table_rows(rows)
    assert len(lines) == 2 + 3
    assert "| A | `synthetic/a.yaml` | 10 / 20 | 12.3 | 1.0 | 20.0 | - | - |" in lines[2]
    assert "IoU 80.0 / mBA 60.0 (coarse 70.0 / 50.0)" in lines[3] and "loaded x.pth" in lines[3]
    assert "failed: exit code 1" in lines[4]
    readme = tmp_path / "README.md"
    readme.write_text(f"head\n{tool.BEGIN}\nold\n{tool.END}\ntail\n")
    tool.update_readme("new table", str(readme))
    assert readme.read_text() == f"head\n{tool.BEGIN}\nnew table\n{tool.END}\ntail\n"
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="markers"):
        tool.update_readme("x", str(readme))


def _args(tool, *extra):
    return tool.get_parser().parse_args(["--budget-minutes", "3", *extra])


def test_rows_are_reused_only_with_the_same_config_and_settings(tmp_path):
    import json

    tool = _tool()
    m = tool.METHODS[0]
    path = tmp_path / "compare.json"
    args = _args(tool)
    assert tool.reusable_row(str(path), m, args) is None  # nothing measured yet
    row = {"method": m.name, "config": m.config, "settings": tool.settings_of(args)}
    path.write_text(json.dumps(row))
    assert tool.reusable_row(str(path), m, args) == row
    assert tool.reusable_row(str(path), m, _args(tool, "--seed", "1")) is None
    assert tool.reusable_row(str(path), m, _args(tool, "--train-threads", "1")) is None
    assert tool.reusable_row(str(path), tool.METHODS[1], args) is None  # another config
    path.write_text(json.dumps({"method": m.name, "config": m.config}))  # no settings recorded
    assert tool.reusable_row(str(path), m, args) is None


class _FakeChild:
    """Stands in for a child process: writes its row when polled after ``steps`` polls."""

    live = 0
    most_live = 0

    def __init__(self, cmd):
        self.output = cmd[cmd.index("--output") + 1]
        self.name = cmd[cmd.index("--one") + 1]
        self.returncode = None
        self.polls = 0
        _FakeChild.live += 1
        _FakeChild.most_live = max(_FakeChild.most_live, _FakeChild.live)

    def _end(self):
        import json

        tool = _tool()
        m = tool.find_method(self.name)
        if m.name == "HLE":  # one child fails: its row says so, the others are kept
            self.returncode = 3
        else:
            self.returncode = 0
            path = os.path.join(self.output, tool.method_slug(m.name), "compare.json")
            row = {"method": m.name, "config": m.config, "iters": 1, "config_iters": 2}
            with open(path, "w") as f:
                json.dump(row, f)
        _FakeChild.live -= 1

    def poll(self):
        self.polls += 1
        if self.returncode is None and self.polls >= 2:
            self._end()
        return self.returncode

    def wait(self):
        if self.returncode is None:
            self._end()
        return self.returncode


@pytest.mark.parametrize("jobs", [1, 2])
def test_jobs_run_methods_concurrently_and_the_table_keeps_the_method_order(
    tmp_path, monkeypatch, jobs
):
    tool = _tool()
    monkeypatch.setattr(tool, "start_child", lambda cmd, log: _FakeChild(cmd))
    monkeypatch.setattr(tool, "POLL_SECONDS", 0.0)
    _FakeChild.live = _FakeChild.most_live = 0
    names = ["CRM", "HLE", "Mask2Former", "ProtoSeg"]  # run order: CRM first
    code = tool.main(["--methods", ",".join(names), "--jobs", str(jobs), "--output", str(tmp_path)])
    assert code == 1  # HLE failed
    assert _FakeChild.most_live == jobs
    table = (tmp_path / "table.md").read_text().splitlines()
    body = [line.split(" | ")[0].lstrip("| ") for line in table[2:6]]
    order = [m.name for m in tool.METHODS]
    assert body == sorted(names, key=order.index)  # METHODS order, not run order
    hle = next(line for line in table if line.startswith("| HLE"))
    assert "failed: exit code 3" in hle
    if jobs > 1:
        assert "compare.log" in hle and f"{jobs} methods ran at a time" in table[-1]
