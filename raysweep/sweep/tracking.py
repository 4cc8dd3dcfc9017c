"""MLflow tracking of a sweep (`tracking: mlflow`, or `--mlflow`), through Ray Tune's own
`MLflowLoggerCallback`.

Every Tune trial becomes an MLflow run, named by its trial key, in an experiment named after
the sweep: its settings as parameters, each epoch's metrics (step: the epoch), and its final
test metrics; nothing of Ray's bookkeeping. At the
end the report is logged as the artifacts of a run named "report". The store is
RUN_DIR/mlflow.db (SQLite; MLflow 3 has no plain-file store), so

    mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db

is the sweep's dashboard. MLflow's names may not hold "@": val_ndcg@10 is val_ndcg_at_10 there.
MLflow is an optional extra: pip install -e ".[mlflow]".
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

from raysweep.core.errors import UserError
from raysweep.sweep.rundir import RunDir

REPORT_RUN = "report"
# MLflow 3 sends usage events to its makers' servers unless told not to: a tracked sweep stays on
# this machine, like an untracked one (the SQLite store is a local file).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@contextlib.contextmanager
def left_out():
    """MLflow stays unimported while an untracked stage runs. Ray Tune imports its MLflow
    callback module (which imports MLflow, which writes ~/.config/mlflow/telemetry.json) only to
    count the callbacks it was given by class name; that module takes a missing MLflow as it
    should. A None in sys.modules makes `import mlflow` fail there, and is removed afterwards."""
    if "mlflow" in sys.modules:  # imported already (a tracked sweep earlier in this process)
        yield
        return
    sys.modules["mlflow"] = None
    try:
        yield
    finally:
        if sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]


def check_installed(where: str) -> None:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise UserError(
            f'{where}: tracking with MLflow needs the mlflow extra: pip install -e ".[mlflow]"'
        ) from None


# What a trial reports each epoch and at its end (`trainable`); the rest of Tune's result is
# Ray's bookkeeping (pid, timestamp, done, ...) and the trial's settings, which are parameters.
EPOCH_METRICS = {"loss", "train_seconds", "val_seconds", "best_ndcg@10", "best_epoch"}


def is_trial_metric(name: str) -> bool:
    return name in EPOCH_METRICS or name.startswith(("val_", "test_"))


def metric_name(name: str) -> str:
    return name.replace("@", "_at_")


def experiment(run: RunDir, name: str) -> str:
    """The sweep's experiment (created with its artifacts under the run directory); its id."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=run.mlflow_store)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=run.mlflow_artifacts.as_uri())


def callback(run: RunDir, name: str) -> Any:
    """Tune's MLflow logger, with runs named by trial key and metric names MLflow accepts."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from raysweep.core.config import trial_key
    from raysweep.sweep.trainable import trial_config

    class Logger(MLflowLoggerCallback):
        def log_trial_start(self, trial):
            cfg = trial_config(trial.config)
            if trial not in self._trial_runs:
                tags = {
                    **self.tags,
                    "key": trial_key(cfg),
                    "label": cfg.label,
                    "dataset": cfg.dataset,
                    "stage": trial.config.get("stage", "seeds"),
                }
                self._trial_runs[trial] = self.mlflow_util.start_run(
                    tags=tags, run_name=trial_key(cfg)
                ).info.run_id
            settings = {k: v for k, v in cfg.to_dict().items() if k != "extra"}
            self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=settings)

        def log_trial_result(self, iteration, trial, result):
            metrics = {metric_name(k): v for k, v in result.items() if is_trial_metric(k)}
            step = int(result.get("epoch") or result["training_iteration"])  # a report per epoch
            self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=metrics, step=step)

    experiment(run, name)
    return Logger(tracking_uri=run.mlflow_store, experiment_name=name)


def log_report(run: RunDir, name: str) -> None:
    """The report's files as the artifacts of the experiment's "report" run."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=run.mlflow_store)
    logged = client.create_run(experiment(run, name), run_name=REPORT_RUN)
    client.log_artifacts(logged.info.run_id, str(run.report))
    client.set_terminated(logged.info.run_id)
