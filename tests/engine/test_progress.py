"""The training progress line: iterations/s and a correct ETA from the first iterations on."""

import logging

import pytest
from detectron2.utils.events import CommonMetricPrinter, EventStorage, EventWriter

from seg_methods.engine.hooks import (
    EARLY_WRITE_ITERS,
    SegMetricPrinter,
    SegPeriodicWriter,
    TrainingProgress,
    format_seconds,
)


class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_rate_and_eta_exclude_the_first_iteration_and_follow_the_mean():
    clock = _Clock()
    p = TrainingProgress(max_iter=10, window=100, clock=clock)
    clock.t += 30.0  # iteration 0: slow (start-up, compilation)
    p.mark(0)
    assert p.iterations_per_second() is None and p.eta_seconds() is None
    clock.t += 2.0
    p.mark(1)
    assert p.iterations_per_second() == pytest.approx(0.5)
    assert p.eta_seconds() == pytest.approx(8 * 2.0)  # iterations 2..9 left
    # skewed step times: 1 s, 1 s, 4 s -> mean 2 s/it, the truth for the remaining time
    for i, dt in zip((2, 3, 4), (1.0, 1.0, 4.0)):
        clock.t += dt
        p.mark(i)
    assert p.iterations_per_second() == pytest.approx(4 / 8.0)
    assert p.eta_seconds() == pytest.approx(5 * 2.0)


def test_rate_window_and_restart():
    clock = _Clock()
    p = TrainingProgress(max_iter=1000, window=10, clock=clock)
    for i in range(30):  # 1 s/it, then 3 s/it
        clock.t += 1.0 if i < 20 else 3.0
        p.mark(i)
    assert p.iterations_per_second() == pytest.approx(1 / 3.0)  # only the last ~10 iterations
    p.mark(5)  # a resumed run starts over
    assert p.iterations_per_second() is None


def test_printer_shows_rate_and_eta_where_detectron2_shows_a_wrong_one(caplog):
    """Step times 1, 1, 1, 5 s (a shared machine): detectron2's median-based ETA says 1 s/it."""
    clock = _Clock()
    max_iter = 20
    ours = SegMetricPrinter(max_iter, progress=TrainingProgress(max_iter, clock=clock))
    theirs = CommonMetricPrinter(max_iter)
    caplog.set_level(logging.INFO)
    with EventStorage(0) as storage:
        times = [1.0, 1.0, 1.0, 5.0] * 2
        for i, dt in enumerate(times):
            storage.iter = i
            clock.t += dt
            ours.mark(i)
            storage.put_scalar("total_loss", 1.0 / (i + 1))
            storage.put_scalar("data_time", 0.01)
            if i >= 2:  # IterationTimer's warm-up
                storage.put_scalar("time", dt)
            storage.put_scalar("lr", 0.1)
            if i == 1:
                line = ours.format_line(storage)
                assert "iter: 1/20" in line and "it/s: 1" in line
                assert "eta: 0:00:18" in line  # 18 iterations at 1 s
        storage.iter = len(times) - 1
        line = ours.format_line(storage)
        # iterations 1..7 took 1+1+5+1+1+1+5 = 15 s: 7/15 it/s; 12 iterations left: 25.7 s
        assert "it/s: 0.467" in line and f"eta: {format_seconds(12 * 15 / 7)}" in line
        assert "total_loss" in line and "step: " in line and "data: 0.0100 s" in line
        assert storage.latest()["eta_seconds"][0] == pytest.approx(12 * 15 / 7)
        # detectron2's: median step time (1 s) x 12 = 12 s, half the truth
        assert theirs._get_eta(storage) == "0:00:12"


class _Trainer:
    def __init__(self, max_iter, start_iter=0):
        self.iter, self.max_iter, self.start_iter = start_iter, max_iter, start_iter


class _Writer(EventWriter):
    def __init__(self, progress: bool):
        self.writes = []
        self.marks = []
        if progress:
            self.mark = self.marks.append

    def write(self):
        self.writes.append(self.trainer.iter)


@pytest.mark.parametrize("start_iter", [0, 100])
def test_periodic_writer_writes_the_progress_line_early(start_iter):
    trainer = _Trainer(max_iter=start_iter + 60, start_iter=start_iter)
    printer, json_writer = _Writer(progress=True), _Writer(progress=False)
    printer.trainer = json_writer.trainer = trainer
    hook = SegPeriodicWriter([printer, json_writer], period=20)
    hook.trainer = trainer
    for i in range(start_iter, trainer.max_iter):
        trainer.iter = i
        hook.after_step()
    periodic = [i for i in range(start_iter, trainer.max_iter) if (i + 1) % 20 == 0]
    early = [start_iter + k for k in EARLY_WRITE_ITERS]
    assert printer.writes == sorted(set(early + periodic))
    assert json_writer.writes == periodic  # the logs keep detectron2's period
    assert printer.marks == list(range(start_iter, trainer.max_iter))


def test_trainer_prints_rate_and_eta_from_the_first_iterations(engine_cfg, caplog):
    from seg_methods.engine import SegEvalHook, Trainer

    engine_cfg.DATASETS.TEST = ()
    engine_cfg.SOLVER.MAX_ITER = 4
    trainer = Trainer(engine_cfg)
    writer = [h for h in trainer._hooks if isinstance(h, SegPeriodicWriter)]
    assert len(writer) == 1
    printers = [w for w in writer[0]._writers if isinstance(w, SegMetricPrinter)]
    assert len(printers) == 1
    # the evaluation hook reports its evaluations to the printer's rate/ETA estimator
    (eval_hook,) = [h for h in trainer._hooks if isinstance(h, SegEvalHook)]
    assert eval_hook._progress is printers[0].progress
    caplog.set_level(logging.INFO, logger="seg_methods.progress")
    trainer.train()
    lines = [r.getMessage() for r in caplog.records if r.name == "seg_methods.progress"]
    assert [line.split("  ")[0] for line in lines] == [f"iter: {i}/4" for i in range(4)]
    assert "eta: (measuring)" in lines[0]
    assert "it/s: " in lines[1] and "(measuring)" not in lines[1] and "eta: 0:00:" in lines[1]


def test_evaluations_are_taken_out_of_the_rate_and_added_to_the_eta():
    """1 s/it, with a 30 s evaluation after iteration 9 and 2 more to come: the rate stays
    1 it/s (not 10 it / 40 s) and the ETA is 10 remaining iterations + 2 x 30 s."""
    clock = _Clock()
    p = TrainingProgress(max_iter=20, window=100, clock=clock)
    for i in range(9):
        clock.t += 1.0
        p.mark(i)
    assert p.eta_seconds() == pytest.approx(11 * 1.0)  # no evaluation timed yet
    clock.t += 1.0 + 30.0  # iteration 9, then the evaluation hook, before the writer marks it
    p.add_pause(30.0, pauses_left=2)
    p.mark(9)
    assert p.iterations_per_second() == pytest.approx(1.0)
    assert p.eta_seconds() == pytest.approx(10 * 1.0 + 2 * 30.0)


@pytest.mark.parametrize(
    "max_iter,period,next_iter,left",
    [
        (2000, 100, 100, 19),  # 200 .. 1900 and the final one
        (2000, 100, 1900, 1),  # only the final one
        (2000, 0, 2001, 0),  # the final evaluation itself (after training)
        (2000, 100, 2001, 0),
        (1000, 300, 300, 3),  # 600, 900, final
    ],
)
def test_evaluations_left_follow_detectron2s_schedule(max_iter, period, next_iter, left):
    from types import SimpleNamespace

    from seg_methods.engine import SegEvalHook

    hook = SegEvalHook(period, lambda: {}, output_dir="unused")
    hook.trainer = SimpleNamespace(max_iter=max_iter)
    assert hook.evaluations_left(next_iter) == left
