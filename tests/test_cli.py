"""The `dimml` command line: --version, every command's --help, lazy dispatch, `dimml train --config`
(YAML / JSON / RUN/config.json, flags override, --print-config, one-line errors), `dimml serve`'s
command line, and the trainer's logging (dimml.train -> train.log) and TensorBoard scalars."""
from __future__ import annotations

import csv
import importlib.metadata
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dimml import cli as dimml_cli
from training.cli import main as training_main
from training.synth import SynthConfig, synthesize

from conftest import BIN, REPO

TINY = ["--preset", "tiny", "--epochs", "2", "--stage2-epochs", "1", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-corpus")
    synthesize(root, SynthConfig(classes=2, per_class=6, duration_s=1.0, val_frac=0.2, test_frac=0.2),
               workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory) -> tuple[Path, list[logging.LogRecord]]:
    """A tiny run trained through `dimml train ... --logger tensorboard`, with the log records it emitted."""
    out = tmp_path_factory.mktemp("cli-run") / "run"
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    logging.getLogger("dimml.train").addHandler(keep)
    try:
        rc = dimml_cli.main(["train", "--data", str(corpus), "--out", str(out), "--logger", "tensorboard", *TINY])
    finally:
        logging.getLogger("dimml.train").removeHandler(keep)
    assert rc == 0
    return out, records


def printed_config(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert dimml_cli.main(["train", *args, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def one_line_error(capsys, *args: str) -> str:
    capsys.readouterr()
    assert training_main(["fit", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


# ---------------------------------------------------------------------------------------
# the command line itself

def test_version():
    r = subprocess.run([str(BIN / "dimml"), "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"dimml {importlib.metadata.version('dimml')}"
    r = subprocess.run([sys.executable, "-m", "dimml", "--version"], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == f"dimml {importlib.metadata.version('dimml')}"


@pytest.mark.parametrize("command", list(dimml_cli.COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        dimml_cli.main([command, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: dimml {command} ")


def test_top_help_lists_every_command_and_imports_nothing_heavy():
    code = ("import sys\nfrom dimml.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('LOADED', sorted(m for m in ('torch', 'bentoml', 'onnxruntime', 'training', 'httpx', 'av') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    for command in dimml_cli.COMMANDS:
        assert f"    {command} " in r.stdout
    assert r.stdout.strip().endswith("LOADED []")


def test_unknown_command_is_a_usage_error():
    r = subprocess.run([str(BIN / "dimml"), "fitt"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "invalid choice: 'fitt'" in r.stderr


@pytest.mark.parametrize("module", ["training", "export", "clients"])
def test_python_dash_m_entry_points_still_work(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0 and r.stdout.startswith("usage: "), r.stderr


def test_serve_runs_bentoml_serve_with_the_bundle(tmp_path, monkeypatch):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    monkeypatch.chdir(tmp_path)
    cmd, env = dimml_cli.serve_command(dimml_cli.serve_parser().parse_args(
        ["bundle", "--port", "3123", "--backend", "onnxruntime-cpu"]), ["--api-workers", "2"])
    assert cmd[0].endswith("bentoml") and cmd[1:3] == ["serve", "serving.service:DIMML"]
    assert cmd[3:] == ["--port", "3123", "--api-workers", "2"]
    assert env["DIMML_BUNDLE"] == str(bundle) and env["DIMML_BACKEND"] == "onnxruntime-cpu"
    # a model-store tag passes through as it is; no bundle at all is an error
    _, env = dimml_cli.serve_command(dimml_cli.serve_parser().parse_args(["dimml-model:latest"]))
    assert env["DIMML_BUNDLE"] == "dimml-model:latest"
    monkeypatch.delenv("DIMML_BUNDLE", raising=False)
    with pytest.raises(ValueError, match="no bundle"):
        dimml_cli.serve_command(dimml_cli.serve_parser().parse_args([]))


# ---------------------------------------------------------------------------------------
# config files

def test_run_config_round_trips_to_the_same_resolved_config(run, capsys):
    out, _ = run
    saved = json.loads((out / "config.json").read_text())["train"]
    assert printed_config(capsys, "--config", str(out / "config.json")) == saved
    assert saved["logger"] == "tensorboard" and saved["epochs"] == 2
    # the printed config is itself a config file that resolves to the same thing
    again = out.parent / "printed.json"
    again.write_text(json.dumps(saved))
    assert printed_config(capsys, "--config", str(again)) == saved


def test_flags_override_the_file(run, capsys):
    out, _ = run
    saved = json.loads((out / "config.json").read_text())["train"]
    got = printed_config(capsys, "--config", str(out / "config.json"), "--lr", "0.5", "--out", "elsewhere",
                         "--set", "lambda_d=0.25", "--no-augment")
    assert got["lr"] == 0.5 and got["out"] == "elsewhere" and got["augment"] is False
    assert got["hparams"] == {**saved["hparams"], "lambda_d": 0.25}
    assert got["stage2_lr"] == saved["stage2_lr"]   # resolved in the run already: a fixed value now
    assert {k: v for k, v in got.items() if k not in ("lr", "out", "augment", "hparams")} == \
        {k: v for k, v in saved.items() if k not in ("lr", "out", "augment", "hparams")}


def test_yaml_config_with_nested_preprocess(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "data": "data", "out": "runs/a", "preset": "tiny", "modalities": "audio,visual", "epochs": 3, "lr": 1,
        "hparams": {"lambda_d": 0.5}, "preprocess": {"visual": {"num_frames": 3}}, "lw_temperature": None}))
    got = printed_config(capsys, "--config", str(tmp_path / "run.yaml"), "--epochs", "4")
    assert got["epochs"] == 4 and got["lr"] == 1.0 and isinstance(got["lr"], float)
    assert got["hparams"] == {"lambda_d": 0.5} and got["preprocess"] == {"visual.num_frames": 3}
    assert got["data"] == str(Path("data").resolve()) and got["lr_step_epoch"] == 2   # resolved: 70/150 of 4
    # the same as flags alone
    flags = printed_config(capsys, "--data", "data", "--out", "runs/a", "--preset", "tiny", "--epochs", "4",
                           "--lr", "1", "--set", "lambda_d=0.5", "--set", "preprocess.visual.num_frames=3")
    assert flags == got


@pytest.mark.parametrize("content, message", [
    ("data: d\nout: o\nlrr: 0.1\n", "unknown key 'lrr'"),
    ("data: d\nout: o\nstage2-epochs: 3\n", "unknown key 'stage2-epochs' (did you mean 'stage2_epochs'?)"),
    ("data: d\nout: o\nepochs: ten\n", "epochs must be int or null, got 'ten'"),
    ("data: d\nout: o\naugment: 1\n", "augment must be bool, got 1"),
    ("data: d\nout: o\nbatch_size: 2.5\n", "batch_size must be int or null, got 2.5"),
    ("data: d\nout: o\nfusion: xx\n", "fusion must be one of"),
    ("data: d\nout: o\nlogger: wandb\n", "logger must be one of"),
    ("data: d\nout: o\nhparams: 3\n", "hparams must be a mapping"),
    ("- a\n- b\n", "expected a mapping of TrainConfig fields, got list"),
    ("data: [unclosed\n", "not valid YAML"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, capsys, content, message):
    path = tmp_path / "run.yaml"
    path.write_text(content)
    assert message in one_line_error(capsys, "--config", str(path), "--print-config")


def test_bad_json_missing_file_and_missing_data(tmp_path, capsys):
    (tmp_path / "c.json").write_text("{nope")
    assert "not valid JSON" in one_line_error(capsys, "--config", str(tmp_path / "c.json"))
    assert "no such config file" in one_line_error(capsys, "--config", str(tmp_path / "none.yaml"))
    assert "--data is required" in one_line_error(capsys, "--out", "o", "--print-config")


def test_cache_command_builds_the_entry_train_opens(run, corpus, capsys):
    out, _ = run
    used = re.search(r"decode cache (\S+)", (out / "train.log").read_text()).group(1)

    def cache(*args: str) -> str:
        capsys.readouterr()
        assert dimml_cli.main(["cache", *args]) == 0
        return capsys.readouterr().out.split(" (")[0]

    # the same options as `dimml train` (--out and the training-only flags accepted, changing nothing)
    assert cache("--data", str(corpus), "--out", str(out), "--logger", "tensorboard", *TINY) == used
    assert cache("--config", str(out / "config.json"), "--no-progress") == used
    assert cache("--data", str(corpus), "--preset", "tiny", "--no-progress") == used
    # options that change the decoded arrays give another entry
    other = cache("--data", str(corpus), *TINY, "--set", "preprocess.visual.num_frames=3")
    assert other != used and Path(other).parent == Path(used).parent


# ---------------------------------------------------------------------------------------
# logging

def test_messages_go_through_logging_into_train_log(run):
    out, records = run
    text = (out / "train.log").read_text()
    assert records and all(r.name == "dimml.train" for r in records)
    for record in records:   # every message, in the file with its time stamp
        assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d " + re.escape(record.getMessage()), text, re.M)
    lines = text.splitlines()
    assert any("encoders epoch 2/2" in line for line in lines) and lines[-1].split(" ", 2)[2].startswith("finished")


def test_tensorboard_has_per_step_and_per_epoch_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    metrics = list(csv.DictReader(open(out / "metrics.csv")))
    assert {"lr", "step/loss_audio", "step/loss_visual", "epoch/val_acc_audio", "epoch/loss_fusion"} <= tags
    epochs = [e.step for e in events.Scalars("epoch/lr")]
    assert len(epochs) == len(metrics) == 3 and epochs == sorted(epochs)      # 2 encoder + 1 fusion epochs
    steps = [e.step for e in events.Scalars("step/loss_audio")]
    assert steps == list(range(len(steps))) and len(steps) >= 2                # one per training batch
    assert [round(e.value, 4) for e in events.Scalars("epoch/val_acc_audio")] == \
        [round(float(r["val_acc_audio"]), 4) for r in metrics if r["val_acc_audio"]]


@pytest.mark.slow
def test_csv_logger_writes_no_event_files(corpus, tmp_path):
    out = tmp_path / "run"
    assert training_main(["fit", "--data", str(corpus), "--out", str(out), *TINY, "--epochs", "1",
                          "--stage2-epochs", "0"]) == 0
    assert (out / "metrics.csv").is_file() and not (out / "tensorboard").exists()
