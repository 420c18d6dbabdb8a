"""The command's edges: a bad config file or workdir ends in one line and exit 2, never a traceback;
every run directory records its invocations in run.json; `eval` re-measures a run's checkpoint.

The config and workdir checks run in process (milliseconds); the subprocess tests at the end go
through the command.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT, run_cli, tiny_config

from jaxopt_lab import load_config, model_config
from jaxopt_lab.errors import UserError
from jaxopt_lab.run import rundir
from jaxopt_lab.run.rundir import PACKAGES, prepare_workdir, record_provenance

ROOT_USER = os.geteuid() == 0  # root writes through chmod; /sys refuses even root


def _one_line(result: subprocess.CompletedProcess) -> str:
    """The single stderr line of a bad-input exit (status 2, no traceback)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    assert re.match(r"jaxopt-lab( \w+)?: error: ", lines[0]), lines[0]
    return lines[0]


# --- config files: the user's own Python, whatever goes wrong in it -------------------------------

BAD_CONFIGS = {
    "syntax_error": ("def get_config(:\n", r"syntax error at line 1: invalid syntax"),
    "no_get_config": ("x = 1\n", r"defines no get_config\(\) function"),
    "get_config_raises": ("def get_config():\n    raise RuntimeError('boom')\n",
                          r"failed: RuntimeError: boom \(line 2\)"),
    "import_fails": ("import jaxopt_lab_no_such_module\ndef get_config():\n    pass\n",
                     r"failed: ModuleNotFoundError: .*jaxopt_lab_no_such_module.* \(line 1\)"),
    "reads_missing_file": ("def get_config():\n    open('/no/such/file.csv')\n",
                           r"failed: FileNotFoundError: .*/no/such/file\.csv.* \(line 2\)"),
    "returns_int": ("def get_config():\n    return 3\n", r"get_config\(\) returned int"),
    "returns_none": ("def get_config():\n    pass\n", r"get_config\(\) returned None"),
    "returns_dict": ("def get_config():\n    return {'train': {'steps': 3}}\n",
                     r"get_config\(\) returned dict, expected an ml_collections\.ConfigDict"),
    "unknown_model": (("from jaxopt_lab import model_config\n"
                       "def get_config():\n    return model_config('nope')\n"), r"'nope'"),
}


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_bad_config_file_is_one_line_naming_it(tmp_path, name):
    body, message = BAD_CONFIGS[name]
    path = tmp_path / "bad.py"
    path.write_text(body)
    with pytest.raises(UserError, match=f"^config {re.escape(str(path))}:? .*{message}") as error:
        load_config(str(path), ["--config.train.steps=3"])
    assert "\n" not in str(error.value)


def test_config_without_get_config_does_not_run_the_previous_files(tmp_path):
    """ml_collections reuses one module for every config file: a file lacking get_config() once
    silently ran the previously loaded file's."""
    load_config(str(ROOT / "configs/smoke.py"))
    path = tmp_path / "empty.py"
    path.write_text("x = 1\n")
    with pytest.raises(UserError, match="defines no get_config"):
        load_config(str(path))


@pytest.mark.parametrize("name, make, message", [
    ("cfg.py", Path.mkdir, "is a directory"),
    ("cfg.json", lambda p: p.write_text("{}"), "is not a .py file"),
    ("cfg.py", lambda p: None, "not found"),
])
def test_config_path_that_is_not_a_py_file(tmp_path, name, make, message):
    path = tmp_path / name
    make(path)
    with pytest.raises(UserError, match=f"^config file '{re.escape(str(path))}' {message}"):
        load_config(str(path))


@pytest.mark.parametrize("name", ["syntax_error", "no_get_config", "get_config_raises"])
def test_cli_bad_config_file_is_one_line_exit_2(tmp_path, name):
    path = tmp_path / "bad.py"
    path.write_text(BAD_CONFIGS[name][0])
    line = _one_line(run_cli("train", "--config", str(path), "--workdir", str(tmp_path / "run"),
                             timeout=120))
    assert str(path) in line
    assert not (tmp_path / "run").exists()


# --- workdirs ------------------------------------------------------------------------------------


def _unwritable(tmp_path: Path) -> Path:
    """An existing directory this process cannot write into."""
    if ROOT_USER:
        if not os.path.isdir("/sys"):
            pytest.skip("root, and no read-only /sys to stand for an unwritable directory")
        return Path("/sys")
    directory = tmp_path / "readonly"
    directory.mkdir()
    directory.chmod(0o555)
    return directory


def test_workdir_that_is_a_file(tmp_path):
    path = tmp_path / "afile"
    path.write_text("")
    with pytest.raises(UserError, match=f"^--workdir {re.escape(str(path))} is a file, not a "
                                        "directory$"):
        prepare_workdir(str(path), tiny_config(), is_chief=True)


def test_workdir_under_a_file_names_the_file(tmp_path):
    (tmp_path / "afile").write_text("")
    path = tmp_path / "afile" / "run"
    with pytest.raises(UserError, match=f"^--workdir {re.escape(str(path))} cannot be created: "
                                        f"{re.escape(str(tmp_path / 'afile'))} is a file$"):
        prepare_workdir(str(path), tiny_config(), is_chief=True)


def test_workdir_that_cannot_be_created(tmp_path):
    path = _unwritable(tmp_path) / "jaxopt_lab_run"
    with pytest.raises(UserError, match=f"^--workdir {re.escape(str(path))} cannot be created: "):
        prepare_workdir(str(path), tiny_config(), is_chief=True)


def test_workdir_that_is_not_writable(tmp_path):
    path = _unwritable(tmp_path)
    with pytest.raises(UserError, match=f"^--workdir {re.escape(str(path))} is not writable: "):
        prepare_workdir(str(path), tiny_config(), is_chief=True)


def test_empty_workdir(tmp_path):
    with pytest.raises(UserError, match="--workdir is empty"):
        prepare_workdir("", tiny_config(), is_chief=True)


def _saved_run(tmp_path: Path, config) -> Path:
    """A workdir as a run of `config` leaves it: config.json and a committed checkpoint."""
    workdir = tmp_path / "run"
    prepare_workdir(str(workdir), config, is_chief=True)
    (workdir / "checkpoints" / "20").mkdir(parents=True)
    return workdir


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c, "model", model_config("cnn1d")),
     "holds a run of model 'mlp' on 'mnist1d'; this config trains 'cnn1d' on 'mnist1d'"),
    (lambda c: setattr(c.data, "name", "mnist1d_shuffled"),
     "holds a run of model 'mlp' on 'mnist1d'; this config trains 'mlp' on 'mnist1d_shuffled'"),
    (lambda c: setattr(c.model, "hidden", (64,)),
     (r"holds a run of model 'mlp' \(hidden=\[100, 100\]\) on 'mnist1d'; "
      r"this config trains 'mlp' \(hidden=\[64\]\) on 'mnist1d'")),
])
def test_workdir_holding_another_models_run(tmp_path, change, message):
    workdir = _saved_run(tmp_path, tiny_config("mlp"))
    saved = (workdir / "config.json").read_text()
    config = tiny_config("mlp")
    change(config)
    with pytest.raises(UserError, match=f"^{re.escape(str(workdir))} {message}: "
                                        "use a new --workdir$"):
        prepare_workdir(str(workdir), config, is_chief=True)
    assert (workdir / "config.json").read_text() == saved  # the run's own config survives


def test_workdir_resumed_with_more_steps_is_fine_with_another_lr_refused(tmp_path):
    """train.steps (and the other keys documented as safe) may change on resume; optim.lr may
    not: the checkpoint's weights and injected learning rate were trained with the saved one."""
    workdir = _saved_run(tmp_path, tiny_config("mlp"))
    config = tiny_config("mlp", steps=40)
    config.optim.lr = 3e-3
    config.data.prefetch = 4
    saved = (workdir / "config.json").read_text()
    with pytest.raises(UserError, match=r"holds a run trained with other values \(optim.lr="
                                        r"0.01 there, 0.003 here\): .* use a new --workdir"):
        prepare_workdir(str(workdir), config, is_chief=True)
    assert (workdir / "config.json").read_text() == saved
    config.optim.lr = 1e-2
    prepare_workdir(str(workdir), config, is_chief=True)
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 40


def test_workdir_without_a_checkpoint_takes_any_model(tmp_path):
    """A run killed before its first checkpoint left nothing to resume."""
    workdir = tmp_path / "run"
    prepare_workdir(str(workdir), tiny_config("mlp"), is_chief=True)
    (workdir / "checkpoints" / "10.orbax-checkpoint-tmp-1").mkdir(parents=True)  # uncommitted
    prepare_workdir(str(workdir), tiny_config("cnn1d"), is_chief=True)
    assert json.loads((workdir / "config.json").read_text())["model"]["name"] == "cnn1d"


def test_workdir_with_checkpoints_and_a_broken_config_json(tmp_path):
    workdir = _saved_run(tmp_path, tiny_config("mlp"))
    (workdir / "config.json").write_text('{"model": ')
    with pytest.raises(UserError, match=f"config.json is unreadable .* but "
                                        f"{re.escape(str(workdir))} holds checkpoints: "
                                        "restore that file or use a new --workdir"):
        prepare_workdir(str(workdir), tiny_config("mlp"), is_chief=True)


def test_only_the_chief_writes(tmp_path):
    prepare_workdir(str(tmp_path / "run"), tiny_config(), is_chief=False)
    assert list((tmp_path / "run").iterdir()) == []


# --- provenance ----------------------------------------------------------------------------------


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_run_json_records_every_invocation(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    monkeypatch.setattr("sys.argv", ["jaxopt-lab", "train", "--workdir", str(workdir)])
    prepare_workdir(str(workdir), tiny_config(), is_chief=True)
    monkeypatch.setattr("sys.argv", ["jaxopt-lab", "train", "--config.train.steps=40"])
    prepare_workdir(str(workdir), tiny_config(steps=40), is_chief=True)

    first, second = json.loads((workdir / "run.json").read_text())["invocations"]
    assert first["argv"][-1] == str(workdir) and second["argv"][-1] == "--config.train.steps=40"
    assert set(first["versions"]) == set(PACKAGES)
    assert first["versions"]["jax"][0].isdigit() and first["versions"]["jaxopt-lab"] == "0.1.0"
    assert first["backend"] == "cpu" and first["device_count"] >= 1 and first["device_kinds"]
    assert first["process_count"] == 1 and first["cwd"] == os.getcwd()
    assert first["host"] and first["python"].startswith("3.")
    assert first["time_utc"].endswith("+00:00") and first["time_utc"] <= second["time_utc"]
    try:
        head = _git("rev-parse", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        head = None
    assert first["git_commit"] == head
    assert isinstance(first["git_dirty"], bool) if head else first["git_dirty"] is None


def test_provenance_without_git_or_outside_a_checkout(tmp_path, monkeypatch):
    """git missing, an installed copy, or a copy inside some other repository: None, no failure."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert record_provenance(str(tmp_path))["git_commit"] is None
    monkeypatch.undo()

    copy = tmp_path / "other_repo" / "site-packages"
    monkeypatch.setattr(rundir, "__file__", str(copy / "jaxopt_lab" / "core" / "rundir.py"))
    copy.mkdir(parents=True)
    record = record_provenance(str(tmp_path))
    assert (record["git_commit"], record["git_dirty"]) == (None, None)
    if shutil.which("git"):
        subprocess.run(["git", "init", "-q", str(tmp_path / "other_repo")], check=True)
        assert record_provenance(str(tmp_path))["git_commit"] is None
    assert len(json.loads((tmp_path / "run.json").read_text())["invocations"]) == 3


def test_unreadable_run_json_is_set_aside(tmp_path, capsys):
    (tmp_path / "run.json").write_text("[1, 2")
    record_provenance(str(tmp_path))
    assert "run.json is unreadable" in capsys.readouterr().err
    assert (tmp_path / "run.json.unreadable").read_text() == "[1, 2"
    assert len(json.loads((tmp_path / "run.json").read_text())["invocations"]) == 1


# --- through the command -----------------------------------------------------------------------

TINY = ["--config.train.progress=False", "--config.train.steps=20",
        "--config.train.checkpoint_every=10", "--config.train.eval_every=20",
        "--config.train.log_every=10", "--config.data.validation_fraction=0"]


def _train(workdir: Path, *args: str, config: str = "configs/smoke.py"):
    return run_cli("train", "--config", config, "--workdir", str(workdir), *TINY, *args,
                   timeout=300)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The smoke MLP for 20 steps, checkpoints at 10 and 20, no validation split. Tests copy it
    before changing it."""
    workdir = tmp_path_factory.mktemp("tiny") / "run"
    result = _train(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_cli_workdir_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("")
    line = _one_line(_train(tmp_path / "afile"))
    assert line.endswith(f"--workdir {tmp_path / 'afile'} is a file, not a directory")


def test_cli_workdir_under_a_file(tmp_path):
    (tmp_path / "afile").write_text("")
    line = _one_line(_train(tmp_path / "afile" / "run"))
    assert line.endswith(f"cannot be created: {tmp_path / 'afile'} is a file")


def test_cli_workdir_not_writable(tmp_path):
    assert "is not writable" in _one_line(_train(_unwritable(tmp_path)))


def test_cli_workdir_holding_another_models_run(tmp_path, tiny_run):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir)
    line = _one_line(_train(workdir, config="configs/mnist1d_cnn.py"))
    assert line == (f"jaxopt-lab: error: {workdir} holds a run of model 'mlp' on 'mnist1d'; "
                    "this config trains 'cnn1d' on 'mnist1d': use a new --workdir")
    assert (workdir / "config.json").read_text() == (tiny_run / "config.json").read_text()


def test_cli_resume_with_more_steps_appends_to_run_json(tmp_path, tiny_run):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir)
    result = _train(workdir, "--config.train.steps=30")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((workdir / "summary.json").read_text())["resumed_from"] == 20
    first, second = json.loads((workdir / "run.json").read_text())["invocations"]
    assert "--config.train.steps=30" in second["argv"] and "--config.train.steps=30" not in \
        first["argv"]


def test_eval_matches_the_summary_and_step_picks_an_older_checkpoint(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    newest = run_cli("eval", "--workdir", str(tiny_run), timeout=300)
    assert newest.returncode == 0, newest.stderr[-3000:]
    metrics = json.loads(newest.stdout.strip().splitlines()[-1])
    assert metrics["step"] == 20 and metrics["split"] == "test"
    for key in ("test_accuracy", "test_loss"):
        assert metrics[key] == pytest.approx(summary[key], rel=1e-5, abs=1e-6), key

    older = run_cli("eval", "--workdir", str(tiny_run), "--step", "10", timeout=300)
    assert older.returncode == 0, older.stderr[-3000:]
    older_metrics = json.loads(older.stdout.strip().splitlines()[-1])
    assert older_metrics["step"] == 10
    assert older_metrics["test_loss"] != pytest.approx(metrics["test_loss"], rel=1e-6)


def test_eval_bad_inputs(tmp_path, tiny_run):
    assert "is not a directory: no run there" in _one_line(
        run_cli("eval", "--workdir", str(tmp_path / "missing"), timeout=120))
    (tmp_path / "bare").mkdir()
    shutil.copy(tiny_run / "config.json", tmp_path / "bare")
    assert "holds no checkpoint" in _one_line(
        run_cli("eval", "--workdir", str(tmp_path / "bare"), timeout=120))
    assert not (tmp_path / "bare" / "checkpoints").exists()
    line = _one_line(run_cli("eval", "--workdir", str(tiny_run), "--step", "7", timeout=300))
    assert "no checkpoint at step 7" in line and "[10, 20]" in line
    line = _one_line(run_cli("eval", "--workdir", str(tiny_run), "--split", "validation",
                             timeout=300))
    assert line.endswith("the run has no 'validation' split; it has: test")
    assert "invalid choice" in _one_line(run_cli("eval", "--workdir", str(tiny_run), "--split",
                                                 "train", timeout=120))


def test_a_config_the_checkpoint_refuses_leaves_config_json_alone(tmp_path):
    """adam -> sgd keeps model and data, but the checkpoints were trained with adam: refused
    before anything is built, and config.json still describes the checkpoints."""
    from jaxopt_lab import train_and_evaluate
    from jaxopt_lab.errors import UserError

    config = tiny_config(steps=10, measure=False)
    train_and_evaluate(config, str(tmp_path))
    changed = tiny_config(steps=20, measure=False)
    changed.optim.name = "sgd"
    with pytest.raises(UserError, match=r"holds a run trained with other values "
                                        r"\(optim.name='adam' there, 'sgd' here\)"):
        train_and_evaluate(changed, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["name"] == "adam"
    assert len(json.loads((tmp_path / "run.json").read_text())["invocations"]) == 1
