"""Building AdaptEval: a seeded sample of each dataset, written as LLaMA-Factory alpaca files with a
``dataset_info.json`` (so the folder can be LLaMA-Factory's ``dataset_dir``) and a ``manifest.json``.

Output folder::

    <name>.json          list of {"instruction", "input", "output",
                                  "source", "source_version", "source_file", "source_row"}
    dataset_info.json    {<name>: {"file_name": "<name>.json", "formatting": "alpaca",
                                   "columns": {"prompt": "instruction", "query": "input", "response": "output"}}}
    manifest.json        {"format": "adapteval-build/1",
                          "datasets": {<name>: {"bench", "metric", "answer_format", "rows", "seed", "source", ...}}}

Rows may carry their own ``system`` prompt and ``history`` (the few-shot bench, ARC): dataset_info.json then maps those
columns too. Building into a folder that already holds a build adds to it: entries of other datasets are kept.

Selection: rows from the hub or a package are pooled over their parts (e.g. GSM8K train + test), shuffled with
``random.Random(seed)``, and the first ``n`` that format to a valid, not-yet-seen prompt (instruction, input, and the
system prompt and history of rows that carry them) are kept, in shuffled order; ``n`` None keeps every valid distinct
row (the datasets built whole, ``DatasetSpec.complete``). A released fixed file is the benchmark itself: with ``n``
at least its size every row is kept in file order; a smaller ``n`` keeps a seeded sample, still in file order.

Length: with ``cutoff_len`` (``--cutoff-len``; default: the dataset's own, 8192 for ARC, else none) the rows whose
whole sequence is longer are dropped after selection and counted in the manifest (``cutoff_len``,
``dropped_over_cutoff``, ``counted_with``: tokens of ``--tokenizer`` in ``--template``'s encoding, else an upper
bound from the texts' bytes; ``adapteval.lengths``). A dataset built without a cutoff has none of these keys.
"""

import bisect
import hashlib
import json
import logging
import random
from pathlib import Path
from types import ModuleType

from adapteval.datasets._base import DatasetSpec, SourcePart
from adapteval.datasets._packages import install_commands, missing_packages
from adapteval.errors import DataUnavailableError, MissingPackageError
from adapteval.lengths import Lengths, drop_over_cutoff
from adapteval.records import write_json
from adapteval.registry import fixed_path, get_dataset, resolve


logger = logging.getLogger(__name__)

DEFAULT_N = 5000
DEFAULT_SEED = 42
DEFAULT_SHOTS = 5  # demonstrations per prompt of the few-shot bench
DEFAULT_SFT_PER_TASK = 32  # rows per task of arc_sft
MANIFEST_FORMAT = "adapteval-build/1"
DATASET_INFO = "dataset_info.json"
MANIFEST = "manifest.json"
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
ROW_KEYS = ("instruction", "input", "output", "source", "source_version", "source_file", "source_row")
FIXED_SOURCE = "adapteval-fixed"


def build(
    datasets_or_benches: str | list[str],
    out_dir: str | Path,
    n: int | None = None,
    seed: int = DEFAULT_SEED,
    offline: bool = False,
    fixed_dir: str | Path | None = None,
    shots: int = DEFAULT_SHOTS,
    cutoff_len: int | None = None,
    tokenizer: str | None = None,
    template: str | None = None,
    sft_per_task: int = DEFAULT_SFT_PER_TASK,
) -> dict:
    """Build the named datasets and/or benches ("all", "domain,reasoning", ["gsm8k"]) into ``out_dir``.

    ``offline`` builds benches from the offline packs (plus the released files found in ``fixed_dir``) and never
    touches the hub; without it, paper datasets come from the hub unless their released file is in ``fixed_dir``.
    ``n`` rows per dataset (None: ``DEFAULT_N``, or every row of a dataset built whole). ``cutoff_len`` drops the
    rows longer than it (None: each dataset's own default), counted in ``tokenizer``'s tokens in ``template``'s
    encoding when given, else bounded by the texts' bytes. ``sft_per_task``: rows per task of ``arc_sft``.
    Every dataset is built before anything is written, so a failure leaves ``out_dir`` as it was.
    Returns the folder's manifest (the dict written to manifest.json).
    """
    if n is not None and n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if cutoff_len is not None and cutoff_len < 1:
        raise ValueError(f"--cutoff-len must be at least 1, got {cutoff_len}")
    if fixed_dir is not None and not Path(fixed_dir).is_dir():
        raise DataUnavailableError(f"--fixed-dir {fixed_dir} is not a folder")
    lengths = Lengths(tokenizer, template)
    names = resolve(datasets_or_benches, offline=offline, fixed_dir=fixed_dir)
    _check_packages(names, fixed_dir)
    built = {
        name: build_dataset(
            name,
            n=n,
            seed=seed,
            fixed_dir=fixed_dir,
            shots=shots,
            cutoff_len=cutoff_len,
            lengths=lengths,
            sft_per_task=sft_per_task,
        )
        for name in names
    }

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset_info = _read_json_object(out / DATASET_INFO)
    manifest = _read_json_object(out / MANIFEST)
    manifest.setdefault("format", MANIFEST_FORMAT)
    manifest.setdefault("datasets", {})
    for name, (rows, record) in built.items():
        file_name = f"{name}.json"
        write_json(out / file_name, rows)
        record["file"] = file_name
        record["sha256"] = _sha256(out / file_name)
        columns = dict(
            ALPACA_COLUMNS, **{key: key for key in ("history", "system") if any(key in row for row in rows)}
        )
        dataset_info[name] = {"file_name": file_name, "formatting": "alpaca", "columns": columns}
        manifest["datasets"][name] = record
        logger.info("adapteval: wrote %s (%d rows) to %s", file_name, len(rows), out)
    write_json(out / DATASET_INFO, dataset_info)
    write_json(out / MANIFEST, manifest)
    return manifest


def _check_packages(names: list[str], fixed_dir) -> None:
    """One error naming every missing package of the offline packs asked for, before anything is built."""
    needed = {}
    for name in names:
        spec: DatasetSpec = get_dataset(name).SPEC
        if fixed_path(spec, fixed_dir) is None:
            for package in spec.packages:
                needed.setdefault(package, []).append(name)
    missing = missing_packages(needed)
    if missing:
        which = "; ".join(f"{package} for {', '.join(needed[package])}" for package in missing)
        raise MissingPackageError(
            f"the offline AdaptEval packs need packages that are not installed ({which}): "
            f"run `{install_commands(missing)}`, or install everything at once with "
            f"`pip install 'llamafactory-tlm[offline]' && {install_commands(['evals'])}`"
        )


def build_dataset(
    name: str,
    n: int | None = None,
    seed: int = DEFAULT_SEED,
    fixed_dir: str | Path | None = None,
    shots: int = DEFAULT_SHOTS,
    cutoff_len: int | None = None,
    lengths: Lengths | None = None,
    sft_per_task: int = DEFAULT_SFT_PER_TASK,
) -> tuple[list[dict], dict]:
    """The rows of one dataset and its manifest record, without writing anything (arguments as ``build``'s)."""
    module = get_dataset(name)
    spec: DatasetSpec = module.SPEC
    if n is None and not spec.complete:
        n = DEFAULT_N
    path = fixed_path(spec, fixed_dir)
    options = {"per_task": sft_per_task} if spec.per_task else {}
    if spec.shots:  # K demonstrations first, then n test rows that are never among them
        if shots < 1:
            raise ValueError(f"--shots must be at least 1 for {name}, got {shots}")
        rows, record = _from_source(module, n + shots, seed)
        demos, rows = rows[:shots], rows[shots:]
        history = [[user_turn(d), d["output"]] for d in demos]
        rows = [{**row, "history": history} for row in rows]
        record.update(
            shots=shots,
            demonstration_rows=[d["source_row"] for d in demos],
            demonstrations="the first K distinct valid rows of the seeded order; the test rows follow them",
        )
    elif path is not None:  # a paper dataset: never built whole, so n is set
        rows, record = _from_fixed_file(path, n, seed)
    else:
        rows, record = _from_source(module, n, seed, options)
    cutoff_len = spec.cutoff_len if cutoff_len is None else cutoff_len
    if cutoff_len is not None:
        lengths = lengths or Lengths()
        rows, dropped = drop_over_cutoff(rows, cutoff_len, lengths.count)
        record.update(cutoff_len=cutoff_len, dropped_over_cutoff=len(dropped), counted_with=lengths.counted_with)
        if any("task_id" in row for row in dropped):
            record["dropped_tasks"] = sorted({row["task_id"] for row in dropped})
    return rows, {
        "title": spec.title,
        "bench": spec.bench,
        "metric": spec.metric,
        "answer_format": spec.answer_format,
        "rows": len(rows),
        "n_requested": n,
        "seed": seed,
        **record,
        "builder": module.__name__,
        "builder_version": module.VERSION,
    }


def user_turn(row: dict) -> str:
    """The user turn of an alpaca row as LLaMA-Factory builds it: instruction, then the input on a new line."""
    return f"{row['instruction']}\n{row['input']}" if row.get("input") else row["instruction"]


def _from_source(module: ModuleType, n: int | None, seed: int, options: dict | None = None) -> tuple[list[dict], dict]:
    spec: DatasetSpec = module.SPEC
    try:
        parts: list[SourcePart] = module.load_parts(n, seed, **(options or {}))
    except DataUnavailableError as err:
        released = f" (released file name: {spec.fixed_file})" if spec.fixed_file else ""
        raise type(err)(f"{spec.name}: {err}{released}") from err

    offsets = [0]
    for part in parts:
        offsets.append(offsets[-1] + len(part.rows))
    order = list(range(offsets[-1]))
    random.Random(seed).shuffle(order)

    rows: list[dict] = []
    seen: set[tuple[str, str]] = set()
    skipped_invalid = skipped_duplicate = examined = 0
    for position in order:
        if len(rows) == n:
            break
        examined += 1
        part_index = bisect.bisect_right(offsets, position) - 1
        part, row_index = parts[part_index], position - offsets[part_index]
        formatted = module.format_row(part.rows[row_index])
        if formatted is None:
            skipped_invalid += 1
            continue
        key = (formatted["instruction"], formatted["input"], formatted.get("system"), _history_key(formatted))
        if key in seen:
            skipped_duplicate += 1
            continue
        seen.add(key)
        rows.append(
            {
                **formatted,
                "source": part.source,
                "source_version": part.version,
                "source_file": part.file,
                "source_row": row_index,
            }
        )
    return rows, {
        "source_kind": "hub" if spec.needs_hub else "package",
        "source": spec.source,
        "parts": [
            {"source": part.source, "version": part.version, "file": part.file, "rows": len(part.rows), **part.counts}
            for part in parts
        ],
        "selection": f"random.Random({seed}).shuffle over {offsets[-1]} pooled rows; first valid distinct rows kept",
        "rows_examined": examined,
        "skipped_invalid": skipped_invalid,
        "skipped_duplicate": skipped_duplicate,
    }


def _from_fixed_file(path: Path, n: int, seed: int) -> tuple[list[dict], dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataUnavailableError(f"cannot read the released file {path}: {err}") from err
    if not isinstance(data, list):
        raise DataUnavailableError(f"{path}: expected a JSON list of alpaca rows, got {type(data).__name__}")
    for index, row in enumerate(data):
        for key in ("instruction", "input", "output"):
            if not isinstance(row, dict) or not isinstance(row.get(key), str):
                raise DataUnavailableError(f"{path}: row {index} has no string {key!r}")

    if n >= len(data):
        indices = list(range(len(data)))
        selection = "all rows, in file order"
    else:
        indices = sorted(random.Random(seed).sample(range(len(data)), n))
        selection = f"random.Random({seed}).sample of {n} of {len(data)} rows, kept in file order"
    digest = _sha256(path)
    rows = [
        {
            "instruction": data[index]["instruction"],
            "input": data[index]["input"],
            "output": data[index]["output"],
            "source": FIXED_SOURCE,
            "source_version": digest[:12],
            "source_file": path.name,
            "source_row": index,
        }
        for index in indices
    ]
    return rows, {
        "source_kind": "fixed",
        "source": str(path),
        "source_sha256": digest,
        "parts": [{"source": FIXED_SOURCE, "version": digest[:12], "file": path.name, "rows": len(data)}],
        "selection": selection,
    }


def _history_key(row: dict) -> tuple | None:
    history = row.get("history")
    return None if history is None else tuple(tuple(turn) for turn in history)


def _read_json_object(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(
            f"{path} exists but is not valid JSON ({err}); remove it or build into another folder"
        ) from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} exists but is not a JSON object; remove it or build into another folder")
    return data


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
