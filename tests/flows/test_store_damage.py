"""A damaged store is never trusted: each damaged artifact is recomputed with a warning, and the run
exports exactly what an undamaged run exports. A fully stored run reuses a read-only store.

One reference run fills a store; each case damages a copy of it (copies keep the files' mtimes, as a
backup restore would), runs the same config on the copy and compares the exported weights with the
reference's, file by file.
"""

import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileSystem
from tiny_run import config_file, write_workspace

from finescope_core.store import MARKER
from flows.cli import main

EXPORTED = ("pruned-model", "tuned-model")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("damage")
    write_workspace(root)
    store, out = root / "store", root / "out"
    assert main(["run", "--config", str(config_file(root, store, root / "cfg.yaml")), "--out", str(out)]) == 0
    return root, store, out


def stages(out: Path) -> dict[str, dict]:
    return json.loads((out / "run.json").read_text())["stages"]


def keys(got: dict[str, dict], recomputed: set[str]) -> dict[str, object]:
    """Each stage's key (the sparse codes: their parts' keys), except the evaluation of a recomputed
    tuned model and the report: their keys hash timings (`finetune.json`, the stage seconds)."""
    skip = {"report", "evaluate-tuned"} & ({"report"} | recomputed)
    return {name: s.get("key", s.get("parts")) for name, s in got.items() if name not in skip}


def artifact(store: Path, out: Path, stage: str) -> Path:
    """The files of the stage's current version (the marker names it; none: they lie beside it)."""
    s = stages(out)[stage]
    key_dir = store / s["stage"] / s["key"]
    return key_dir / (json.loads((key_dir / MARKER).read_text()).get("dir") or "")


def digests(out: Path) -> dict[str, str]:
    """sha256 of every exported weight and config file of the pruned and the tuned model."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for d in EXPORTED
        for p in sorted((out / d).rglob("*"))
        if p.suffix in (".safetensors", ".json")
    }


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:  # 100 kB, as in the issue, or half of a smaller tiny-model file
        f.truncate(min(100_000, path.stat().st_size // 2))


def pruned_weights(store: Path, out: Path) -> Path:
    return artifact(store, out, "pruned") / "model" / "model.safetensors"


def tuned_weights(store: Path, out: Path) -> Path:
    return artifact(store, out, "tuned") / "merged" / "model.safetensors"


def drop_artifact(store: Path, out: Path, stage: str) -> None:
    s = stages(out)[stage]
    shutil.rmtree(store / s["stage"] / s["key"])


# case -> (damage, the stages a run must recompute, the damaged stage and file its warning names). The tuned
# artifact records its training time (finetune.json), so a recomputed one hashes differently and its
# evaluation follows.
TUNED = {"tuned", "evaluate-tuned"}
CASES: dict[str, tuple[Callable[[Path, Path], None], set[str], str]] = {
    "pruned weights truncated": (
        lambda s, o: truncate(pruned_weights(s, o)),
        {"pruned"},
        "pruned/model/model.safetensors",
    ),
    "pruned weights deleted": (
        lambda s, o: pruned_weights(s, o).unlink(),
        {"pruned"},
        "pruned/model/model.safetensors",
    ),
    "tuned weights truncated": (
        lambda s, o: truncate(tuned_weights(s, o)),
        TUNED,
        "tuned/merged/model.safetensors",
    ),
    "tuned weights deleted": (
        lambda s, o: tuned_weights(s, o).unlink(),
        TUNED,
        "tuned/merged/model.safetensors",
    ),
    "curated.jsonl deleted": (
        lambda s, o: (artifact(s, o, "curated") / "curated.jsonl").unlink(),
        {"curated"},
        "curated/curated.jsonl",
    ),
    "pruned truncated, tuned missing": (
        lambda s, o: (truncate(pruned_weights(s, o)), drop_artifact(s, o, "tuned")),
        {"pruned", *TUNED},
        "pruned/model/model.safetensors",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_artifact_is_recomputed_with_a_warning_and_never_exported(
    reference, tmp_path, case, caplog
):
    root, ref_store, ref_out = reference
    damage, recomputed, named = CASES[case]
    first, named = named.split("/", 1)
    store, out = tmp_path / "store", tmp_path / "out"
    shutil.copytree(ref_store, store)
    damage(store, ref_out)

    caplog.set_level(logging.WARNING)
    assert (
        main(["run", "--config", str(config_file(root, store, tmp_path / "cfg.yaml")), "--out", str(out)])
        == 0
    )

    got = stages(out)
    # The report's key hashes the run's metrics, which hold each stage's seconds: it follows any recompute.
    assert {name for name, s in got.items() if not s["cached"]} - {"report"} == recomputed
    assert keys(got, recomputed) == keys(stages(ref_out), recomputed)
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert any(
        w.startswith(f"{first}: ") and got[first]["key"] in w and f"{named}: " in w and "recomputing" in w
        for w in warnings
    ), warnings
    assert digests(out) == digests(ref_out)  # the exported models are the undamaged run's, byte for byte
    # The damaged version is kept aside (a reader may hold it) until `store gc` collects it.
    assert main(["store", "verify", "--store", str(store)]) == 0


def test_store_verify_finds_damage_that_keeps_size_and_mtime(reference, tmp_path, capsys):
    _, ref_store, ref_out = reference
    store = tmp_path / "store"
    shutil.copytree(ref_store, store)
    assert main(["store", "verify", "--store", str(store)]) == 0
    weights = pruned_weights(store, ref_out)
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # bit rot: same size, and the mtime put back
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    capsys.readouterr()
    assert main(["store", "verify", "--store", str(store), "--quick"]) == 0  # what a reuse checks: a stat
    assert "0 damaged" in capsys.readouterr().out
    assert main(["store", "verify", "--store", str(store), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    key = stages(ref_out)["pruned"]["key"]
    assert [(d["stage"], d["key"]) for d in doc["damaged"]] == [("pruned", key)]
    assert doc["damaged"][0]["problems"] == [
        "model/model.safetensors: content does not match its recorded sha256"
    ]
    assert main(["store", "verify", "--store", str(store)]) == 1
    text = capsys.readouterr().out
    assert f"damaged pruned/{key}" in text and "1 damaged" in text


def test_a_fully_stored_run_reuses_a_read_only_store_without_writing(reference, tmp_path, monkeypatch):
    root, ref_store, _ = reference
    store = tmp_path / "store"
    shutil.copytree(ref_store, store)
    # Root ignores file modes, so the mount is simulated: every write the store's filesystem makes fails
    # as on a read-only mount, and the tree is compared before and after (no file, lock or probe added).
    real_pipe = LocalFileSystem.pipe_file

    def read_only(self, path, *args, **kwargs):
        if str(path).startswith(str(store)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_pipe(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "pipe_file", read_only)
    before = tree(store)
    # Default orchestration: Prefect's task results are persisted, outside the store.
    cfg = config_file(root, store, tmp_path / "cfg.yaml")
    assert main(["run", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 0
    assert all(s["cached"] for s in stages(tmp_path / "out").values())
    assert tree(store) == before


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its size and mtime in ns (directories included: a new entry shows)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
    }
