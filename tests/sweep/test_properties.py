"""Property-based: any sweep file or data file either loads or gives the one-line error."""

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from raysweep.core import data
from raysweep.core.errors import UserError
from raysweep.sweep.spec import expand, load_spec

KEYS = [
    "name",
    "datasets",
    "models",
    "seeds",
    "settings",
    "overrides",
    "resources",
    "max_retries",
    "results",
    "model",
    "loss",
    "negatives",
    "search",
    "space",
    "samples",
    "choice",
    "max_epochs",
    "hidden",
    "gpus",
    "cpus",
    "synthetic-chains",
    "beauty",
    "sasrec",
    "bpr",
    "ce",
    "sampled_ce",
    "bogus",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5000),
    st.floats(allow_nan=True),
    st.sampled_from(KEYS),
    st.text(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)
    ),
    max_leaves=20,
)
model_entry = st.fixed_dictionaries(
    {"model": st.sampled_from(["sasrec", "gru4rec", "bert4rec", "bpr", "x"])},
    optional={
        "loss": st.sampled_from(["bce", "ce", "sampled_ce", "x", None]),
        "negatives": st.one_of(st.integers(-2, 400), st.lists(st.integers(-2, 400), max_size=3)),
        "settings": st.dictionaries(
            st.sampled_from(["max_epochs", "hidden", "heads", "bogus"]), scalars, max_size=2
        ),
    },
)
near_valid = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["s", "bad name!"]),
        "datasets": st.lists(st.sampled_from(["synthetic-chains", "nope"]), max_size=2),
        "models": st.lists(model_entry, max_size=3),
    },
    optional={
        "seeds": st.lists(st.integers(-3, 3), max_size=3),
        "settings": st.dictionaries(st.sampled_from(KEYS), scalars, max_size=3),
        "resources": st.dictionaries(st.sampled_from(["cpus", "gpus", "tpus"]), scalars, max_size=2),
    },
)


def _load(tmp_path, text: str) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    try:
        expand(load_spec(path), str(path))
    except UserError as exc:
        message = str(exc)
        assert message.startswith(str(path)) and "\n" not in message, message


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(values, near_valid))
def test_any_sweep_structure_loads_or_is_one_line(tmp_path, document):
    _load(tmp_path, yaml.safe_dump(document))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet="name: [],{}-\n\t'\"&*!%@0123456789abcdexyz", max_size=120))
def test_any_sweep_text_loads_or_is_one_line(tmp_path, text):
    _load(tmp_path, text)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.binary(max_size=200), st.text(alphabet="0123456789 \n\t-x.", max_size=200).map(str.encode))
)
def test_any_data_file_parses_or_is_one_line(blob):
    try:
        frame = data.parse_interactions(blob, "f.txt")
    except UserError as exc:
        assert str(exc).startswith("f.txt") and "\n" not in str(exc)
    else:
        assert len(frame) and (frame["user_id"] > 0).all() and (frame["item_id"] > 0).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=300))
def test_a_bad_mirror_file_never_leaves_a_cache(tmp_path_factory, blob):
    folder = tmp_path_factory.mktemp("m")
    (folder / "ml-1m").mkdir()
    (folder / "ml-1m" / "ml-1m.txt").write_bytes(blob)
    try:
        data.load_interactions("ml-1m", data_dir=folder / "cache", mirror=folder)
    except UserError as exc:
        assert ("checksum mismatch" in str(exc) or "corrupt gzip" in str(exc)) and "\n" not in str(exc)
    assert not (folder / "cache").exists() or not any(p.is_file() for p in (folder / "cache").rglob("*"))


SETTINGS = [
    "hidden",
    "blocks",
    "heads",
    "lr",
    "dropout",
    "max_len",
    "batch_size",
    "factors",
    "bpr_lr",
    "regularization",
    "iterations",
    "gbce_t",
    "bogus",
]
numbers = st.one_of(st.integers(-3, 300), st.floats(-2, 300), st.sampled_from([float("nan"), float("inf")]))
distribution = st.one_of(
    st.fixed_dictionaries(
        {"choice": st.lists(st.one_of(numbers, st.sampled_from(["x", True])), min_size=1, max_size=4)}
    ),
    st.fixed_dictionaries({"uniform": st.lists(numbers, min_size=2, max_size=2)}),
    st.fixed_dictionaries({"loguniform": st.lists(numbers, min_size=2, max_size=2)}),
    st.fixed_dictionaries({"randint": st.lists(st.integers(-3, 300), min_size=2, max_size=2)}),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from([("sasrec", "ce"), ("bpr", None), ("sasrec", "gbce")]),
    st.dictionaries(st.sampled_from(SETTINGS), distribution, min_size=1, max_size=3),
)
def test_any_search_space_loads_only_if_every_value_it_can_draw_is_valid(tmp_path, entry, space):
    """A search space either loads, and then every value it can produce (each choice, each end of
    a range) makes a valid trial, or is refused in one line before Ray starts."""
    from raysweep.core.config import TrialConfig
    from raysweep.sweep.spec import _candidates

    model, loss = entry
    document = {
        "name": "s",
        "datasets": ["synthetic-chains"],
        "models": [
            {
                "model": model,
                "loss": loss,
                "negatives": 5 if loss == "gbce" else None,
                "search": {"samples": 2, "space": space},
            }
        ],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        expand(load_spec(path), str(path))
    except UserError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc), str(exc)
        return
    base = {
        "dataset": "synthetic-chains",
        "model": model,
        "loss": loss,
        "negatives": 5 if loss == "gbce" else None,
    }
    for name, d in load_spec(path).models[0].search.space.items():
        for value in _candidates(name, d, "x"):
            TrialConfig.from_dict({**base, name: value})  # raises if a drawable value were invalid


@pytest.mark.long
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from(
        ["results.parquet", "plan.json", "spec.yaml", "history.parquet", "ranks.parquet", "result.json"]
    ),
    st.binary(max_size=300),
)
@example("spec.yaml", b"\x00")  # (YAML's reader error for a control character spans two lines)
def test_the_report_of_any_damaged_run_directory_works_or_is_one_line(tmp_path_factory, damaged, blob):
    """One file of a finished run directory replaced by arbitrary bytes: the report is written,
    or refused in one line naming a file (a bad ranks file only skips its comparisons)."""
    from raysweep.report.render import write_report
    from raysweep.sweep.rundir import RunDir

    run_dir = _finished_run(tmp_path_factory.mktemp("run"))
    target = {
        "results.parquet": run_dir / "results.parquet",
        "plan.json": run_dir / "plan.json",
        "spec.yaml": run_dir / "spec.yaml",
    }.get(damaged) or next(run_dir.glob(f"trials/*/{damaged}"))
    target.write_bytes(blob)
    if damaged == "result.json":  # records feed results.parquet: rebuilt from them, or refused
        try:
            RunDir(run_dir).write_results()
        except UserError as exc:
            assert "result.json" in str(exc) and "\n" not in str(exc)
            return
    try:
        write_report(RunDir(run_dir))
    except UserError as exc:
        assert damaged.split(".")[0] in str(exc) and "\n" not in str(exc), str(exc)


_FINISHED = {}


def _finished_run(folder):
    """A small finished run directory (made once, copied for each example)."""
    import shutil

    from raysweep.core.config import TrialConfig, trial_key
    from raysweep.core.trial import run_trial
    from raysweep.sweep.records import finished_record
    from raysweep.sweep.rundir import RunDir

    if "run" not in _FINISHED:
        source = folder.parent / "finished-source"
        for loss in ("ce", "bce"):
            cfg = TrialConfig.from_dict(
                dict(dataset="synthetic-chains", loss=loss, hidden=16, max_epochs=1, val_users=100)
            )
            result = run_trial(cfg)
            RunDir(source).write_record(finished_record(result.summary(), trial_key(cfg), "seeds"), result)
        RunDir(source).write_results()
        (source / "plan.json").write_text('{"stages": {"seeds": {"kind": "seeds", "trials": []}}}')
        (source / "spec.yaml").write_text(
            "name: s\ndatasets: [synthetic-chains]\n"
            "models: [{model: sasrec, loss: ce}, {model: sasrec, loss: bce}]\n"
            "compare: [[SASRec+, SASRec]]\n"
        )
        _FINISHED["run"] = source
    shutil.copytree(_FINISHED["run"], folder / "run")
    return folder / "run"
