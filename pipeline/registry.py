"""Registry promotion (docs/design.md §6): the compressor version with alias ``candidate`` gets alias ``champion`` when its
average accuracy at its reduction rate beats every baseline evaluated at that rate and the current champion.

Which rate is the candidate's: the evaluation ran the compressors in ``<work_dir>/train/rate-R/compressor``; the
candidate is matched to one of them by the sha256 of its ``model.safetensors`` (downloaded from the registry), so a
candidate that was not evaluated here is never promoted on someone else's numbers. The champion's score is the
``eval_avg_accuracy`` tag written on its version when it was evaluated; it counts only when its ``eval_key`` (model,
data, rate and protocol of the evaluation) equals this evaluation's, since accuracies at different rates or on
different data are not comparable.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.hashing import file_sha256
from pipeline.tracking import CANDIDATE

CHAMPION = "champion"


@dataclass
class Evaluated:
    """One evaluated compressor: its rate, the sha256 of its weights file, its average accuracy (percent), the
    average accuracy of each baseline at the same rate and the key of the evaluation protocol."""

    rate: float
    weights_sha256: str
    avg: float
    baselines: dict[str, float]
    eval_key: str


@dataclass
class Decision:
    promoted: bool
    reason: str
    candidate_version: str | None = None
    rate: float | None = None
    candidate_avg: float | None = None
    best_baseline: str | None = None
    best_baseline_avg: float | None = None
    champion_version: str | None = None
    champion_avg: float | None = None
    baselines: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def decide(candidate_avg: float, baselines: dict[str, float], champion_avg: float | None) -> tuple[bool, str]:
    """Pure rule: promote iff ``candidate_avg`` is strictly above every baseline and the comparable champion (None:
    no comparable champion). Returns (promote, reason)."""
    losers = [f"{name} ({avg:.2f})" for name, avg in sorted(baselines.items()) if avg >= candidate_avg]
    if losers:
        return False, f"candidate {candidate_avg:.2f} does not beat {', '.join(losers)}"
    if champion_avg is not None and champion_avg >= candidate_avg:
        return False, f"candidate {candidate_avg:.2f} does not beat the champion ({champion_avg:.2f})"
    against = ["every baseline" if baselines else "no baseline evaluated"]
    against.append(f"the champion ({champion_avg:.2f})" if champion_avg is not None else "no comparable champion")
    return True, f"candidate {candidate_avg:.2f} beats " + " and ".join(against)


def version_weights(client, tracking_uri: str, name: str, version: str) -> set[str]:
    """sha256 of every ``*.safetensors`` file in the artifacts of model version ``name/version``."""
    import mlflow

    uri = client.get_model_version_download_uri(name, version)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=tracking_uri))
        files = [local] if local.is_file() else list(local.rglob("*.safetensors"))
        return {file_sha256(str(p)) for p in files if p.suffix == ".safetensors"}


def _alias(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no such alias (or no such model): nothing to compare with
        return None


def promote(tracking_uri: str, name: str, evaluated: list[Evaluated]) -> Decision:
    """Apply the promotion rule to the ``candidate`` of registered model ``name``; tag the candidate version with its
    evaluation (``eval_avg_accuracy``, ``eval_rate``, ``eval_key``, ``eval_best_baseline``, ``promotion``) and move
    the ``champion`` alias to it when promoted."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    candidate = _alias(client, name, CANDIDATE)
    if candidate is None:
        return Decision(False, f"registered model {name!r} has no {CANDIDATE!r} version")
    hashes = version_weights(client, tracking_uri, name, candidate.version)
    recorded = (candidate.tags or {}).get("weights_sha256")  # set at registration (docs/design.md §8)
    if recorded and recorded not in hashes:
        return Decision(False, f"candidate version {candidate.version}: its stored model.safetensors differs from the "
                               "sha256 recorded at registration (damaged); not promoted", candidate.version)
    match = next((e for e in evaluated if e.weights_sha256 in hashes), None)
    if match is None:
        rates = ", ".join(str(e.rate) for e in evaluated) or "none"
        return Decision(False, f"candidate version {candidate.version} is none of the compressors evaluated here "
                               f"(rates {rates}): its weights differ", candidate.version)
    best = max(match.baselines.items(), key=lambda kv: kv[1], default=(None, None))
    decision = Decision(False, "", candidate.version, match.rate, match.avg, best[0], best[1],
                        baselines=dict(match.baselines))
    champion = _alias(client, name, CHAMPION)
    note = ""
    if champion is not None:
        decision.champion_version = champion.version
        if champion.version == candidate.version:
            decision.reason = f"candidate version {candidate.version} is already the champion"
            return decision
        tags = champion.tags or {}
        if tags.get("eval_key") == match.eval_key and "eval_avg_accuracy" in tags:
            decision.champion_avg = float(tags["eval_avg_accuracy"])
        else:
            note = f" (champion version {champion.version} was not evaluated under this protocol and rate)"
    decision.promoted, decision.reason = decide(match.avg, match.baselines, decision.champion_avg)
    decision.reason += note
    for key, value in {"eval_avg_accuracy": f"{match.avg:.6f}", "eval_rate": str(match.rate),
                       "eval_key": match.eval_key, "eval_best_baseline": str(best[0]),
                       "eval_best_baseline_avg": "" if best[1] is None else f"{best[1]:.6f}",
                       "promotion": "champion" if decision.promoted else "rejected"}.items():
        client.set_model_version_tag(name, candidate.version, key, value)
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, candidate.version)
    return decision
