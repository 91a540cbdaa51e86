"""`metacompress submit CONFIG --address URL`: the pipeline as a Ray job on a running cluster (docs/design.md §6).

The job ships this project as its working directory (sources only: see EXCLUDES) and runs
``python -m pipeline.commands.cli run CONFIG --stages ...`` on the head node, where it joins the cluster through the
RAY_ADDRESS that Ray sets for jobs. A config inside the project travels with it (relative paths in it then resolve
inside the job's copy, so its ``work_dir`` must be absolute: shared storage); a config outside the project is passed
by absolute path and must be readable at that path on the head node (shared storage).

Submission ids are ``metacompress-<stages>-<config hash>``: submitting the same stages of the same resolved config
again is recognised. While that job is pending or running nothing new is submitted (``--follow`` attaches to it);
after it succeeded nothing is submitted unless ``--force``; after it failed or was stopped a new attempt
``<id>-r2``, ``-r3``... is submitted (Ray never reuses an id), and it resumes from the shards already written.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# gitignore syntax, relative to the project root ("/x/": only the top-level x). Ray also honours .gitignore;
# these hold without one (an exported tree) and keep the upload to the sources (Ray's limit is 512 MiB).
EXCLUDES = ["/.venv/", "/.git/", "/work/", "/data/", "/mlruns/", "/mlartifacts/", "/build/", "/.whl/", "*.db",
            "__pycache__/", "*.pyc", ".pytest_cache/", "*.egg-info/"]
# How processes find each other and authenticate is the cluster's business: the job inherits these from the
# cluster's own `ray start` (see ray_cluster.yaml), the submitter's defaults (loopback, no auth) would be wrong there.
CLUSTER_OWNED = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE")
LIVE = ("PENDING", "RUNNING")


@dataclass
class JobPlan:
    submission_id: str  # the first attempt's id; later attempts append -r2, -r3, ...
    entrypoint: str
    runtime_env: dict
    metadata: dict[str, str]


def job_env() -> dict[str, str]:
    """Environment of the job's driver and of every task and actor it starts (the project's env defaults)."""
    from pipeline.env import DEFAULTS

    return {k: v for k, v in DEFAULTS.items() if k not in CLUSTER_OWNED}


def config_argument(path: Path, root: Path = PROJECT_ROOT) -> str:
    """How the job names the config: relative to the working dir when it ships inside it, else absolute."""
    path = path.resolve()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def submission_id(config_dict: dict, stages: list[str]) -> str:
    digest = hashlib.sha256(json.dumps(config_dict, sort_keys=True).encode()).hexdigest()[:12]
    return f"metacompress-{'-'.join(stages)}-{digest}"


def plan_job(config_path: str | Path, stages: str | None = None, sets: list[str] | None = None,
             overwrite: bool = False, python: str = "python", root: Path = PROJECT_ROOT,
             address: str | None = None) -> JobPlan:
    """Validate the config here (errors before any upload) and build the job: entrypoint, runtime env, id.
    ``address``: the cluster's, whose tracking store must then be a server unless it is this machine's loopback."""
    from pipeline.commands.run import parse_overrides, parse_stages
    from pipeline.config import ConfigError, load_config
    from pipeline.tracking import check_store_for_cluster, tracking_uri

    path = Path(config_path)
    names = parse_stages(stages)
    overrides = parse_overrides(sets or [])
    if overwrite:
        overrides["shards.overwrite"] = True
    config = load_config(path, overrides)
    check_store_for_cluster(tracking_uri(config), address)
    argument = config_argument(path, root)
    shipped = not Path(argument).is_absolute()
    if shipped and "://" not in config.work_dir and Path(config.work_dir).resolve().is_relative_to(root.resolve()):
        raise ConfigError(f"{path}: work_dir resolves to {config.work_dir}, inside the project, which the job only "
                          "sees as a temporary copy: set an absolute work_dir on storage every node shares, e.g. "
                          "--set work_dir=/mnt/shared/work/NAME")
    command = [python, "-m", "pipeline.commands.cli", "run", argument, "--stages", ",".join(names)]
    for pair in sets or []:
        command += ["--set", pair]
    if overwrite:
        command.append("--overwrite")
    runtime_env = {"working_dir": str(root), "excludes": list(EXCLUDES), "env_vars": job_env()}
    sid = submission_id(config.to_dict(), names)
    metadata = {"config": argument, "stages": ",".join(names), "work_dir": config.work_dir,
                "tracking_uri": config.tracking.uri or "sqlite (work_dir)"}
    return JobPlan(sid, shlex.join(command), runtime_env, metadata)


def attempts(jobs: list, base: str) -> list:
    """The jobs that are attempts of ``base`` (``base``, ``base-r2``, ...), oldest attempt first."""
    def number(sid: str) -> int | None:
        if sid == base:
            return 1
        tail = sid[len(base) + 2:] if sid.startswith(base + "-r") else ""
        return int(tail) if tail.isdigit() else None

    found = [(number(j.submission_id or ""), j) for j in jobs]
    return [j for n, j in sorted(((n, j) for n, j in found if n), key=lambda t: t[0])]


def decide(previous: list, base: str, force: bool = False) -> tuple[str, str | None]:
    """-> (action, submission id): ("attach", id) for a live attempt, ("done", id) for a succeeded one (unless
    ``force``), ("submit", next id) otherwise."""
    if not previous:
        return "submit", base
    last = previous[-1]
    status = str(getattr(last.status, "value", last.status))
    if status in LIVE:
        return "attach", last.submission_id
    if status == "SUCCEEDED" and not force:
        return "done", last.submission_id
    return "submit", f"{base}-r{len(previous) + 1}"


def follow(client, job_id: str) -> int:
    """Stream the job's logs until it ends -> 0 when it succeeded, 1 otherwise."""
    import asyncio
    import time

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())
    info = client.get_job_info(job_id)
    for _ in range(60):  # the log stream can close a moment before the status turns terminal
        if str(info.status.value) not in LIVE:
            break
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    status = str(info.status.value)
    print(f"\nmetacompress submit: job {job_id} {status}" + (f": {info.message}" if info.message else ""),
          file=sys.stderr if status != "SUCCEEDED" else sys.stdout, flush=True)
    return 0 if status == "SUCCEEDED" else 1


def dry_run(args) -> int:
    """The job as it would be submitted, and the GPU memory plan of its stages (refused when it does not fit)."""
    from pipeline.commands.plan import check_plan
    from pipeline.commands.run import parse_overrides
    from pipeline.config import load_config

    plan = plan_job(args.config, args.stages, args.set, args.overwrite, args.python)
    print(f"metacompress submit --dry-run: would submit {plan.submission_id}: {plan.entrypoint}")
    table, problem = check_plan(load_config(args.config, parse_overrides(args.set)), args.arch)
    print(table)
    if problem:
        raise ValueError(problem)
    return 0


def submit_command(args) -> int:
    import os

    from ray.job_submission import JobSubmissionClient

    if args.dry_run:
        return dry_run(args)
    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        raise ValueError("no cluster address: pass --address http://HEAD:8265 (the Ray dashboard; with "
                         "`ray dashboard ray_cluster.yaml` running, http://127.0.0.1:8265)")
    plan = plan_job(args.config, args.stages, args.set, args.overwrite, args.python, address=address)
    client = JobSubmissionClient(address)
    action, job_id = decide(attempts(client.list_jobs(), plan.submission_id), plan.submission_id, args.force)
    if action == "submit":
        try:
            client.submit_job(entrypoint=plan.entrypoint, runtime_env=plan.runtime_env, submission_id=job_id,
                              metadata=plan.metadata)
            print(f"metacompress submit: submitted {job_id}: {plan.entrypoint}", flush=True)
        except RuntimeError as err:
            if "already exists" not in str(err):  # another submitter won the race: that job is ours too
                raise
            action = "attach"
    if action == "attach":
        print(f"metacompress submit: {job_id} is already submitted and {client.get_job_status(job_id).value}; "
              "not submitting it again", flush=True)
    if action == "done":
        print(f"metacompress submit: {job_id} already SUCCEEDED for this config and these stages; nothing to do "
              "(--force runs it again: the stages then skip every shard already computed)", flush=True)
        return 0
    if args.follow:
        return follow(client, job_id)
    print(f"  logs:   ray job logs --address {address} --follow {job_id}\n"
          f"  status: ray job status --address {address} {job_id}\n"
          f"  stop:   ray job stop --address {address} {job_id}", flush=True)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("submit", help="run the pipeline as a Ray job on a running cluster")
    p.add_argument("config", help="YAML config (inside the project: shipped with it; else: a path the head can read)")
    p.add_argument("--address", help="Ray dashboard URL, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--stages", help="comma-separated subset of: extract, teacher, train, evaluate (default: all)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--overwrite", action="store_true", help="passed to `run`: recompute outputs of another config")
    p.add_argument("--follow", action="store_true", help="stream the logs until the job ends; exit 1 if it failed")
    p.add_argument("--force", action="store_true", help="submit again even when this job already succeeded")
    p.add_argument("--python", default="python", help="the cluster's Python executable (default: python)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the job and its GPU memory plan (`metacompress plan`) without submitting")
    p.add_argument("--arch", help="with --dry-run: plan for a known architecture instead of model.path")
    p.set_defaults(func=submit_command)
