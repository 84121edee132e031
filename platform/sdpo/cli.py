"""The `sdpo` command line: `sdpo run`, `sdpo validate`, `sdpo report`."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from sdpo.config import ConfigError, load_job

CONFIG_HELP = "job config reference: README.md, section 'Job config'"


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="job config (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set training.learning_rate=1e-6 (repeatable)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray instance)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdpo", description="Stepwise DPO on Ray.", epilog=CONFIG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="plan and train an sDPO job", epilog=CONFIG_HELP)
    _job_args(run)
    run.add_argument("--output", help="output directory (default: the job's output_dir)")
    run.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    val = sub.add_parser("validate", help="check the config and the data, print the plan; no training",
                         epilog=CONFIG_HELP)
    _job_args(val)
    val.add_argument("--output", help="keep the ingest results here (default: a temporary directory)")
    rep = sub.add_parser("report", help="write report.md and plots/ for a finished run, print its stage table")
    rep.add_argument("run_dir", help="the run's output directory (local or fsspec URL, e.g. s3://bucket/run)")
    return parser


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
    from sdpo.pipeline import run

    try:
        job = load_job(args.job, args.overrides)
        if args.command == "validate":
            with tempfile.TemporaryDirectory(prefix="sdpo-validate-") as tmp:
                run(job, output_dir=args.output or tmp, address=args.address, overwrite=True, plan_only=True)
            print("config and data OK")
        else:
            summary = run(job, output_dir=args.output, address=args.address, overwrite=args.overwrite)
            print(f"final model: {summary['final_model']}")
            out = args.output or job.output_dir
            print(f"summary: {os.path.join(out, 'summary.json')}")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
