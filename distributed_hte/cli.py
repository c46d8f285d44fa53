"""``dhte``: run, validate, simulate, predict, models (the registry), and cluster jobs.

Every user error (bad spec, bad data, unreachable cluster) prints one paragraph and
exits with code 2; ``--debug`` shows the traceback. A fit that did not converge exits
with code 3 when the spec sets ``train.require_convergence`` (``ConvergenceError``; the
run's outputs are written first). Exit codes come from ``UserError.exit_code``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

from distributed_hte.errors import UserError
from distributed_hte.runtime import TERMINAL_HIDDEN


def _cmd_run(args: argparse.Namespace) -> int:
    from distributed_hte.runner import run_job
    from distributed_hte.runtime import shutdown_ray
    from distributed_hte.spec import load_spec

    spec = load_spec(args.spec, args.overrides, as_of=args.as_of)
    try:
        path = run_job(spec, run_dir=args.run_dir, address=args.address, as_of=args.as_of)
    finally:
        shutdown_ray()  # flushes forwarded worker logs before our last line
    print(path, flush=True)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from distributed_hte.spec import load_spec

    failed = 0
    for path in args.specs:
        try:
            spec = load_spec(path, args.overrides)
            print(f"ok      {path}  ({spec.kind}: {spec.name})")
        except UserError as exc:
            failed += 1
            print(f"invalid {path}: {exc}", file=sys.stderr)
    return 2 if failed else 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from distributed_hte.kinds import get_kind
    from distributed_hte.runtime import RayTarget, embedded_num_cpus, init_ray, shutdown_ray
    from distributed_hte.spec import validate_spec

    sim: dict = {"out": args.out}
    for text in args.params:
        from distributed_hte.spec import parse_override

        path, value = parse_override(text)
        sim[".".join(path)] = value
    spec = validate_spec(
        {"name": "simulate", "kind": args.kind, "simulate": sim}, source="(dhte simulate)"
    )
    init_ray(RayTarget(address=args.address, num_cpus=embedded_num_cpus(0)))
    try:
        data = get_kind(args.kind).simulate(spec)
    finally:
        shutdown_ray()
    print(data, flush=True)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import yaml

    from distributed_hte.kinds import get_kind
    from distributed_hte.runtime import RayTarget, embedded_num_cpus, init_ray, shutdown_ray

    run = Path(args.run) if args.run else None
    if args.model:
        from distributed_hte.registry import parse_ref

        name, which = parse_ref(args.model)
        registry = _registry(args)
        version = registry.get(name, which)
        run = registry.local_run(version)
        print(f"{name} version {version.version}: {run}", file=sys.stderr)
    spec_file = run / "spec.yaml"
    if not spec_file.exists():
        raise UserError(f"{run} is not a run directory (no spec.yaml)")
    kind = yaml.safe_load(spec_file.read_text())["kind"]
    init_ray(RayTarget(address=args.address, num_cpus=embedded_num_cpus(0)))
    try:
        info = get_kind(kind).predict(run, args.data, Path(args.out))
    finally:
        shutdown_ray()
    print(json.dumps(info), file=sys.stderr)
    print(info["out"], flush=True)
    return 0


def _registry(args: argparse.Namespace):
    import os

    from distributed_hte.registry import Registry, resolve_uri

    uri = args.registry or os.environ.get("MLFLOW_TRACKING_URI") or "runs"
    return Registry(resolve_uri(uri))


def _cmd_models(args: argparse.Namespace) -> int:
    from distributed_hte.registry import CHAMPION, parse_ref

    registry = _registry(args)
    if args.action == "list":
        versions = registry.versions(args.name)
        history = registry.history(args.name)
        print(
            f"{'version':>7}  {'aliases':<20} {'converged':<9} {'promoted':<8} {'as_of':<12} run_dir"
        )
        for v in versions:
            print(
                f"{v.version:>7}  {','.join(v.aliases) or '-':<20} "
                f"{v.tags.get('converged', '?'):<9} {v.tags.get('promoted', '-'):<8} "
                f"{v.tags.get('as_of', '-'):<12} {v.run_dir}"
            )
        print(f"champion history: {history}", file=sys.stderr)
    elif args.action == "show":
        name, which = parse_ref(args.name)
        print(json.dumps(registry.get(name, which).as_dict(), indent=2))
    elif args.action == "promote":
        if args.version is None:
            raise UserError("dhte models promote NAME VERSION: give the version to promote")
        previous = registry.promote(args.name, args.version)
        print(f"{args.name}: {CHAMPION} is version {args.version} (was {previous})")
    elif args.action == "rollback":
        current, previous = registry.rollback(args.name)
        print(f"{args.name}: {CHAMPION} rolled back from version {current} to {previous}")
    return 0


def _cmd_export_bundle(args: argparse.Namespace) -> int:
    import yaml

    from distributed_hte.kinds import get_kind

    run = Path(args.run).expanduser().resolve()
    spec_file = run / "spec.yaml"
    if not spec_file.exists():
        raise UserError(f"{run} is not a run directory (no spec.yaml)")
    if (run / "model" / "bundle.json").exists():
        print(run / "model" / "bundle.json", flush=True)
        return 0
    if not (run / "model" / "predictor.pt").exists():
        raise UserError(f"{run} has no model/predictor.pt to convert")
    kind = get_kind(yaml.safe_load(spec_file.read_text())["kind"])
    export = getattr(kind, "export_legacy", None)
    if export is None:
        raise UserError(
            f"runs of kind {kind.name!r} written before model bundles cannot be converted; "
            f"run the spec again: dhte run {spec_file}"
        )
    export(run)
    print(run / "model" / "bundle.json", flush=True)
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from distributed_hte.jobs import submit_job

    job_id = submit_job(args.spec, args.overrides, args.address, wait=args.wait)
    print(job_id, flush=True)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from distributed_hte.jobs import job_status

    print(job_status(args.address, args.job_id), flush=True)
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    from distributed_hte.jobs import job_logs

    job_logs(args.address, args.job_id, follow=args.follow)
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    from distributed_hte.jobs import stop_job

    print(stop_job(args.address, args.job_id), flush=True)
    return 0


REGISTRY_HELP = (
    "MLflow tracking URI, or the outputs.dir folder of an embedded registry "
    "(default: $MLFLOW_TRACKING_URI, else ./runs)"
)


TERMINAL_HANDLER = "dhte-terminal"
VERBOSE_HELP = "also show Ray's own output on the terminal (run.log always keeps it)"


class TerminalFilter(logging.Filter):
    """Keep Ray's output and Python warnings off the terminal; run.log still gets them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(
            record.name == hidden or record.name.startswith(hidden + ".")
            for hidden in TERMINAL_HIDDEN
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dhte", description="Ray-distributed training of causal and marketing models."
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("--verbose", "-v", action="store_true", help=VERBOSE_HELP)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser(
        "run", help="run a job spec (embedded local Ray unless --address / RAY_ADDRESS)"
    )
    r.add_argument("spec")
    r.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.epochs=2")
    # also after the subcommand, where users type it; SUPPRESS keeps a top-level -v
    r.add_argument(
        "--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
    )
    r.add_argument("--run-dir", help="write exactly here (resumes a failed run in it)")
    r.add_argument(
        "--address",
        help="Ray cluster address (default: $RAY_ADDRESS, runtime.address, or embedded)",
    )
    r.add_argument(
        "--as-of",
        help="a schedule tick (e.g. 2026-11-24): fills {as_of} in the spec and names the run "
        "<outputs.dir>/<name>/as-of-<tick>, so a tick that fires twice trains once",
    )
    r.set_defaults(fn=_cmd_run)

    v = sub.add_parser("validate", help="validate specs without running anything")
    v.add_argument("specs", nargs="+")
    v.add_argument(
        "--set", dest="overrides", action="append", default=[], help="key.path=value override"
    )
    v.set_defaults(fn=_cmd_validate)

    s = sub.add_parser("simulate", help="write a simulated dataset with ground truth")
    s.add_argument("kind")
    s.add_argument(
        "params", nargs="*", help="simulate-section values, e.g. n_rows=1000000 beta=nonlinear"
    )
    s.add_argument(
        "--out", required=True, help="output folder (gets data/, truth/, simulation.json)"
    )
    s.add_argument("--address")
    s.set_defaults(fn=_cmd_simulate)

    pr = sub.add_parser("predict", help="score a dataset with a complete run's model")
    which = pr.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="run directory")
    which.add_argument(
        "--model", help="a registered version: NAME@champion, NAME@challenger, NAME@VERSION"
    )
    pr.add_argument("--registry", help=REGISTRY_HELP)
    pr.add_argument("--data", required=True, help="parquet file or folder")
    pr.add_argument("--out", required=True, help="output parquet folder (must not exist)")
    pr.add_argument("--address")
    pr.set_defaults(fn=_cmd_predict)

    mo = sub.add_parser("models", help="the model registry: list, show, promote, rollback")
    mo.add_argument("action", choices=["list", "show", "promote", "rollback"])
    mo.add_argument("name", help="registered model name (show: NAME@ALIAS or NAME@VERSION)")
    mo.add_argument("version", nargs="?", type=int, help="promote: the version")
    mo.add_argument("--registry", help=REGISTRY_HELP)
    mo.set_defaults(fn=_cmd_models)

    ex = sub.add_parser(
        "export-bundle",
        help="convert a run saved by an older version (pickled model/predictor.pt) to a model bundle",
    )
    ex.add_argument("run", help="run directory")
    ex.set_defaults(fn=_cmd_export_bundle)

    sb = sub.add_parser("submit", help="submit a spec to a Ray cluster (Ray Jobs API)")
    sb.add_argument("spec")
    sb.add_argument("overrides", nargs="*")
    sb.add_argument("--address", required=True, help="dashboard address, e.g. http://HEAD:8265")
    sb.add_argument(
        "--wait", action="store_true", help="wait for the job to end and exit non-zero if it failed"
    )
    sb.set_defaults(fn=_cmd_submit)

    for name, fn, helptext in [
        ("status", _cmd_status, "status of a submitted job"),
        ("logs", _cmd_logs, "logs of a submitted job"),
        ("stop", _cmd_stop, "stop a submitted job"),
    ]:
        c = sub.add_parser(name, help=helptext)
        c.add_argument("job_id")
        c.add_argument("--address", required=True, help="dashboard address, e.g. http://HEAD:8265")
        if name == "logs":
            c.add_argument("--follow", "-f", action="store_true")
        c.set_defaults(fn=fn)
    return p


def _log_to_terminal(debug: bool, verbose: bool) -> None:
    """Our stage and progress lines on stderr; Ray's output and warnings only if verbose."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for old in [h for h in root.handlers if h.name == TERMINAL_HANDLER]:
        root.removeHandler(old)  # main() called again in one process (tests)
    handler = logging.StreamHandler(sys.stderr)
    handler.name = TERMINAL_HANDLER
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    if not (verbose or debug):
        handler.addFilter(TerminalFilter())
    root.addHandler(handler)
    # warnings (ours, Ray's, torch's) become log records, so run.log keeps them
    logging.captureWarnings(True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_to_terminal(debug=args.debug, verbose=args.verbose)
    try:
        return args.fn(args)
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
