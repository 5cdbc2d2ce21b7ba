"""SharedContextLM scores every log-likelihood request as stock lm-eval `HFLM` does: shared contexts run
once, one-token and multi-token continuations, several chunks per context, and over-long requests (which
lm-eval truncates from the left) all give the stock answer."""

from __future__ import annotations

import pytest
import torch
from lm_eval.models.huggingface import HFLM

from finescope_core.evaluate.harness_lm import SharedContextLM
from finescope_core.tiny import byte_tokenizer, tiny_model


def _requests(max_length: int) -> list[tuple[tuple[str, str], list[int], list[int]]]:
    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 250, (n,), generator=g).tolist()

    contexts = [ids(40), ids(7), ids(1)]
    out = []
    for c, ctx in enumerate(contexts):
        for n in (1, 5, 12, 3, 9):  # 5 choices per context: two chunks at batch size 3
            out.append(((f"ctx{c}", f"cont{n}"), ctx, ids(n)))
    out.append((("long", "x"), ids(max_length), ids(4)))  # cut from the left by lm-eval
    # a continuation that is the model's own greedy pick, so the greedy flag is True somewhere
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_answers_equal_stock_hflm_request_by_request(arch):
    model = tiny_model(arch, seed=2, attn_implementation="sdpa")
    tok = byte_tokenizer()
    stock = HFLM(pretrained=model, tokenizer=tok, batch_size=3, device="cpu")
    ours = SharedContextLM(pretrained=model, tokenizer=tok, batch_size=3, device="cpu")
    requests = _requests(stock.max_length)
    ctx = requests[0][1]
    with torch.no_grad():
        greedy = int(model(torch.tensor([ctx])).logits[0, -1].argmax())
    requests.append((("ctx0", "greedy"), ctx, [greedy]))
    want = HFLM._loglikelihood_tokens(stock, requests, disable_tqdm=True)
    got = ours._loglikelihood_tokens(requests, disable_tqdm=True)
    assert len(got) == len(want) == len(requests)
    for (lw, gw), (lg, gg) in zip(want, got, strict=True):
        assert lg == pytest.approx(lw, abs=1e-4, rel=1e-5)
        assert gg == gw
    assert got[-1][1] is True
