"""Recovery that scales with the corpus (the `recovered` stage, between `pruned` and `tuned`).

The pruned student learns the unpruned teacher's next-token distributions (`T^2 * KL`, plus an
optional cross entropy) over a large sample of the training pool: the records nearest to the seeds by
the curated stage's scores, with a share of general records against forgetting (`sampler`; the
`random` twin draws its whole pool at random). The texts are tokenised and packed as they are read and
the teacher's logits computed on the fly, until the token budget is spent (`phase`). The method (LoRA,
merged at the end, or full) follows `finetune.method`; `tuned` then starts from this model (`stage`).
"""

from finescope_core.recover.phase import LossTerms, PhaseSummary, packed_rows, recover_loss, train_phase
from finescope_core.recover.sampler import PoolDraw, draw_pool, draw_random
from finescope_core.recover.stage import MODEL_DIR, POOL_FILE, SUMMARY_FILE, RecoverInputs, run

__all__ = [
    "MODEL_DIR",
    "POOL_FILE",
    "SUMMARY_FILE",
    "LossTerms",
    "PhaseSummary",
    "PoolDraw",
    "RecoverInputs",
    "draw_pool",
    "draw_random",
    "packed_rows",
    "recover_loss",
    "run",
    "train_phase",
]
