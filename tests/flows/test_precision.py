"""`model_dtype`: bf16 gives the fp32 curation up to a stated tolerance, keys hold the resolved dtype,
pruned models are saved in the base checkpoint's dtype, and every stage runs on CUDA when one is there."""

import json

import pytest
import torch
from safetensors import safe_open

from finescope_core.config import FinescopeConfig
from finescope_core.model import checkpoint_dtype, load_model, resolve_dtype
from finescope_core.tiny import save_tiny
from flows.curate import curate_flow
from flows.prune import prune_flow
from tasks.keymodels import compute_dtype
from tests.flows.test_curate_flow import TOPICS

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    save_tiny(root / "model", "llama", hidden=48, layers=3, intermediate=96)
    corpus = [
        {"id": f"{topic}-{i}", "text": templates[i % 3].format(a=i, b=i * 7 % 13)}
        for topic, templates in TOPICS.items()
        for i in range(40)
    ]
    (root / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in corpus) + "\n")
    seeds = [{"id": f"s{i}", "instruction": f"Compute {i} times 3."} for i in (5, 6, 8)]
    (root / "seeds.jsonl").write_text("\n".join(json.dumps(r) for r in seeds) + "\n")
    return root


def config(root, store: str, **top) -> FinescopeConfig:
    curate = dict(
        final_size=20,
        top_m=15,
        k_act=16,
        probes=2,
        reference_size=16,
        max_length=32,
        batch_size=8,
        sae={"d_sae": 64, "steps": 30, "batch_size": 32},
    )
    return FinescopeConfig(
        model=str(root / "model"),
        seeds=[str(root / "seeds.jsonl")],
        corpus=[str(root / "corpus.jsonl")],
        store=str(root / store),
        curate=curate,
        prune={"ratio": 0.2, "max_length": 32},
        **top,
    )


def curated_ids(cfg: FinescopeConfig) -> list[str]:
    result = curate_flow(cfg, export=False)
    path = f"{cfg.store}/curated/{result.curated.key}/curated.jsonl"
    return [json.loads(line)["id"] for line in open(path, encoding="utf-8")]


def test_auto_is_float32_on_cpu_and_names_resolve():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype(torch.float16, torch.device("cpu")) == torch.float16
    cfg = FinescopeConfig(seeds=["s"], corpus=["c"], device="cpu")
    assert compute_dtype(cfg) == "float32"
    assert compute_dtype(cfg.model_copy(update={"model_dtype": "bfloat16"})) == "bfloat16"


def test_bf16_curation_matches_fp32_within_tolerance(workspace):
    """Tolerance: at least 80 % of the 20 curated ids in common, and the same number of records of the
    seeds' topic within 2.

    bf16 keeps 8 bits of mantissa, so pooled activations differ from fp32 by ~0.4 % and records with
    near-equal scores can swap places at the cut-off; what must not change is which records are in the
    domain.
    """
    fp32 = curated_ids(config(workspace, "store32", device="cpu", model_dtype="float32"))
    bf16 = curated_ids(config(workspace, "store16", device="cpu", model_dtype="bfloat16"))
    assert len(set(fp32) & set(bf16)) >= 0.8 * len(fp32)
    math = [sum(i.startswith("math-") for i in ids) for ids in (fp32, bf16)]
    assert abs(math[0] - math[1]) <= 2 and math[0] >= 10, math


def test_a_bf16_run_does_not_reuse_fp32_artifacts(workspace):
    fp32 = curate_flow(config(workspace, "store-keys", device="cpu", model_dtype="float32"), export=False)
    bf16 = curate_flow(config(workspace, "store-keys", device="cpu", model_dtype="bfloat16"), export=False)
    assert fp32.corpus.key == bf16.corpus.key  # no model involved
    assert fp32.saliency.key != bf16.saliency.key and fp32.activations.key != bf16.activations.key
    assert bf16.saliency.cached is False


def test_pruned_model_is_saved_in_the_base_checkpoint_dtype(workspace, tmp_path):
    """A bf16 base pruned in float32 compute comes out bf16; the pruned weights are the fp32 ones rounded."""
    model, tok = load_model(str(workspace / "model"), device="cpu")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "base16")
    tok.save_pretrained(tmp_path / "base16")
    assert checkpoint_dtype(str(tmp_path / "base16")) == torch.bfloat16
    assert checkpoint_dtype(str(workspace / "model")) == torch.float32

    cfg = config(workspace, "store-prune", device="cpu", model_dtype="float32")
    cfg.model = str(tmp_path / "base16")
    result = prune_flow(cfg, export=False)
    result_dir = f"{cfg.store}/pruned/{result.pruned.key}/model"
    with safe_open(f"{result_dir}/model.safetensors", "pt") as f:
        dtypes = {f.get_tensor(name).dtype for name in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    assert dtypes == {torch.bfloat16}
    assert checkpoint_dtype(result_dir) == torch.bfloat16
    reloaded, _ = load_model(result_dir, device="cpu", dtype="auto")
    assert reloaded.dtype == torch.float32  # auto computes in fp32 on the CPU whatever the storage


@CUDA
def test_every_curation_stage_runs_on_cuda_in_bf16(workspace):
    cfg = config(workspace, "store-cuda", device="cuda", model_dtype="auto")
    assert compute_dtype(cfg) == ("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    cpu = curated_ids(config(workspace, "store-cpu", device="cpu", model_dtype="float32"))
    cuda = curated_ids(cfg)
    assert len(set(cpu) & set(cuda)) >= 0.8 * len(cpu)


@CUDA
def test_pruning_runs_on_cuda(workspace):
    result = prune_flow(config(workspace, "store-cuda-prune", device="cuda"), export=False)
    assert result.pruned.info["achieved_ratio"] > 0
