"""`teacher.backend: vllm` and `teacher.device_map: auto` against the HF path.

vLLM needs CUDA and does not install on the CI machine, so the engine is replaced by a stand-in with
vLLM's interface (`LLM(...).generate(prompts, sampling_params, use_tqdm)` returning outputs with
`token_ids` and `finish_reason`, the stop token kept in the output as vLLM does) that decodes with
the same tiny model. Given the same tokens, the vLLM path must write the same distilled file as the
HF path: same prompts, budget, EOS handling, truncation flags and reject filter.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from finescope_core.config import FinescopeConfig, TeacherConfig
from finescope_core.model import load_model
from finescope_core.teacher import (
    TeacherError,
    VLLMGenerator,
    eos_ids,
    generate_batch,
    generate_distilled,
    vllm_generation,
)
from finescope_core.tiny import save_tiny
from tasks.teacher import check_teacher_backend
from tests.core.test_teacher import _finish_early, _records


class _FakeLLM:
    """vLLM's `LLM` as far as finescope uses it, decoding greedily with an HF model."""

    model: Any = None
    tokenizer: Any = None
    calls: list[dict[str, Any]] = []

    def __init__(self, **engine: Any):
        _FakeLLM.calls.append(engine)

    def generate(
        self, prompts: list[dict[str, Any]], sampling_params: Any, use_tqdm: bool = True
    ) -> list[Any]:
        assert not use_tqdm and sampling_params.temperature == 0
        eos = sampling_params.stop_token_ids
        out = []
        for p in prompts:
            (gen,) = generate_batch(
                self.model, self.tokenizer, [p["prompt_token_ids"]], max_new_tokens=sampling_params.max_tokens
            )
            ids, reason = (gen.token_ids, "length") if gen.truncated else ([*gen.token_ids, eos[0]], "stop")
            out.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=tuple(ids), finish_reason=reason)]))
        return out


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> type[_FakeLLM]:
    module = types.ModuleType("vllm")
    module.LLM = _FakeLLM  # type: ignore[attr-defined]
    module.SamplingParams = lambda **kw: SimpleNamespace(**kw)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", module)
    _FakeLLM.calls = []
    return _FakeLLM


def test_vllm_completions_map_to_generations() -> None:
    assert vllm_generation([5, 6, 2, 9], "stop", [2]) == vllm_generation([5, 6, 2], "stop", [2])
    assert (
        vllm_generation([5, 6, 2], "stop", [2]).token_ids == [5, 6]
        and not vllm_generation([5, 6, 2], "stop", [2]).truncated
    )
    assert vllm_generation([5, 6], "length", [2]).truncated
    assert not vllm_generation([5, 6], "stop", [2]).truncated  # a stop string, not the budget


def test_vllm_backend_writes_the_hf_backends_file(tmp_path: Path, fake_vllm: type[_FakeLLM]) -> None:
    path = save_tiny(tmp_path / "teacher", "llama")
    model, tok = load_model(str(path), device="cpu")
    _finish_early(model, step=5)  # a random model never stops: make most rows end with EOS
    cfg = TeacherConfig(max_new_tokens=9, batch_size=4, min_response_chars=1)
    records = _records(10)
    hf = generate_distilled(model, tok, records, cfg, tmp_path / "hf.jsonl")
    fake_vllm.model, fake_vllm.tokenizer = model, tok
    engine = VLLMGenerator(str(path), "float32", seed=3)
    assert fake_vllm.calls == [{"model": str(path), "tokenizer": str(path), "dtype": "float32", "seed": 3}]
    assert eos_ids(engine, tok) == eos_ids(model, tok)
    via = generate_distilled(engine, tok, records, cfg, tmp_path / "vllm.jsonl")
    assert (tmp_path / "vllm.jsonl").read_bytes() == (tmp_path / "hf.jsonl").read_bytes()
    timing = {"seconds": 0, "tokens_per_second": 0}
    assert via.to_dict() | timing == hf.to_dict() | timing
    assert 0 < hf.kept_teacher < 10 or hf.rejected  # the file exercises the filter, not only one outcome


def test_vllm_backend_is_refused_without_the_package_or_a_gpu(
    monkeypatch: pytest.MonkeyPatch, fake_vllm: type[_FakeLLM]
) -> None:
    cfg = FinescopeConfig(seeds=["s.jsonl"], corpus=["c.jsonl"], teacher={"backend": "vllm"}, device="cpu")
    with pytest.raises(TeacherError, match="runs on CUDA only"):
        check_teacher_backend(cfg.teacher, cfg.device)
    monkeypatch.delitem(sys.modules, "vllm")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "vllm" else object())
    with pytest.raises(TeacherError, match=r"pip install 'finescope\[vllm\]'"):
        check_teacher_backend(cfg.teacher, cfg.device)
    check_teacher_backend(
        cfg.model_copy(update={"teacher": TeacherConfig()}).teacher, cfg.device
    )  # hf: nothing to check


def test_device_map_auto_loads_the_same_model(tmp_path: Path) -> None:
    path = save_tiny(tmp_path / "m", "qwen3")
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    plain, _ = load_model(str(path), device="cpu")
    spread, _ = load_model(str(path), device="cpu", device_map="auto")
    torch.testing.assert_close(spread(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert not spread.training
