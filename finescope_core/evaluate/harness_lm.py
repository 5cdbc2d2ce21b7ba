"""lm-eval's `HFLM`, scoring the choices of a multiple-choice item after one pass over their shared context.

A multiple-choice task asks lm-eval for log P(choice | context) of every choice, and stock `HFLM` runs
context + choice through the model once per choice: with four choices after a ~90-token context and
~25-token choices, three quarters of the tokens it computes are the same context again. `SharedContextLM`
runs each distinct context once (keeping its key/value cache and only its last position's logits, which
predict a choice's first token), then every choice of that context as a batch on top of the cache. The
scores are lm-eval's: the same tokens at the same positions, the same log-softmax and greedy check,
differing only by floating-point rounding of the cached attention (tests/core/test_harness.py compares
them with the stock `lm_eval` CLI item by item). Requests whose context + continuation exceed the
model's length, which lm-eval cuts from the left, and non-causal models take the stock path.

Imports lm_eval at module level: import this module only where the harness runs.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM

Request = tuple[tuple[str, str], list[int], list[int]]
"""lm-eval's log-likelihood request: ((context text, continuation text), context ids, continuation ids)."""


class SharedContextLM(HFLM):  # type: ignore[misc]  # lm_eval ships no type information
    """`HFLM` whose log-likelihood requests that share a context run that context once (module docstring)."""

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        if self.backend != "causal":
            return list(super()._loglikelihood_tokens(requests, disable_tqdm, override_bs))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        stock: list[int] = []
        for i, (_, ctx, cont) in enumerate(requests):
            if not ctx or not cont or len(ctx) + len(cont) > self.max_length + 1:
                stock.append(i)  # lm-eval truncates these from the left: its own path does exactly that
            else:
                groups.setdefault(tuple(ctx), []).append(i)
        if stock:
            answers = super()._loglikelihood_tokens([requests[i] for i in stock], True, override_bs)
            for i, answer in zip(stock, answers, strict=True):
                results[i] = answer
        for context, members in groups.items():
            answers = self._score_shared(list(context), [requests[i][2] for i in members], override_bs)
            for i, answer in zip(members, answers, strict=True):
                results[i] = answer
                self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return [r for r in results if r is not None]

    def _chunk_size(self, override_bs: int | None, n: int) -> int:
        size = override_bs if override_bs is not None else self.batch_size
        return size if isinstance(size, int) and size > 0 else n

    def _score_shared(
        self, ctx: list[int], conts: list[list[int]], override_bs: int | None
    ) -> list[tuple[float, bool]]:
        """(log P(cont | ctx), cont is the greedy continuation) for every continuation of one context."""
        keep = {"logits_to_keep": 1} if _takes_logits_to_keep(self.model) else {}
        with torch.no_grad():
            out = self.model(torch.tensor([ctx], device=self.device), use_cache=True, **keep)
            # The context's last position predicts each continuation's first token.
            first = F.log_softmax(out.logits[0, -1:], dim=-1, dtype=self.softmax_dtype)
            answers: list[tuple[float, bool]] = []
            size = self._chunk_size(override_bs, len(conts))
            for start in range(0, len(conts), size):
                chunk = conts[start : start + size]
                rest = self._continuation_logprobs(out.past_key_values, chunk)
                for j, cont in enumerate(chunk):
                    logprobs = torch.cat([first, rest[j, : len(cont) - 1]]) if rest is not None else first
                    answers.append(_answer(logprobs, cont))
        return answers

    def _continuation_logprobs(self, cache: Any, chunk: list[list[int]]) -> torch.Tensor | None:
        """Log-softmax at every continuation position but the last, for a batch of continuations run on a
        copy of the context's cache (right-padded: a causal model's real positions never see the padding).
        None when every continuation is one token long."""
        longest = max(len(c) for c in chunk) - 1
        if longest == 0:
            return None
        batch = copy.deepcopy(cache)
        batch.batch_repeat_interleave(len(chunk))
        inp = torch.tensor(
            [c[:-1] + [c[-1]] * (longest - len(c) + 1) for c in chunk], device=self.device, dtype=torch.long
        )
        logits = self.model(inp, past_key_values=batch, use_cache=True).logits
        return F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)


def _answer(logprobs: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
    """lm-eval's answer for one continuation from its positions' log-softmax [len(cont), vocab]."""
    target = torch.tensor(cont, device=logprobs.device)
    greedy = bool((logprobs.argmax(dim=-1) == target).all())
    return float(logprobs.gather(1, target.unsqueeze(1)).sum()), greedy


def _takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model's forward can skip the output head on all but the last positions."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters
