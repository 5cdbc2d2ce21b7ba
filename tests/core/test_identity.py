"""Content identities behind the cache keys: nothing is keyed by a path alone, nothing stale is trusted."""

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

import finescope_core.identity as identity
from finescope_core import code_identity
from finescope_core.code_identity import code_digest, module_closure
from finescope_core.identity import (
    HubRevisionError,
    cached_revision,
    directory_digest,
    file_digest,
    hub_revision,
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_changed_in_place_gets_a_new_digest_in_the_same_process(tmp_path):
    f = tmp_path / "a.json"
    f.write_text('{"a": 1}')
    assert file_digest(f) == _sha(f)
    f.write_text('{"a": 22}')  # same path: a path-keyed cache would return the old digest
    assert file_digest(f) == _sha(f)


def test_every_file_of_a_model_directory_is_in_its_digest_but_hidden_bookkeeping_is_not(tmp_path):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    for name in ("config.json", "chat_template.jinja", "tokenizer.model", "merges.txt", "sub/extra.txt"):
        (model / name).write_text(name)
    before = directory_digest(model)
    for name in ("chat_template.jinja", "tokenizer.model", "merges.txt", "sub/extra.txt"):
        (model / name).write_text(name + " edited")
        after = directory_digest(model)
        assert after != before, name
        before = after
    (model / ".cache").mkdir()
    (model / ".cache" / "download.lock").write_text("x")
    assert directory_digest(model) == before
    (model / "merges.txt").rename(model / "merges2.txt")  # a renamed file is another model
    assert directory_digest(model) != before


@pytest.fixture
def large_files(tmp_path, monkeypatch):
    """Every file counts as large, the on-disk cache is the test's own, and full reads are counted."""
    monkeypatch.setenv(identity.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(identity, "LARGE_FILE", 0)
    reads = []
    real = identity._sha256
    monkeypatch.setattr(identity, "_sha256", lambda p: reads.append(p) or real(p))
    return reads


def _weights(path: Path, value: float, name: str = "w") -> None:
    import torch

    save_file({name: torch.full((64,), value)}, str(path))


def _new_process(monkeypatch) -> None:
    monkeypatch.setattr(identity, "_DIGESTS", {})


def test_large_weights_are_read_once_across_runs_while_size_mtime_and_header_match(
    tmp_path, large_files, monkeypatch
):
    w = tmp_path / "model.safetensors"
    _weights(w, 1.0)
    first = file_digest(w)
    assert first == _sha(w) and len(large_files) == 1
    _new_process(monkeypatch)  # a later run: served by the on-disk entry, no full read
    assert file_digest(w) == first and len(large_files) == 1

    _weights(w, 2.0)  # same size and header, new values, new mtime: read again
    _new_process(monkeypatch)
    assert file_digest(w) == _sha(w) != first and len(large_files) == 2


def test_a_header_change_under_a_restored_mtime_is_not_served_from_the_cache(
    tmp_path, large_files, monkeypatch
):
    w = tmp_path / "model.safetensors"
    _weights(w, 1.0, name="a")
    first = file_digest(w)
    st = w.stat()
    _weights(w, 1.0, name="b")  # the same size, another tensor name (header), mtime put back as `cp -p` would
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert w.stat().st_size == st.st_size
    _new_process(monkeypatch)
    assert file_digest(w) == _sha(w) != first


def test_an_unwritable_digest_cache_only_costs_reads(tmp_path, large_files, monkeypatch):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    monkeypatch.setenv(identity.CACHE_ENV, str(blocker / "cache"))
    w = tmp_path / "w.safetensors"
    _weights(w, 3.0)
    assert file_digest(w) == _sha(w)


# --- hub ids ----------------------------------------------------------------------------------------


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "is_offline_mode", lambda: True)
    hub_revision.cache_clear()
    yield tmp_path / "hub"
    hub_revision.cache_clear()


def test_a_hub_id_resolves_offline_to_the_commit_in_the_local_cache(hf_cache):
    refs = hf_cache / "models--org--tiny" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40 + "\n")
    assert cached_revision("org/tiny") == "a" * 40
    assert hub_revision("org/tiny") == "a" * 40


def test_a_hub_id_that_cannot_be_resolved_offline_says_so_and_how_to_fix_it(hf_cache):
    with pytest.raises(HubRevisionError, match=r"org/absent.*HF_HUB_OFFLINE is set.*hf download org/absent"):
        hub_revision("org/absent")


def test_an_unreachable_hub_falls_back_to_the_cache(hf_cache, monkeypatch):
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)

    def unreachable(self, repo_id, **kw):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(HfApi, "model_info", unreachable)
    (hf_cache / "models--org--tiny" / "refs").mkdir(parents=True)
    (hf_cache / "models--org--tiny" / "refs" / "main").write_text("b" * 40)
    assert hub_revision("org/tiny") == "b" * 40
    with pytest.raises(HubRevisionError, match="ConnectionError: no route to host"):
        hub_revision("org/other")


# --- code ---------------------------------------------------------------------------------------------


def test_the_closure_follows_package_imports_and_leaves_out_the_excluded_modules():
    closure = module_closure(["finescope_core.prune"])
    assert {
        "finescope_core.prune.importance",
        "finescope_core.prune.widths",
        "finescope_core.model",
    } <= closure
    assert not closure & set(code_identity.EXCLUDED)
    assert "finescope_core.teacher" not in closure


def test_the_code_digest_is_the_same_for_a_copy_elsewhere_and_changes_with_a_module_it_reaches(tmp_path):
    """Hashed from module names and contents: a copy of the package at another path hashes the same;
    an edit to a module the roots import (not the roots themselves) changes it."""
    import subprocess

    root = Path(code_identity.__file__).parents[1]
    shutil.copytree(
        root / "finescope_core", tmp_path / "finescope_core", ignore=shutil.ignore_patterns("__pycache__")
    )
    probe = (
        "from finescope_core.code_identity import code_digest; print(code_digest(['finescope_core.prune']))"
    )

    def digest_in_copy() -> str:
        env = {**os.environ, "PYTHONPATH": str(tmp_path)}
        done = subprocess.run(
            [sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    here = code_digest(["finescope_core.prune"])
    widths = tmp_path / "finescope_core" / "prune" / "widths.py"
    widths.write_bytes(widths.read_bytes().replace(b"\n", b"\r\n"))  # line endings only: the same code
    assert digest_in_copy() == here
    widths.write_text(widths.read_text() + "\n_CHANGED = 1\n")
    assert digest_in_copy() != here
