"""The command line as a new user meets it: a first run on a machine that never ran Prefect, per-command
help, choices, --version, and no way to put a secret on the command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_curate_flow import workspace  # noqa: F401  (the module-scoped tiny workspace)

from finescope_core import __version__
from finescope_core.config import FinescopeConfig
from flows.cli import build_parser, main
from flows.options import SECTIONS, _leaf_fields, overrides

ROOT = Path(__file__).resolve().parents[2]


def _fresh_user_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a user who never ran Prefect: no API URL, an empty home, no Prefect settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    home = tmp_path / "home"
    home.mkdir()
    return {**env, "HOME": str(home), "PREFECT_HOME": str(home / ".prefect"), "OMP_NUM_THREADS": "1"}


def test_first_run_with_an_empty_prefect_home_succeeds(workspace, tmp_path):  # noqa: F811
    cfg = {
        "model": str(workspace / "model"),
        "seeds": [str(workspace / "seeds.jsonl")],
        "corpus": [str(workspace / "corpus.jsonl")],
        "store": str(tmp_path / "store"),
        "device": "cpu",
        "curate": {
            "method": "activation",
            "final_size": 10,
            "top_m": 10,
            "k_act": 16,
            "reference_size": 8,
            "max_length": 32,
        },
    }
    (tmp_path / "first.yaml").write_text(json.dumps(cfg))
    env = _fresh_user_env(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "curate",
            "--config",
            str(tmp_path / "first.yaml"),
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting temporary server" in proc.stderr  # the ephemeral API, as on a new machine
    assert (Path(env["PREFECT_HOME"]) / "prefect.db").is_file()  # created by this very run
    assert len((tmp_path / "out" / "curated.jsonl").read_text().splitlines()) == 10


def test_the_cli_waits_long_enough_for_a_first_prefect_start():
    """Creating and migrating Prefect's database on a slow machine outlasts Prefect's 20 s default."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    code = (
        "import flows.cli; from prefect.settings import get_current_settings as s; "
        "print(s().server.ephemeral.startup_timeout_seconds)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert int(out.stdout.strip()) >= 300, out.stderr


def _help(command: str) -> str:
    return build_parser()._subparsers._group_actions[0].choices[command].format_help()


def test_each_command_lists_only_the_fields_its_flow_reads():
    curate, prune, run, demo = (_help(c) for c in ("curate", "prune", "run", "demo"))
    assert "--curate.top_m" in curate and "--orchestration.task_runner" in curate
    for other in ("--prune.", "--teacher.", "--finetune.", "--evaluate."):
        assert other not in curate
    assert "--prune.ratio" in prune and "--teacher." not in prune and "--evaluate." not in prune
    assert all(
        f in run
        for f in ("--prune.ratio", "--teacher.max_new_tokens", "--finetune.rank", "--evaluate.baselines")
    )
    assert "--curate.method" not in demo and "--seeds" not in demo and "--corpus" not in demo
    assert "--curate.top_m" in demo
    assert len(curate.splitlines()) < len(run.splitlines())


def test_run_help_prints_every_field_docstring():
    """The help text is each config field's docstring, read from the source of the module that defines
    its section (`finescope_core/config/`): every field of `run` must still show all of it, whole."""
    squeezed = "".join(_help("run").split())
    fields = [(d, i) for d, i in _leaf_fields(FinescopeConfig) if d.split(".")[0] in SECTIONS["run"]]
    assert len(fields) > 100
    for dotted, info in fields:
        assert info.description, f"{dotted} has no docstring"
        assert f"--{dotted}" in squeezed
        assert "".join(info.description.split()) in squeezed, dotted
    for section in ("curate", "prune", "teacher", "finetune", "evaluate", "orchestration", "storage"):
        doc = (FinescopeConfig.model_fields[section].annotation.__doc__ or "").splitlines()[0].rstrip(".")
        assert "".join(f"{section}: {doc}".split()) in squeezed


def test_choices_are_shown_and_enforced(capsys):
    assert "--curate.method {sae,sentence,activation,random}" in _help("curate")
    assert "--device {auto,cpu,cuda}" in _help("run")
    with pytest.raises(SystemExit) as exit_:
        main(["curate", "--config", "x.yaml", "--curate.method", "saes"])
    assert exit_.value.code == 2
    assert "invalid choice: 'saes'" in capsys.readouterr().err


def test_a_number_or_a_named_value_takes_both(tmp_path):
    """`teacher.max_new_tokens` (N or auto), `finetune.lr` and `recover.pool` (a number or auto): argparse
    must pass a number on (it once offered only `auto`), and the config's validation judges it."""
    run = _help("run")
    assert "--teacher.max_new_tokens N|auto" in run and "--finetune.lr X|auto" in run
    parser = build_parser()
    for field, value, parsed in (
        ("teacher.max_new_tokens", "48", 48),
        ("teacher.max_new_tokens", "auto", "auto"),
        ("finetune.lr", "5e-5", 5e-5),
        ("recover.pool", "1000", 1000),
    ):
        args = parser.parse_args(["run", "--config", "x.yaml", f"--{field}", value])
        section, name = field.split(".")
        model = FinescopeConfig.model_fields[section].annotation
        assert getattr(model.model_validate({name: overrides(args)[field]}), name) == parsed
    with pytest.raises(Exception, match="max_new_tokens"):
        FinescopeConfig.model_fields["teacher"].annotation.model_validate({"max_new_tokens": "lots"})


def test_no_credentials_on_the_command_line(capsys):
    assert "--storage.secret " not in _help("run") and "--storage.key " not in _help("run")
    assert "--storage.secret_block" in _help("run")
    with pytest.raises(SystemExit):
        main(["curate", "--storage.secret", "hunter2"])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"finescope {__version__}"
