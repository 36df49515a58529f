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
