"""The teacher's generation backends: the HF model (`finescope_core.generate`) and the vLLM engine.

Both take the same prompts (token ids), EOS ids, budget and sampling, so the same JSONL and reject
filter follow whichever generates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finescope_core.distilled import TeacherError
from finescope_core.generate import Generation, cut_at_eos, eos_ids, generate_batch


class VLLMGenerator:
    """Teacher generation through vLLM (`teacher.backend: vllm`, CUDA only): the same prompts (token
    ids), EOS ids, budget and sampling as the HF path, so the same JSONL and reject filter follow.

    vLLM batches continuously inside each call, so a larger `teacher.batch_size` (e.g. 256) keeps the
    GPU busy; the batch is still the unit the output is written and resumed in.
    """

    def __init__(self, path: str, dtype: str, seed: int, **engine: Any):
        try:
            import vllm
        except ImportError:
            raise TeacherError(
                "teacher.backend: vllm needs the vllm package: pip install 'finescope[vllm]' (CUDA only); "
                "or use teacher.backend: hf"
            ) from None
        from transformers import GenerationConfig

        self._vllm = vllm
        self.llm = vllm.LLM(model=path, tokenizer=path, dtype=dtype, seed=seed, **engine)
        try:
            self.generation_config = GenerationConfig.from_pretrained(path)
        except OSError:  # no generation_config.json: the tokenizer's EOS alone
            self.generation_config = GenerationConfig()  # type: ignore[no-untyped-call]  # untyped upstream

    def generate(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[list[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int,
    ) -> list[Generation]:
        """One `Generation` per prompt, in order (`Generation.truncated`: stopped by the budget)."""
        eos = eos_ids(self, tokenizer)
        params = self._vllm.SamplingParams(
            max_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            stop_token_ids=eos,
            detokenize=False,
        )
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompts], sampling_params=params, use_tqdm=False
        )
        return [
            vllm_generation(list(o.outputs[0].token_ids), o.outputs[0].finish_reason, eos) for o in outputs
        ]


def vllm_generation(token_ids: list[int], finish_reason: str | None, eos: list[int]) -> Generation:
    """A vLLM completion as a `Generation`: cut before the first EOS (vLLM keeps a stop token in the
    output), truncated when vLLM stopped for length."""
    cut = cut_at_eos(token_ids, eos)
    return Generation(cut.token_ids, truncated=cut.truncated and finish_reason == "length")


Teacher = PreTrainedModel | VLLMGenerator
"""A model the HF path generates with, or the vLLM engine."""


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG for one batch without disturbing the caller's RNG state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def teacher_generate(
    teacher: Teacher,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    *,
    temperature: float,
    seed: int,
    max_new_tokens: int,
) -> list[Generation]:
    """One batch through whichever backend `teacher` is, seeded with `seed`."""
    if isinstance(teacher, VLLMGenerator):
        return teacher.generate(
            tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
        )
    with _seeded(seed, teacher.device):
        return generate_batch(
            teacher, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature
        )
