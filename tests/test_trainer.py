import torch

from raysweep import trainer
from raysweep.config import TrialConfig
from raysweep.data import load_interactions
from raysweep.models import build_model
from raysweep.split import leave_one_out, sequence_data


def _setup(**settings):
    cfg = TrialConfig.from_dict(dict(dataset="synthetic-chains", loss="ce", hidden=16, val_users=100, **settings))
    data = sequence_data(leave_one_out(load_interactions(cfg.dataset)), cfg.max_len)
    torch.manual_seed(0)
    model = build_model(cfg.model, data.num_items, cfg.hidden, cfg.blocks, cfg.heads, cfg.max_len, cfg.dropout)
    return cfg, data, model


def test_patience_stops_at_the_right_epoch_and_restores_the_best_weights(monkeypatch):
    # Scripted validation curve: best at epoch 3 (the tie at epoch 5 is not an improvement).
    curve = iter([0.10, 0.20, 0.30, 0.25, 0.30, 0.29, 0.28, 0.50])
    monkeypatch.setattr(trainer, "evaluate_split", lambda *a, **k: {"ndcg@10": next(curve)})
    cfg, data, model = _setup(patience=4, max_epochs=50)
    snapshots, reports = {}, []

    def on_epoch(report, state):
        reports.append(report)
        snapshots[report.epoch] = {k: v.clone() for k, v in state()["model"].items()}

    result = trainer.fit(model, cfg, data, torch.device("cpu"), on_epoch)
    assert (result.best_epoch, result.epochs) == (3, 7)  # 4 epochs without a strict improvement
    assert [r.done for r in reports] == [False] * 6 + [True]
    assert reports[-1].best_ndcg == 0.30
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshots[3][name]), name
    assert not all(torch.equal(v, snapshots[7][k]) for k, v in model.state_dict().items())


def test_resume_continues_exactly(monkeypatch):
    cfg, data, model = _setup(max_epochs=4, patience=10)
    straight = trainer.fit(model, cfg, data, torch.device("cpu"))

    saved = {}
    cfg2, data2, model2 = _setup(max_epochs=4, patience=10)

    def stop_after_two(report, state):
        if report.epoch == 2:
            saved.update(state())
            raise KeyboardInterrupt

    try:
        trainer.fit(model2, cfg2, data2, torch.device("cpu"), stop_after_two)
    except KeyboardInterrupt:
        pass
    cfg3, data3, model3 = _setup(max_epochs=4, patience=10)
    resumed = trainer.fit(model3, cfg3, data3, torch.device("cpu"), resume=saved)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    assert resumed.best_epoch == straight.best_epoch
