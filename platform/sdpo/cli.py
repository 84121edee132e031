"""The `sdpo` command line: `sdpo run`, `validate`, `tune`, `report`, and on a cluster `submit` and `jobs`."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from sdpo.config import ConfigError, load_job
from sdpo.storage import StorageError

CONFIG_HELP = "job config reference: README.md, section 'Job config'"


def _job_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    if optional:
        p.add_argument("job", nargs="?", help="job config (YAML); with --resume, default: the one the run recorded")
    else:
        p.add_argument("job", help="job config (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set training.learning_rate=1e-6 (repeatable)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray instance)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdpo", description="Stepwise DPO on Ray.", epilog=CONFIG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="plan and train an sDPO job", epilog=CONFIG_HELP)
    _job_args(run, optional=True)
    run.add_argument("--output", help="output directory (default: the job's output_dir)")
    what = run.add_mutually_exclusive_group()
    what.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    what.add_argument("--resume", metavar="DIR",
                      help="continue the run in DIR: skip its completed stages, continue an interrupted stage "
                      "from its latest checkpoint")
    run.add_argument("--force", action="store_true",
                     help="with --resume: retrain from the first completed stage whose inputs the job changed")
    val = sub.add_parser("validate", help="check the config and the data, print the plan; no training",
                         epilog=CONFIG_HELP)
    _job_args(val)
    val.add_argument("--output", help="keep the ingest results here (default: a temporary directory)")
    tun = sub.add_parser("tune", help="search the data schedule (orderings, stages, strategies, hyperparameters) "
                         "with Ray Tune", epilog="space file reference: README.md, section 'Tune'")
    tun.add_argument("space", help="tune space (YAML), e.g. tune_spaces/orderings.yaml")
    tun.add_argument("--output", help="experiment directory (default: <base job's output_dir>/<space name>)")
    tun.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                     help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray instance)")
    _cluster_commands(sub)
    rep = sub.add_parser("report", help="write report.md and plots/ for a finished run, print its stage table")
    rep.add_argument("run_dir", help="the run's output directory (local or fsspec URL, e.g. s3://bucket/run)")
    return parser


def _cluster_commands(sub) -> None:
    address = {"default": os.environ.get("RAY_ADDRESS"),
               "help": "the cluster's dashboard, http://HEAD:8265 (default: $RAY_ADDRESS)"}
    sm = sub.add_parser("submit", help="submit a job (or with --tune a search) to a Ray cluster",
                        epilog="cluster workflow: README.md, section 'Run on a Ray cluster'")
    sm.add_argument("target", metavar="JOB.yaml", help="job config (or, with --tune, a tune space)")
    sm.add_argument("--tune", action="store_true", help="the file is a tune space: run `sdpo tune` on the cluster")
    sm.add_argument("--address", **address)
    sm.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a job config key, as for sdpo run (repeatable)")
    sm.add_argument("--output", help="where the run writes: s3://bucket/run, or an absolute path on shared storage "
                    "(default: the job's output_dir)")
    sm.add_argument("--working-dir", default=".", help="shipped with the job; must contain the file (default: .)")
    sm.add_argument("--submission-id", help="the job's id on the cluster (default: Ray makes one)")
    sm.add_argument("--wait", action="store_true", help="stream the job's logs until it ends; exit 0 if it "
                    "SUCCEEDED, 1 otherwise")
    jobs = sub.add_parser("jobs", help="list, inspect, follow and stop jobs on a Ray cluster")
    jobs.add_argument("action", choices=["list", "status", "logs", "stop"])
    jobs.add_argument("job_id", nargs="?", help="submission id (status, logs, stop)")
    jobs.add_argument("--follow", action="store_true", help="logs: keep printing until the job ends")
    jobs.add_argument("--address", **address)


def cluster_command(args) -> int:
    from sdpo import submit

    if args.command == "submit":
        sub = submit.build_submission(args.target, tune=args.tune, overrides=args.overrides, output=args.output,
                                      working_dir=args.working_dir)
        job_id = submit.submit(args.address, sub, args.submission_id)
        print(f"submitted {job_id}: {sub.entrypoint}")
        if sub.output:
            print(f"output: {sub.output}")
        print(f"follow it with: sdpo jobs logs {job_id} --follow")
        if not args.wait:
            return 0
        status = submit.follow(args.address, job_id)
        print(f"job {job_id}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    if args.action == "list":
        print(submit.format_jobs(submit.list_jobs(args.address)))
        return 0
    if not args.job_id:
        raise ConfigError(f"sdpo jobs {args.action} needs a submission id (see sdpo jobs list)")
    c = submit.client(args.address)
    if args.action == "status":
        info = c.get_job_info(args.job_id)
        print(f"{args.job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
    elif args.action == "logs":
        if args.follow:
            print(f"job {args.job_id}: {submit.follow(args.address, args.job_id)}")
        else:
            print(c.get_job_logs(args.job_id), end="")
    else:
        stopped = c.stop_job(args.job_id)
        print(f"{args.job_id}: {'stop requested' if stopped else 'not running'}")
    return 0


def report(run_dir: str) -> int:
    # matplotlib and fsspec only: a report never starts or imports Ray
    from sdpo.report import ReportError, write_report

    try:
        result = write_report(run_dir)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.table)
    print(f"report: {result.markdown_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "report":
        return report(args.run_dir)
    if args.command in ("submit", "jobs"):
        try:
            return cluster_command(args)
        except (ConfigError, StorageError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except RuntimeError as err:  # the Job Submission API's errors (unknown id, cluster-side failures)
            print(f"error: {str(err).strip().splitlines()[-1]}", file=sys.stderr)
            return 2
    if args.command == "tune":
        from sdpo.tune import run_tune

        try:
            result = run_tune(args.space, output=args.output, address=args.address)
        except (ConfigError, StorageError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if result["best"] is None:  # a search in which no trial finished is a failed command (and job)
            print("error: no trial completed all its stages (failed trials are listed above)", file=sys.stderr)
            return 1
        return 0
    from sdpo.pipeline import run

    try:
        job = _resumed_job(args) if args.command == "run" and args.resume and not args.job else None
        if job is None:
            if not args.job:
                raise ConfigError("give a job config (or --resume DIR to continue a run with its own)")
            job = load_job(args.job, args.overrides)
        if args.command == "validate":
            with tempfile.TemporaryDirectory(prefix="sdpo-validate-") as tmp:
                run(job, output_dir=args.output or tmp, address=args.address, overwrite=True, plan_only=True)
            print("config and data OK")
        else:
            if args.resume and args.output and args.output != args.resume:
                raise ConfigError("--resume DIR is the run's output directory; drop --output")
            out = args.resume or args.output or job.output_dir
            summary = run(job, output_dir=out, address=args.address, overwrite=args.overwrite,
                          resume=bool(args.resume), force=args.force)
            print(f"final model: {summary['final_model']}")
            print(f"summary: {os.path.join(out, 'summary.json')}")
    except (ConfigError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _resumed_job(args):
    """The job config a run recorded in its manifest (with --set overrides applied on top)."""
    from sdpo import storage
    from sdpo.config import apply_overrides, parse_job
    from sdpo.manifest import MANIFEST

    path = storage.join(args.resume, MANIFEST)
    if not storage.exists(path):
        raise ConfigError(f"cannot resume {args.resume}: it has no {MANIFEST}; give the job config too, or "
                          "start it again with --overwrite")
    return parse_job(apply_overrides(storage.read_json(path)["job"], args.overrides), origin=path)


if __name__ == "__main__":
    sys.exit(main())
