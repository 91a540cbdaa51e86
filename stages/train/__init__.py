"""Stage `train`: one MetaCompress per rate in ``train.rates``, distilled from the cached teacher (docs/design.md §4.2, §6).

A Ray Train ``TorchTrainer`` runs ``train.num_workers`` workers; each wraps :class:`Student` (the compressor plus the
frozen LVLM) in a DeepSpeed engine (``infra.deepspeed``): only the compressor trains, gradients flow through the
frozen LLM. Each step a worker takes its micro batch (``stages.train.data``), reduces the cached features to
``m = num_keep(n, rate)`` tokens, runs the student over the whole dialogue teacher-forced on the teacher's answers
and minimises ``topk_kl + a_entropy * entropy(P) + a_collapse * collapse(P)``.

Resume: a checkpoint every ``train.checkpoint_every`` steps (and at the end) in safetensors + JSON
(``stages/train/checkpoints.py``; DeepSpeed's own checkpoints are pickles and are never written or read) is reported
to Ray Train under a run name that hashes everything the result depends on; a re-run with the same config finds it
through ``ray.train.get_checkpoint()`` and continues from its step (the data order is a function of the step); a
damaged or foreign checkpoint is refused and the rate restarts from step 0. A finished rate leaves ``_SUCCESS`` next
to its compressor with the sha256 of its files and is skipped while they match; changed weights are recomputed. Fault injection for tests: the driver environment
variable ``METACOMPRESS_TRAIN_CRASH_AFTER_STEP=N`` makes every worker exit abruptly after step N.
"""

from stages.outputs import TRAIN as STAGE
from stages.outputs import compressor_dir, rate_dir
from stages.train.driver import CRASH_ENV, TrainReport, make_plan, run, run_hash, train_rate

__all__ = ["CRASH_ENV", "STAGE", "TrainReport", "compressor_dir", "make_plan", "rate_dir", "run", "run_hash",
           "train_rate"]
