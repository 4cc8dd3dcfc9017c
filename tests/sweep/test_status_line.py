"""The driver's status line while epochs are long: each running trial's step within its epoch
and the time the epoch still needs, from what the trial writes as it trains."""

from types import SimpleNamespace

import pytest

pytest.importorskip("ray")

from raysweep.core.config import trial_key  # noqa: E402
from raysweep.sweep import trainable  # noqa: E402
from raysweep.sweep.rundir import RunDir  # noqa: E402
from raysweep.sweep.trial_log import TrialLog  # noqa: E402

CONFIG = {"trial": {"dataset": "synthetic-chains", "model": "sasrec", "loss": "ce", "seed": 0}}


def test_the_status_line_shows_each_running_trials_step_and_time_left(tmp_path, monkeypatch, capsys):
    run = RunDir(tmp_path / "run")
    key = trial_key(trainable.trial_config(CONFIG))
    clock = iter([100.0, 102.0, 140.0])  # epoch 2's first step, a step too soon to write, step 41
    monkeypatch.setattr(trainable.time, "monotonic", lambda: next(clock))
    step = trainable.StepProgress(run, key)
    step(2, 1, 101)
    step(2, 2, 101)
    step(2, 41, 101)
    assert run.read_progress(key) == {"epoch": 2, "step": 41, "steps": 101, "seconds": 40.0}

    monkeypatch.undo()
    log = TrialLog(run, "seeds", every=0.0)
    log.setup()
    running = SimpleNamespace(trial_id="t1", status="RUNNING", config=CONFIG, last_result=None)
    waiting = SimpleNamespace(trial_id="t2", status="PENDING", config=CONFIG, last_result=None)
    log.best["t1"] = (1, 0.1234)  # epoch 1 ended with this best
    log.on_step_begin(0, [running, waiting])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    # 40 steps in the 40 s after the first: 1 s a step, 60 to go
    assert line == (
        "[raysweep] seeds: 0 done, 0 failed, 1 running, 1 waiting | "
        "SASRec+ s0 epoch 2 step 41/101 (~1 min 00 s left in it) best 0.1234"
    )
    run.progress_file(key).write_text("{not json")  # half a file: the epoch's last word stands
    log.on_step_begin(0, [running, waiting])
    assert capsys.readouterr().out.strip().endswith("| SASRec+ s0 epoch 1 best 0.1234")
