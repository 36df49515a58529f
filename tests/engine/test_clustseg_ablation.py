"""tools/clustseg_ablation.py: shared runs, reading finished runs and the summary table.

The trainings themselves are covered by the ClustSeg train-step tests; here finished run folders
are written by hand and the tool is run with --skip-existing, so nothing is trained.
"""

import json
import os

import pytest
from repo_scripts import load_script


@pytest.fixture(scope="module")
def ablation():
    return load_script("tools/clustseg_ablation.py")


def _fake_run(folder, pq, secs_per_iter, secs_per_image):
    os.makedirs(folder)
    open(os.path.join(folder, "model_final.pth"), "wb").close()
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(
            {
                "panoptic_seg": {"PQ": pq, "PQ_th": pq - 1, "PQ_st": pq + 1},
                "sem_seg": {"mIoU": 2 * pq},
                "segm": {"AP": pq / 2},
            },
            f,
        )
    with open(os.path.join(folder, "training_metrics.json"), "w") as f:
        # the first row is inside the warm-up and must not count
        for it, t in [(9, 100.0), (19, secs_per_iter), (29, secs_per_iter)]:
            f.write(json.dumps({"iteration": it, "time": t}) + "\n")
    with open(os.path.join(folder, "log.txt"), "w") as f:
        for s, q in ((99.0, pq / 2), (secs_per_image, pq)):  # periodic evaluation, final one
            f.write(
                "[d2.evaluation.evaluator]: Total inference pure compute time: 0:00:15 "
                f"({s} s / iter per device, on 1 devices)\n"
            )
            f.write("[d2.evaluation.testing]: copypaste: Task: panoptic_seg\n")
            f.write("[d2.evaluation.testing]: copypaste: PQ,SQ,RQ,PQ_th\n")
            f.write(f"[d2.evaluation.testing]: copypaste: {q},70.0,20.0,1.0\n")
            f.write("[d2.evaluation.testing]: copypaste: AP,AP50\n")
            f.write("[d2.evaluation.testing]: copypaste: 3.0,4.0\n")


def test_identical_variants_share_one_run(ablation):
    names = {v: ablation.run_name(v) for v in ablation.VARIANTS}
    assert names["dreamy"] == names["recurrent"] == names["t3"]
    assert len(set(names.values())) == 5  # t1, t3/dreamy/recurrent, free, vanilla, kmeans
    assert names["vanilla"] != names["t1"]  # same T, different cross-attention


def test_reads_finished_runs_and_prints_ratios(ablation, tmp_path, capsys):
    out = tmp_path / "abl"
    speeds = {"t3": (2.0, 0.1), "vanilla": (1.0, 0.2), "kmeans": (0.5, 0.05)}
    for seed, pq_offset in ((0, 0.0), (1, 2.0)):
        for name, (spi, spim) in speeds.items():
            _fake_run(str(out / f"{name}_seed{seed}"), 10.0 + pq_offset, spi, spim)
    argv = ["--variants", "vanilla", "kmeans", "recurrent", "--seeds", "0", "1"]
    argv += ["--warmup", "10", "--output", str(out), "--skip-existing"]
    assert ablation.main(argv) == 0

    with open(out / "ablation.json") as f:
        res = json.load(f)["results"]
    rec = res["recurrent"]["0"]
    assert rec["PQ"] == 10.0 and rec["mIoU"] == 20.0 and rec["AP"] == 5.0
    assert rec["train_it_per_s"] == pytest.approx(0.5)  # warm-up row left out
    assert rec["infer_img_per_s"] == pytest.approx(10.0)  # last evaluation line
    assert res["recurrent"]["1"]["PQ"] == 12.0
    assert res["recurrent"]["1"]["PQ_at_each_evaluation"] == [6.0, 12.0]

    table = capsys.readouterr().out
    assert "recurrent = t3" in table
    vanilla_row = next(line for line in table.splitlines() if line.startswith("| vanilla"))
    # mean PQ 11 of seeds 10 and 12; training 2x and inference 0.5x the recurrent speed
    assert "11.00 (10.00, 12.00)" in vanilla_row
    assert vanilla_row.rstrip(" |").endswith("2.00 | 0.50")
