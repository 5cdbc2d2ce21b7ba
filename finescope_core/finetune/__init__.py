"""Recovery of the pruned model on the teacher-distilled data (paper §3.2.2 and §4).

The student is trained on (prompt, response) pairs formatted exactly as at inference (the prompt
format is shared with `teacher`), with the loss on the response tokens only. The loss mixes cross
entropy on the distilled targets with logit distillation from the unpruned teacher:
`(1 - w) * CE + w * T^2 * KL(p_teacher^T || p_student^T)`, CE per response token and KD per response
token (`finetune.kd_tokens: response`) or per token of the whole sequence, prompt included (`all`:
the student also relearns the teacher's distributions over the domain's own text, as pruned models are
recovered by distillation on whole sequences) (`finetune.kd_weight`, `finetune.kd_temperature`); the
teacher's logits are computed on the fly without gradients.

Training runs on the transformers `Trainer` (AdamW, linear warm-up + cosine decay, gradient clipping,
seeded shuffling, dynamic right padding) with a custom `compute_loss` that sums each term over its
positions and divides by its positions in the whole accumulated step, so every token weighs the same
however tokens fall into micro-batches. After every epoch the held-out share's loss
is measured; the weights of the epoch with the lowest held-out loss are the ones saved.
`finetune.method` is `lora` (peft adapters; outputs the adapter and the merged model) or `full`
(every weight of the pruned model; outputs the full model only); `auto` is resolved to one of them
before the run (`finescope_core.finetune_choice`) and refused here. Outputs are published together,
with `finetune.json`, by one directory rename.

Modules: `examples` (tokenised rows, padding, the held-out split), `losses` (response CE, logit
distillation), `lora` (peft adapters), `trainer` (the `Trainer` loop, best epoch, master weights),
`summary` (`finetune.json`), `stage` (`lora_finetune` and the stage entry `run`).
"""

from finescope_core.finetune.errors import FinetuneError
from finescope_core.finetune.examples import (
    IGNORE,
    Example,
    Examples,
    build_examples,
    pad_batch,
    split_indices,
)
from finescope_core.finetune.lora import attach_lora, check_targets
from finescope_core.finetune.losses import (
    LossParts,
    distill_loss,
    evaluate_kd,
    evaluate_loss,
    kd_loss,
    kd_position_mask,
    response_loss,
)
from finescope_core.finetune.stage import (
    ADAPTER_DIR,
    INFO,
    MERGED_DIR,
    SUMMARY_FILE,
    TuneInputs,
    finetune,
    lora_finetune,
    run,
)
from finescope_core.finetune.summary import FinetuneSummary
from finescope_core.finetune.trainer import master_weights

__all__ = [
    "ADAPTER_DIR",
    "IGNORE",
    "INFO",
    "MERGED_DIR",
    "SUMMARY_FILE",
    "Example",
    "Examples",
    "FinetuneError",
    "FinetuneSummary",
    "LossParts",
    "TuneInputs",
    "attach_lora",
    "build_examples",
    "check_targets",
    "distill_loss",
    "evaluate_kd",
    "evaluate_loss",
    "finetune",
    "kd_loss",
    "kd_position_mask",
    "lora_finetune",
    "master_weights",
    "pad_batch",
    "response_loss",
    "run",
    "split_indices",
]
