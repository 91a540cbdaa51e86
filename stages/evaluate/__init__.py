"""Stage `evaluate`: every (method x reduction rate) over the split's dialogues, multi-turn, on Ray actors (one GPU
each when the cluster has them) -> per-dialogue answers, scores and efficiency figures; then tables, plots, MLflow
logging and registry promotion (docs/design.md §5, §6).

Each (method, rate) is its own cached stage output, ``<work_dir>/evaluate/<split>/<method>[/rate-R]/<hash>``, whose
directory name carries the hash of everything its numbers depend on (model, method, rate, compressor weights, chat
protocol: history, answer length and batch size, since times are those of batched calls; data and its sharding).
Adding a method or a rate, or retraining one compressor, computes only the new outputs; old ones stay on disk
untouched. ``full`` (the Base row) always runs, once, without a rate.

Shard ``i`` holds dialogues ``[i * N, (i + 1) * N)`` of the split; per dialogue: ``dialogue_id``, ``source``,
``questions``, ``references`` (per turn the reference answers), ``answers`` (the model's, generated with the source's
settings, docs/design.md §3.5), ``scores`` (per turn in [0, 1]: VQA soft accuracy for VQA-v2 sources, exact match
after normalisation otherwise; 0 for judged ConvBench dialogues, whose scores the driver computes with the judge
against the full-token answers) and per turn the figures of ``compress.lvlm.efficiency.TurnStats``. A stochastic
method has one output per entry of ``evaluate.seeds`` when there are several; its summary is their mean and spread. Teacher agreement is computed at aggregation against the teacher stage's
answers of this split when they were made under the same protocol, else against the ``full`` method's answers.
"""

from stages.evaluate.driver import EvaluationReport, run
from stages.evaluate.planning import Job, plan
from stages.outputs import EVALUATE as STAGE
from stages.outputs import compressor_dir

__all__ = ["STAGE", "EvaluationReport", "Job", "compressor_dir", "plan", "run"]
