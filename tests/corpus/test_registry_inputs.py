"""Registry commands refuse bad names, versions and aliases before writing anything.

Each refused command is run in-process through the CLI as a person types it: one `error:` line, exit
code 2, no traceback, and every version's tags and aliases exactly as they were.
"""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from torchcycle import registry
from torchcycle.cli import app
from torchcycle.errors import DataError
from torchcycle.registry import check_alias, check_name, check_version
from torchcycle.tasks.gate import Decision, record_decision


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One store for the module: `inputs` with v1 (an earlier champion), v2 (champion) and v3 (challenger),
    and `fresh` whose only version is champion with nothing before it.

    The commands here read and write registry metadata only (tags, aliases, history), never a model's
    files, so versions are made from a run's artifact folder without training or logging a model."""
    from torchcycle.tracking import prepare_store, start_run_task

    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow' / 'mlflow.db'}"
    prepare_store(uri)
    client = MlflowClient(uri)
    for name, decisions in {
        "inputs": [
            Decision(True, "first version: no champion yet", "test_accuracy", 0.9, None),
            Decision(True, "better", "test_accuracy", 0.95, 0.9, "1"),
            Decision(False, "worse", "test_accuracy", 0.8, 0.95, "2"),
        ],
        "fresh": [Decision(True, "first version: no champion yet", "test_accuracy", 0.9, None)],
    }.items():
        client.create_registered_model(name)
        for decision in decisions:
            run_id = start_run_task.fn(uri, "inputs", name, {}, {})
            source = client.get_run(run_id).info.artifact_uri
            mv = client.create_model_version(name, source, run_id=run_id)
            record_decision(client, name, str(mv.version), decision, "setup")
    assert registry.champion_history(client.get_registered_model("inputs")) == ["1"]
    return uri


@pytest.fixture(autouse=True)
def _tracking_uri(registry_uri: str, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry_uri)


def snapshot(client: MlflowClient) -> dict:
    """Everything a registry command may write: model tags and aliases, every version's tags and aliases."""
    state = {}
    for rm in client.search_registered_models():
        versions = {
            str(mv.version): (mv.tags, sorted(mv.aliases), mv.last_updated_timestamp)
            for mv in client.search_model_versions(f"name='{rm.name}'")
        }
        state[rm.name] = (rm.tags, dict(rm.aliases), rm.last_updated_timestamp, versions)
    return state


TOO_BIG = str(2**63)
ROWS = [
    # promote NAME VERSION --alias ALIAS: the alias
    ("alias-latest", ["promote", "inputs", "1", "--alias", "latest"], "alias 'latest' is reserved"),
    ("alias-latest-any-case", ["promote", "inputs", "1", "--alias", "LaTeSt"], "alias 'LaTeSt' is reserved"),
    ("alias-version-like", ["promote", "inputs", "1", "--alias", "v3"], "@v<number> means that version"),
    ("alias-version-like-upper", ["promote", "inputs", "1", "--alias", "V12"], "alias 'V12' is reserved"),
    ("alias-space", ["promote", "inputs", "1", "--alias", "my alias"], "may only contain letters, digits"),
    ("alias-slash", ["promote", "inputs", "1", "--alias", "prod/eu"], "alias 'prod/eu' may only contain"),
    ("alias-dot", ["promote", "inputs", "1", "--alias", "prod.1"], "alias 'prod.1' may only contain"),
    ("alias-newline", ["promote", "inputs", "1", "--alias", "prod\n"], "may only contain letters, digits"),
    ("alias-empty", ["promote", "inputs", "1", "--alias", ""], "alias is empty"),
    ("alias-too-long", ["promote", "inputs", "1", "--alias", "a" * 256], "is 256 characters long; at most 255"),
    # the version
    ("version-zero", ["promote", "inputs", "0"], "version 0 does not exist: versions are numbered from 1"),
    ("version-negative", ["promote", "inputs", "--", "-1"], "version -1 does not exist"),
    ("version-word", ["promote", "inputs", "abc"], "version 'abc' is not a whole number"),
    ("version-v-prefix", ["promote", "inputs", "v2"], "version 'v2' is not a whole number"),
    ("version-decimal", ["promote", "inputs", "1.5"], "version '1.5' is not a whole number"),
    ("version-underscore", ["promote", "inputs", "1_0"], "version '1_0' is not a whole number"),
    ("version-2**64", ["promote", "inputs", str(2**64)], f"version {2**64} is too large"),
    ("version-2**63", ["promote", "inputs", TOO_BIG], f"version {TOO_BIG} is too large"),
    ("version-20-nines", ["promote", "inputs", "9" * 20], "is too large: versions go up to 9223372036854775807"),
    ("version-missing", ["promote", "inputs", "99"], "model 'inputs' has no version 99"),
    ("version-largest-missing", ["promote", "inputs", str(2**63 - 1)], f"has no version {2**63 - 1}"),
    ("version-bad-and-alias-bad", ["promote", "inputs", "abc", "--alias", "latest"], "alias 'latest' is reserved"),
    # the model
    ("model-missing", ["promote", "nope", "1"], "no registered model named 'nope'"),
    ("model-missing-bad-version", ["promote", "nope", "0"], "versions are numbered from 1"),
    ("model-slash", ["promote", "in/puts", "1"], "model name 'in/puts' cannot contain '/' or ':'"),
    ("rollback-no-previous", ["rollback", "fresh"], "model 'fresh' has no previous champion to roll back to"),
    ("rollback-missing", ["rollback", "nope"], "no registered model named 'nope'"),
    ("rollback-empty-name", ["rollback", ""], "model name is empty"),
    ("rollback-colon", ["rollback", "a:b"], "model name 'a:b' cannot contain '/' or ':'"),
    ("rollback-dotdot", ["rollback", ".."], "model name '..' is not allowed"),
    ("models-missing", ["models", "nope"], "no registered model named 'nope'"),
    ("models-blank-name", ["models", "  "], "model name is empty"),
]


@pytest.mark.parametrize(("args", "needle"), [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_refused_input_is_one_error_line_and_changes_nothing(registry_uri: str, args: list[str], needle: str) -> None:
    client = MlflowClient(registry_uri)
    before = snapshot(client)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (args, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # an uncaught exception would be kept here, not printed
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], (needle, result.output)
    assert snapshot(client) == before


def test_a_good_promotion_still_goes_through(registry_uri: str) -> None:
    """The checks refuse only what MLflow would: a version written as ' +03' and a new alias work."""
    client = MlflowClient(registry_uri)
    result = CliRunner().invoke(app, ["promote", "inputs", " +03", "--alias", "staging_eu-2"])
    assert result.exit_code == 0, result.output
    assert str(client.get_model_version_by_alias("inputs", "staging_eu-2").version) == "3"
    assert client.get_model_version("inputs", "3").tags["promoted_staging_eu-2_by"]
    client.delete_registered_model_alias("inputs", "staging_eu-2")


# ---- the checks as plain functions ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"), [("2", "2"), (" 2 ", "2"), ("+2", "2"), ("007", "7"), (str(2**63 - 1), str(2**63 - 1))]
)
def test_check_version_normalises(text: str, expected: str) -> None:
    assert check_version(text) == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "is not a whole number"),
        ("-0", "numbered from 1"),
        ("+-1", "is not a whole number"),
        ("1e3", "is not a whole number"),
        ("0x10", "is not a whole number"),
        ("\u0661", "is not a whole number"),  # ARABIC-INDIC DIGIT ONE: int() takes it; versions are ASCII digits
        ("1" * 5000, "is too large"),  # more digits than int() converts: still a clear error
    ],
)
def test_check_version_refuses(text: str, needle: str) -> None:
    with pytest.raises(DataError, match=needle):
        check_version(text)


ALIASES = [
    "champion",
    "challenger",
    "staging_eu-2",
    "chämpion",  # \w is Unicode, for MLflow too
    "v",
    "v1x",
    "vv1",
    "version1",
    "latest",
    "LATEST",
    "latest2",
    "v1",
    "V12",
    "v\u0661",  # MLflow's \d is Unicode: reserved too
    "",
    "a b",
    "a/b",
    "a.b",
    "@a",
    "a" * 255,
    "a" * 256,
]


@pytest.mark.parametrize("alias", ALIASES)
def test_check_alias_refuses_what_mlflow_refuses(alias: str) -> None:
    """The same verdict as MLflow's own validation of an alias to set (the source of these rules)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_alias_name, _validate_model_alias_name_reserved

    try:
        _validate_model_alias_name(alias)
        _validate_model_alias_name_reserved(alias)
        mlflow_accepts = True
    except MlflowException:
        mlflow_accepts = False
    try:
        check_alias(alias)
        we_accept = True
    except DataError:
        we_accept = False
    assert we_accept == mlflow_accepts


def test_check_alias_is_stricter_only_about_a_trailing_newline() -> None:
    from mlflow.utils.validation import _validate_model_alias_name

    _validate_model_alias_name("champion\n")  # `$` matches before a final newline: MLflow lets it through
    with pytest.raises(DataError, match="may only contain"):
        check_alias("champion\n")


@pytest.mark.parametrize(
    ("name", "needle"),
    [("", "is empty"), ("  ", "is empty"), ("a/b", "cannot contain"), ("a:b", "cannot contain"), (".", "not allowed")],
)
def test_check_name_refuses(name: str, needle: str) -> None:
    with pytest.raises(DataError, match=needle):
        check_name(name)


def test_check_name_takes_what_mlflow_takes() -> None:
    for name in ("digits-cnn", "wine.mlp_2", " spaced name "):
        assert check_name(name) == name
