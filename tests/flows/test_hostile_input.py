"""A catalogue of hostile inputs, each run through the `finescope` CLI end to end.

Every case must exit with status 2, print one `finescope: error:` message that names the bad input
(file, line or field) and says what to do, fail within seconds, and leave the store untouched.
"""

import contextlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from finescope_core.tiny import save_tiny
from flows.cli import main

HIDDEN, LAYERS = 48, 3


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    save_tiny(root / "model", "llama", hidden=HIDDEN, layers=LAYERS, heads=6, kv_heads=2, intermediate=96)
    rows = [{"id": f"r{i}", "text": f"Record {i}: what is {i} plus {i % 5}?"} for i in range(30)]
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "seeds.jsonl").write_text(json.dumps({"id": "s0", "text": "What is 2 plus 2?"}) + "\n")
    return root


def base_config(ws: Path, tmp: Path) -> dict:
    return {
        "model": str(ws / "model"),
        "seeds": [str(ws / "seeds.jsonl")],
        "corpus": [str(ws / "corpus.jsonl")],
        "store": str(tmp / "store"),
        "device": "cpu",
        "curate": {
            "final_size": 10,
            "top_m": 10,
            "k_act": 16,
            "reference_size": 8,
            "max_length": 32,
            "sae": {"d_sae": 32, "steps": 10, "batch_size": 16},
        },
        "prune": {"ratio": 0.2, "max_length": 32},
        "teacher": {"max_new_tokens": 4},
    }


def _write(path: Path, text: str | bytes) -> str:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def _corpus_with(tmp: Path, bad_line: str | bytes, name: str = "bad.jsonl") -> list[str]:
    """A corpus whose third line is `bad_line` (so the message must say line 3)."""
    good = b"".join(
        json.dumps({"id": f"g{i}", "text": f"good record {i}"}).encode() + b"\n" for i in range(2)
    )
    bad = bad_line if isinstance(bad_line, bytes) else bad_line.encode()
    return [_write(tmp / name, good + bad + b"\n")]


def _set(cfg: dict, dotted: str, value) -> dict:
    node = cfg
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return cfg


def _model_dir(tmp: Path, ws: Path, keep: tuple[str, ...]) -> str:
    d = tmp / "broken-model"
    d.mkdir()
    for name in keep:
        (d / name).write_bytes((ws / "model" / name).read_bytes())
    return str(d)


class _Trap:
    """Unpickling this creates a file: proof that a .bin checkpoint was (wrongly) unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _bin_only_model(tmp: Path, ws: Path) -> str:
    d = _model_dir(tmp, ws, ("config.json",))
    Path(d, "pytorch_model.bin").write_bytes(pickle.dumps({"weights": _Trap(str(tmp / "UNPICKLED"))}))
    return d


def _empty_parquet(tmp: Path) -> list[str]:
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp / "seeds.parquet")
    return [str(tmp / "seeds.parquet")]


def _directory(tmp: Path) -> list[str]:
    (tmp / "adir").mkdir()
    (tmp / "adir" / "part.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    return [str(tmp / "adir")]


def _mc_file(tmp: Path) -> str:
    good = json.dumps({"question": "2+2?", "choices": ["3", "4"], "answer": 1})
    return _write(
        tmp / "mc.jsonl",
        good + "\n" + good + "\n" + json.dumps({"question": "1+1?", "choices": ["2"], "answer": 5}) + "\n",
    )


def _corpus_copy(ws: Path, tmp: Path) -> str:
    """An eval file whose every item is a corpus record, re-cased and with other ids."""
    rows = [json.loads(line) for line in (ws / "corpus.jsonl").read_text().splitlines()[:3]]
    return _write(tmp / "eval.jsonl", "".join(json.dumps({"text": r["text"].upper()}) + "\n" for r in rows))


def _store_file(tmp: Path) -> str:
    return _write(tmp / "store", "I am a file, not a directory\n")


# (case id, sub-command, mutate(cfg, ws, tmp) -> cfg, regexes the message must contain)
CASES = [
    (
        "unknown-top-level-field",
        "curate",
        lambda c, w, t: _set(c, "seedz", ["x.jsonl"]),
        ["seedz", "unknown field", "check the spelling"],
    ),
    (
        "unknown-nested-field",
        "curate",
        lambda c, w, t: _set(c, "curate.sae.step", 5),
        ["curate.sae.step", "unknown field"],
    ),
    (
        "value-out-of-range",
        "curate",
        lambda c, w, t: _set(c, "curate.final_size", 0),
        ["curate.final_size", "greater than or equal to 1"],
    ),
    (
        "ratio-out-of-range",
        "curate",
        lambda c, w, t: _set(c, "prune.ratio", 1.5),
        ["prune.ratio", "less than 1"],
    ),
    (
        "wrong-type",
        "curate",
        lambda c, w, t: _set(c, "curate.top_m", "many"),
        ["curate.top_m", "valid integer"],
    ),
    (
        "unknown-method",
        "curate",
        lambda c, w, t: _set(c, "curate.method", "saes"),
        ["curate.method", "'sae', 'sentence', 'activation' or 'random'"],
    ),
    (
        "missing-seeds-file",
        "curate",
        lambda c, w, t: _set(c, "seeds", [str(t / "nope.jsonl")]),
        ["nope.jsonl", "no such file", "check the path"],
    ),
    (
        "missing-corpus-file",
        "curate",
        lambda c, w, t: _set(c, "corpus", [str(t / "gone.jsonl")]),
        ["gone.jsonl", "no such file", "check the path"],
    ),
    (
        "glob-matches-nothing",
        "curate",
        lambda c, w, t: _set(c, "corpus", [str(t / "*.parquet")]),
        [r"\*\.parquet", "matches no file", "check the pattern"],
    ),
    (
        "directory-instead-of-file",
        "curate",
        lambda c, w, t: _set(c, "corpus", _directory(t)),
        ["adir", "is a directory", "name the files inside it"],
    ),
    (
        "unreadable-file",
        "curate",
        lambda c, w, t: _set(c, "corpus", [_unreadable(t)]),
        ["unreadable.jsonl", "cannot be read", "check"],
    ),
    (
        "unsupported-file-type",
        "curate",
        lambda c, w, t: _set(c, "corpus", [_write(t / "c.csv", "text\nhello\n")]),
        ["c.csv", "unsupported file type .csv", "use .jsonl"],
    ),
    (
        "malformed-jsonl-line",
        "curate",
        lambda c, w, t: _set(c, "corpus", _corpus_with(t, '{"text": "unterminated')),
        ["bad.jsonl:3", "malformed JSON", "fix or remove the line"],
    ),
    (
        "non-utf8-bytes",
        "curate",
        lambda c, w, t: _set(c, "corpus", _corpus_with(t, b'{"text": "caf\xe9"}')),
        ["bad.jsonl:3", "not valid UTF-8", "re-encode"],
    ),
    (
        "enormous-line",
        "curate",
        lambda c, w, t: _set(c, "corpus", _corpus_with(t, json.dumps({"text": "a" * 1_100_000}))),
        ["bad.jsonl:3", "1,100,000 characters", "split it into records"],
    ),
    (
        "no-text-field",
        "curate",
        lambda c, w, t: _set(c, "corpus", _corpus_with(t, json.dumps({"id": "x", "body": "hi"}))),
        ["bad.jsonl:3", "no 'text' and no 'instruction'", "fields found: body, id"],
    ),
    (
        "empty-text",
        "curate",
        lambda c, w, t: _set(c, "seeds", _corpus_with(t, json.dumps({"text": "  "}), "s.jsonl")),
        ["s.jsonl:3", "text is empty", "remove the record or fill it in"],
    ),
    (
        "text-not-a-string",
        "curate",
        lambda c, w, t: _set(c, "corpus", _corpus_with(t, json.dumps({"text": 42}))),
        ["bad.jsonl:3", "'text' must be a string"],
    ),
    (
        "duplicate-ids",
        "curate",
        lambda c, w, t: _set(c, "corpus", _corpus_with(t, json.dumps({"id": "g0", "text": "again"}))),
        ["bad.jsonl:3", "duplicate id 'g0'", r"first at .*bad.jsonl:1", "must be unique"],
    ),
    (
        "empty-file",
        "curate",
        lambda c, w, t: _set(c, "corpus", [_write(t / "empty.jsonl", "\n  \n")]),
        ["empty.jsonl", "the file is empty", "fill it or remove it"],
    ),
    (
        "seeds-zero-records",
        "curate",
        lambda c, w, t: _set(c, "seeds", _empty_parquet(t)),
        ["seeds.parquet", "contains no records", "remove it from `seeds:`"],
    ),
    (
        "corpus-smaller-than-final-size",
        "curate",
        lambda c, w, t: _set(c, "curate.final_size", 500),
        [
            "30 usable records",
            "curate.final_size asks for 500",
            "lower curate.final_size or add corpus records",
        ],
    ),
    (
        "model-dir-missing",
        "curate",
        lambda c, w, t: _set(c, "model", str(t / "no-model")),
        ["no-model", "no such directory"],
    ),
    (
        "model-without-config-json",
        "curate",
        lambda c, w, t: _set(c, "model", _model_dir(t, w, ("model.safetensors",))),
        ["broken-model", "config.json is missing", "save_pretrained"],
    ),
    (
        "model-with-only-pytorch-bin",
        "curate",
        lambda c, w, t: _set(c, "model", _bin_only_model(t, w)),
        ["broken-model", "no \\*.safetensors weights", "never unpickles", "safe_serialization=True"],
    ),
    (
        "layers-out-of-range",
        "curate",
        lambda c, w, t: _set(c, "curate.layers", [0, 7]),
        ["curate.layers contains 7", f"model has {LAYERS} layers", "valid: 0..2"],
    ),
    (
        "k-act-above-hidden-size",
        "curate",
        lambda c, w, t: _set(c, "curate.k_act", 1000),
        ["curate.k_act=1000", f"hidden size {HIDDEN}", f"use at most {HIDDEN}"],
    ),
    ("prune-ratio-unreachable", "run", lambda c, w, t: _set(c, "prune.ratio", 0.95), ["prune.ratio", "0.95"]),
    (
        "mc-file-bad-line",
        "run",
        lambda c, w, t: _set(c, "evaluate.mc_file", _mc_file(t)),
        ["mc.jsonl:3", "'choices' must be a list of at least 2 strings"],
    ),
    (
        "eval-file-empty",
        "run",
        lambda c, w, t: _set(c, "evaluate.eval_file", _write(t / "eval.jsonl", "\n")),
        ["eval.jsonl", "the file is empty"],
    ),
    (
        "eval-file-no-usable-field",
        "run",
        lambda c, w, t: _set(
            c, "evaluate.eval_file", _corpus_with(t, json.dumps({"id": "e", "body": "hi"}), "eval.jsonl")[0]
        ),
        ["eval.jsonl:3", "no 'text' and no 'instruction'", "fields found: body, id"],
    ),
    (
        "eval-file-all-in-corpus",
        "run",
        lambda c, w, t: _set(c, "evaluate.eval_file", _corpus_copy(w, t)),
        [
            "eval.jsonl:1",
            "every item of evaluate.eval_file",
            "overlaps the corpus",
            "give items the corpus does not contain",
        ],
    ),
    (
        "store-is-a-file",
        "curate",
        lambda c, w, t: _set(c, "store", _store_file(t)),
        ["store", "not writable", "check the path"],
    ),
    (
        "prune-ratio-zero",
        "prune",
        lambda c, w, t: _set(c, "prune.ratio", 0),
        ["prune.ratio", "0 prunes nothing", r"\(0, 1\)"],
    ),
    (
        "corpus-symlink-loop",
        "curate",
        lambda c, w, t: _set(c, "corpus", [_symlink_loop(t, "loop.jsonl")]),
        ["loop.jsonl", "symlink loop", "point the link at a real file"],
    ),
    (
        "model-symlink-loop",
        "curate",
        lambda c, w, t: _set(c, "model", _symlink_loop(t, "loop-model")),
        ["loop-model", "symlink loop"],
    ),
    (
        "corpus-uri-with-credentials",
        "curate",
        lambda c, w, t: _set(c, "corpus", ["s3://AKIAKEY:SECRETVALUE@bucket/c.jsonl"]),
        [r"corpus\[0\]", r"s3://\*\*\*@bucket/c.jsonl", "storage.secret_block", "AWS_ACCESS_KEY_ID"],
    ),
    (
        "store-uri-with-credentials",
        "curate",
        lambda c, w, t: _set(c, "store", "s3://AKIAKEY:SECRETVALUE@bucket/store"),
        ["store", "credentials are never read from a URI", "storage.secret_block"],
    ),
    (
        "endpoint-with-credentials",
        "curate",
        lambda c, w, t: _set(c, "storage.endpoint_url", "http://user:SECRETVALUE@minio:9000"),
        ["storage.endpoint_url", r"http://\*\*\*@minio:9000", "AWS_SECRET_ACCESS_KEY"],
    ),
    (
        "eval-file-uri-with-credentials",
        "run",
        lambda c, w, t: _set(c, "evaluate.mc_file", "https://u:SECRETVALUE@host/mc.jsonl"),
        ["evaluate.mc_file", "credentials are never read from a URI"],
    ),
]


def _symlink_loop(tmp: Path, name: str) -> str:
    """`name` -> `name.b` -> `name`: neither resolves."""
    a, b = tmp / name, tmp / f"{name}.b"
    a.symlink_to(b)
    b.symlink_to(a)
    return str(a)


def _unreadable(tmp: Path) -> str:
    path = tmp / "unreadable.jsonl"
    path.write_text(json.dumps({"text": "secret"}) + "\n")
    path.chmod(0)
    return str(path)


def _run(argv: list[str]) -> tuple[int, str]:
    """Exit code and stderr of `finescope <argv>` run in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse errors
            code = int(e.code)
    return code, err.getvalue()


def _store_untouched(store: Path, before: bytes | None) -> None:
    if before is not None:  # the store path was a pre-existing file
        assert store.read_bytes() == before
    else:
        assert not store.exists(), sorted(store.rglob("*"))  # not even an empty directory or a probe


@pytest.mark.parametrize(("command", "mutate", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_is_refused_before_any_work(ws, tmp_path, command, mutate, expected, request):
    if request.node.callspec.id == "unreadable-file" and os.geteuid() == 0:
        pytest.skip("root reads a chmod 000 file; the directory case covers an unusable path")
    cfg = mutate(base_config(ws, tmp_path), ws, tmp_path)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    store = Path(cfg["store"])
    before = store.read_bytes() if store.is_file() else None
    start = time.perf_counter()
    code, err = _run([command, "--config", str(cfg_file), "--out", str(tmp_path / "out")])
    elapsed = time.perf_counter() - start

    assert code == 2
    message = err[err.index("finescope: error:") :]
    print(f"\n[{request.node.callspec.id}] {message.strip()}")  # the catalogue, with -s
    for pattern in expected:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    assert elapsed < 20, f"took {elapsed:.1f}s: the input was not refused up front"
    assert "SECRETVALUE" not in err, "a credential reached the error message"
    _store_untouched(store, before)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "UNPICKLED").exists()


def test_typo_in_a_command_line_option_is_refused(ws, tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(base_config(ws, tmp_path)))
    code, err = _run(
        ["curate", "--config", str(cfg_file), "--out", str(tmp_path / "out"), "--curate.topm", "5"]
    )
    assert code == 2
    assert "unrecognized arguments: --curate.topm" in err
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [("curate: [unclosed", "is not valid YAML"), ("- just\n- a list\n", "must hold a mapping of fields")],
    ids=["malformed-yaml", "yaml-not-a-mapping"],
)
def test_broken_config_file_is_refused(tmp_path, content, expected):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(content)
    code, err = _run(["curate", "--config", str(cfg_file), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "finescope: error:" in err and str(cfg_file) in err and expected in err


def test_secrets_never_reach_logs_or_artifacts(ws, tmp_path):
    """A successful run with storage credentials from a Secret block: they appear in no output,
    run.json or stored file."""
    from prefect.blocks.system import Secret
    from prefect.settings import get_current_settings

    key, secret = "AKIAHOSTILETESTKEY42", "s3cr3t-Value-That-Must-Not-Leak"
    Secret(value={"key": key, "secret": secret}).save("hostile-test-credentials", overwrite=True)
    cfg = base_config(ws, tmp_path)
    cfg["storage"] = {"secret_block": "hostile-test-credentials"}
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    # A child process, so that everything Prefect and the CLI print is captured as a user would see it.
    env = {
        **os.environ,
        "PREFECT_API_URL": str(get_current_settings().api.url),
        "OMP_NUM_THREADS": "1",
        "PREFECT_LOGGING_LEVEL": "DEBUG",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "curate", "--config", str(cfg_file), "--out", str(out)],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert b"curate: done" in proc.stderr or b"curated 10 records" in proc.stdout
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["storage"]["secret_block"] == "hostile-test-credentials"
    files = [p for p in [*out.rglob("*"), *(tmp_path / "store").rglob("*")] if p.is_file()]
    assert any(p.name == "curated.jsonl" for p in files) and any(p.name == "_COMPLETE.json" for p in files)
    for where, data in [
        ("stdout", proc.stdout),
        ("stderr", proc.stderr),
        *((str(p), p.read_bytes()) for p in files),
    ]:
        for s in (key, secret):
            assert s.encode() not in data, f"{s!r} leaked into {where}"


def _alias_bomb(levels: int) -> str:
    """A 'billion laughs' config: each level lists the previous one 9 times; `corpus` names the last."""
    lines = ['a0: &a0 ["lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join([*lines, "seeds: [s.jsonl]", f"corpus: *a{levels}", ""])


def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """9 levels would expand to 387M strings (about 45 GB) if the path fields were walked."""
    cfg_file = tmp_path / "bomb.yaml"
    cfg_file.write_text(_alias_bomb(9))
    start = time.perf_counter()
    code, err = _run(["curate", "--config", str(cfg_file), "--out", str(tmp_path / "out")])
    assert time.perf_counter() - start < 5
    assert code == 2
    assert str(cfg_file) in err and "line 2" in err and "YAML alias *a0 is not accepted" in err, err


def test_yaml_alias_in_a_command_line_value_is_refused(ws, tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(base_config(ws, tmp_path)))
    code, err = _run(["curate", "--config", str(cfg_file), "--curate.layers", "[&a 1, *a]"])
    assert code == 2
    assert "--curate.layers" in err and "YAML alias *a is not accepted" in err, err


def test_store_command_refuses_credentials_in_store_uri(tmp_path):
    code, err = _run(["store", "ls", "--store", "s3://AKIAKEY:SECRETVALUE@bucket/prefix"])
    assert code == 2
    assert "s3://***@bucket/prefix" in err and "storage.secret_block" in err
    assert "SECRETVALUE" not in err


def test_flow_parameters_with_credentials_are_refused_without_echo(ws, tmp_path):
    """What a deployment run or a Python caller passes skips load_config: the model refuses it, and the
    validation error (which Prefect stores with a failed run) does not repeat the value."""
    from pydantic import ValidationError

    from finescope_core.config import FinescopeConfig

    cfg = _set(base_config(ws, tmp_path), "output", "s3://AKIAKEY:SECRETVALUE@bucket/out")
    with pytest.raises(ValidationError) as info:
        FinescopeConfig.model_validate(cfg)
    assert "credentials are never read from a URI" in str(info.value)
    assert "SECRETVALUE" not in str(info.value)


def test_missing_model_is_refused_before_the_flow_starts(ws, tmp_path, monkeypatch):
    """The flow (and with it Prefect's temporary API, 20-50 s to start) is never entered."""
    import flows.curate
    import flows.prune
    import flows.specialize

    def started(*args, **kwargs):
        raise AssertionError("the flow started before the model was checked")

    for module, name in (
        (flows.curate, "curate_flow"),
        (flows.prune, "prune_flow"),
        (flows.specialize, "specialize_flow"),
    ):
        monkeypatch.setattr(module, name, started)
    cfg = _set(base_config(ws, tmp_path), "model", str(tmp_path / "no-model"))
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    for command in ("curate", "prune", "run"):
        code, err = _run([command, "--config", str(cfg_file), "--out", str(tmp_path / "out")])
        assert code == 2 and "no-model" in err and "no such directory" in err, (command, err)


def _server_child(pid: int, timeout: float):
    """The temporary Prefect server started by process `pid`, once it runs."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(pid).children():
            with contextlib.suppress(psutil.Error):
                if "prefect.server.api.server:create_app" in " ".join(child.cmdline()):
                    return child
        time.sleep(0.5)
    raise AssertionError("no temporary Prefect server started")


def test_temporary_prefect_server_ends_when_the_cli_is_killed(ws, tmp_path):
    """SIGKILL skips Prefect's atexit hook; the server notices that its parent is gone and stops."""
    import psutil

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(base_config(ws, tmp_path)))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "curate",
            "--config",
            str(cfg_file),
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=Path(__file__).resolve().parents[2],
        env={**env, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        server = _server_child(proc.pid, timeout=240)
    finally:
        proc.kill()
        proc.wait()
    try:
        server.wait(timeout=20)
    except psutil.TimeoutExpired:
        server.kill()
        raise AssertionError("the temporary Prefect server outlived the killed CLI") from None
