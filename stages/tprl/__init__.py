"""Stage `tprl`: the TPRL baseline (docs/design.md §4.5) trained on the train split's cached features.

1. prepare (Ray actors holding the LVLM, one task per extract shard, cached as the stage output
   ``<work_dir>/tprl/prepared/<hash>``): per dialogue the query ``q`` (``session.prompt_embedding`` of the FIRST
   turn's question, as at evaluation, docs/design.md §5), the teacher's token scores (the attention the first prompt's text
   gives each visual token, mean over heads, text queries and ``tprl.teacher_layers``: ``analysis.prompt_attention``)
   and the full-token correctness of the greedy answer to the first question.
2. driver: the token autoencoder on the cached features, then behaviour cloning on the teacher's trajectories.
3. PPO: iteration ``i`` draws ``rollouts_per_iteration`` dialogues and cuts them into tasks of ``rollout_batch_size``
   episodes; rollout actors sample the episodes with the current policy, the LVLM answering the first question from
   the kept tokens (``BatchChatSession``, greedy), and return them as tensors (``episode_to_tensors``); reward per
   step = change in correctness + ``b`` * share removed (``policy.step_reward``), so an episode's rewards sum to
   correctness(kept) - correctness(full) + b * share removed. The driver runs the PPO update.

Every random draw is seeded by (``tprl.seed``, iteration, task), never by which actor ran what, so a run is a pure
function of the config. A checkpoint (policy, optimizer, iteration, RNG state; safetensors + JSON, written to a
temporary directory and renamed) is kept after BC, every ``checkpoint_every`` iterations and at the end, under a
directory named by the hash of everything the trajectory depends on (``iterations`` excluded: a longer run continues
a shorter one). A re-run resumes from the newest; a finished run leaves ``_SUCCESS`` (result hash) and the policy in
``<work_dir>/tprl/policy`` (``TPRLPolicy.save_pretrained``) and a re-run does nothing. Fault injection for tests:
``METACOMPRESS_TPRL_CRASH_AFTER_ITERATION=N`` makes the driver fail right after iteration N.
"""

from stages.outputs import TPRL as STAGE
from stages.outputs import policy_dir
from stages.outputs import tprl_dir as stage_dir
from stages.tprl.driver import CRASH_ENV, TPRLReport, run
from stages.tprl.inputs import feature_args, load_records, prepared_args

__all__ = ["CRASH_ENV", "STAGE", "TPRLReport", "feature_args", "load_records", "policy_dir", "prepared_args", "run",
           "stage_dir"]
