"""The rows a stage-tlm run works on: templated test prompts, an optional pool, and the reference answers.

- Prompts: LLaMA-Factory's unsupervised processing (``input_ids`` = the chat-templated prompt exactly as at generation
  time) plus ``index``, ``user_mask`` (the user's own tokens) and ``loss_mask`` (the ``tlm_loss_tokens`` scope). The
  reference answers are dropped here, so they cannot reach a training batch or a score.
- Pool (``tlm_pool_dataset``): the same processing of other datasets, never cut by ``max_samples`` and never read
  from ``tokenized_path`` (which holds the test set).
- Answers (``tlm_eval_answers``): for each row with a reference answer, the sequence LLaMA-Factory's supervised
  processing builds and a mask of its label tokens (the final turn's, as sft with ``mask_history`` trains on),
  with the answer's UTF-8 byte count, for bits per byte. Used by the no-grad answer pass only.
"""

import copy
import hashlib
import json
import os
from typing import Any

import pyarrow.dataset as pads
from datasets import Dataset
from llamafactory.data import get_dataset
from llamafactory.extras import logging
from llamafactory.extras.constants import IGNORE_INDEX

from tlm_plugin import seam
from tlm_plugin.cache import cache_dir
from tlm_plugin.errors import TLMConfigError
from tlm_plugin.train import outputs
from tlm_plugin.train.token_scope import TemplateScopeError, answer_content_mask, truncated_user_content_mask


logger = logging.get_logger(__name__)

MEDIA_COLUMNS = ("_images", "_videos", "_audios")


def load_aligned(names: list[str], model_args, data_args, training_args) -> Dataset:
    """LLaMA-Factory's aligned rows (``_prompt``, ``_response``, ``_system``, ``_tools``, media) of ``names``."""
    return seam.merged_dataset(names, model_args, data_args, training_args, stage="tlm")


def check_text_only(aligned: Dataset, what: str) -> None:
    """Refuse multimodal rows: their media would be dropped while the template keeps the media tokens."""
    for column in MEDIA_COLUMNS:
        if column in aligned.column_names:
            rows = [i for i, media in enumerate(aligned[column]) if media]
            if rows:
                raise TLMConfigError(
                    f"{what} has {column[1:]} (rows {rows[:5]}...): stage tlm learns from text prompts only and "
                    "would drop the media while the template keeps their placeholder tokens. Use a text dataset."
                )


def prompt_dataset(dataset: Dataset) -> Dataset:
    """Templated ``input_ids`` as at generation time and the row ``index``; every other column is dropped."""
    if dataset is None or len(dataset) == 0:
        raise TLMConfigError("The dataset has no valid prompt (check `dataset` and `dataset_dir`).")
    keep = {"input_ids"}
    dataset = dataset.remove_columns([c for c in dataset.column_names if c not in keep])
    return dataset.add_column("index", list(range(len(dataset))))


def check_prompts(prompts: Dataset, template, tokenizer) -> None:
    """Refuse a dataset whose prompts are all empty (only the chat template's own tokens are left)."""
    empty, _ = template.encode_oneturn(
        tokenizer, [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    )
    empty_rows = [i for i, ids in enumerate(prompts["input_ids"]) if list(ids) == empty]
    if len(empty_rows) == len(prompts):
        raise TLMConfigError(
            f"All {len(prompts)} prompts of the dataset are empty: nothing to learn from. Check the dataset's "
            "columns (alpaca: instruction/input; or `columns` in dataset_info.json)."
        )
    if empty_rows:
        logger.warning_rank0(f"{len(empty_rows)} prompts are empty (rows {empty_rows[:10]}...); they are kept.")


def with_masks(
    prompts: Dataset, aligned: Dataset, template, tokenizer, cutoff_len: int, loss_tokens: str, what: str
) -> Dataset:
    """Add ``user_mask`` (1 = a token of the user's own content) and ``loss_mask`` (the scope of S(x) and the loss).

    With ``loss_tokens == "user"`` the loss mask is the user mask and a template without a user slot is an error;
    otherwise the loss mask covers every prompt token and such a template only leaves out ``log_ppl_user``.
    Each mask comes from the template's own encoding and is checked against the processed ids token for token.
    """
    required = loss_tokens == "user"

    def unavailable(reason: str) -> Dataset:
        if required:
            raise TLMConfigError(f"tlm_loss_tokens: user ({what}): {reason}")
        logger.warning_rank0(f"No user-token log-perplexity (log_ppl_user) for {what}: {reason}")
        return prompts.add_column("loss_mask", [[1] * len(ids) for ids in prompts["input_ids"]])

    if len(aligned) != len(prompts):
        return unavailable(
            f"{len(aligned)} dataset rows but {len(prompts)} processed prompts (LLaMA-Factory dropped invalid "
            "rows); fix the dataset or use tlm_loss_tokens: prompt."
        )
    masks = []
    for i, row in enumerate(aligned):
        messages = row["_prompt"] + (row["_response"] if len(row["_response"]) == 1 else [])
        try:
            ids, mask = truncated_user_content_mask(
                template, tokenizer, messages, cutoff_len, row["_system"] or None, row["_tools"] or None
            )
        except TemplateScopeError as err:
            return unavailable(f"not available for this template: {err}")
        if ids != list(prompts[i]["input_ids"]):
            return unavailable(f"row {i}'s encoding differs from LLaMA-Factory's.")
        if sum(mask) < 2:  # a log-perplexity needs at least one predicted user token after the first
            mask = [1] * len(ids)
        masks.append(mask)
    prompts = prompts.add_column("user_mask", masks)
    loss = masks if required else [[1] * len(m) for m in masks]
    return prompts.add_column("loss_mask", loss)


def load_prompts(template, model_args, data_args, training_args, tokenizer_module, loss_tokens: str):
    """(prompts, eval rows or None, aligned rows) of the recipe's ``dataset``.

    The eval rows (``input_ids`` and the reference ``labels``, for the prediction files) are the test prompts
    themselves, or with ``eval_dataset`` naming other datasets (offline mode), those datasets processed the same way.
    """
    aligned = load_aligned(data_args.dataset, model_args, data_args, training_args)
    check_text_only(aligned, f"dataset {','.join(data_args.dataset)}")
    train_args = copy.copy(data_args)
    train_args.eval_dataset = None
    module = get_dataset(template, model_args, train_args, training_args, stage="tlm", **tokenizer_module)
    processed = module["train_dataset"]
    prompts = prompt_dataset(processed)
    tokenizer = tokenizer_module["tokenizer"]
    check_prompts(prompts, template, tokenizer)
    prompts = with_masks(prompts, aligned, template, tokenizer, data_args.cutoff_len, loss_tokens, "the test prompts")
    eval_rows = None
    if training_args.do_predict:
        if data_args.eval_dataset in (None, data_args.dataset):
            eval_rows = processed
        else:
            eval_args = copy.copy(data_args)
            eval_args.dataset, eval_args.eval_dataset = list(data_args.eval_dataset), None
            try:
                eval_rows = get_dataset(
                    template, model_args, eval_args, training_args, stage="tlm", **tokenizer_module
                )
            except ValueError as err:
                raise TLMConfigError(f"eval_dataset {','.join(data_args.eval_dataset)}: {err}") from err
            eval_rows = eval_rows["train_dataset"]
        eval_rows = eval_rows.remove_columns([c for c in eval_rows.column_names if c not in ("input_ids", "labels")])
    return prompts, eval_rows, aligned


POOL_FILE_TYPES = (".json", ".jsonl", ".parquet", ".csv", ".arrow")


def pool_dataset_names(names: str, data_args) -> tuple[list[str], str]:
    """The dataset names of ``tlm_pool_dataset`` and the ``dataset_dir`` to read them from.

    Names from ``dataset_info.json`` as usual; or one data file (``.jsonl``/``.json``/``.parquet``/``.csv``/``.arrow``),
    described by a ``dataset_info.json`` written beside the run's cache: alpaca columns (``instruction``/``input``/
    ``output``), a ``text`` column (prompts only), or chat ``messages`` (role/content) / ``conversations``
    (from/value, ShareGPT), as read from its first row.
    """
    listed = [name.strip() for name in names.split(",") if name.strip()]
    if len(listed) != 1 or not listed[0].lower().endswith(POOL_FILE_TYPES):
        return listed, data_args.dataset_dir
    path = os.path.abspath(os.path.expanduser(listed[0]))
    if not os.path.isfile(path):
        raise TLMConfigError(f"tlm_pool_dataset: the file {path} does not exist.")
    entry = {"file_name": path, **_file_columns(path)}
    folder = os.path.join(str(cache_dir()), "pool-datasets", hashlib.sha256(path.encode()).hexdigest()[:16])
    os.makedirs(folder, exist_ok=True)
    outputs.atomic_write(os.path.join(folder, "dataset_info.json"), json.dumps({"tlm_pool": entry}, indent=2))
    return ["tlm_pool"], folder


def _file_columns(path: str) -> dict[str, Any]:
    """dataset_info.json's description of a pool file, from the column names of its first row."""
    kind = {".jsonl": "json", ".json": "json"}.get(os.path.splitext(path)[1].lower(), None)
    if kind == "json":
        with open(path, encoding="utf-8") as f:
            head = f.read(1 << 20).lstrip()
        try:
            first = json.loads(head.splitlines()[0]) if not head.startswith("[") else None
        except (json.JSONDecodeError, IndexError) as err:
            raise TLMConfigError(f"tlm_pool_dataset {path}: line 1 is not a JSON object: {err}") from err
        if first is None:  # a JSON array: the first element
            decoder = json.JSONDecoder()
            try:
                first = decoder.raw_decode(head[1:].lstrip())[0]
            except json.JSONDecodeError as err:
                raise TLMConfigError(
                    f"tlm_pool_dataset {path}: the first element is not a JSON object: {err}"
                ) from err
        keys = set(first) if isinstance(first, dict) else set()
    else:
        fmt = {".parquet": "parquet", ".csv": "csv", ".arrow": "ipc"}[os.path.splitext(path)[1].lower()]
        keys = set(pads.dataset(path, format=fmt).schema.names)
    if "messages" in keys:
        tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
        return {
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {**tags, "system_tag": "system"},
        }
    if "conversations" in keys:
        return {"formatting": "sharegpt", "columns": {"messages": "conversations"}}
    if "instruction" in keys:
        columns = {"prompt": "instruction"}
        columns.update({k: v for k, v in (("query", "input"), ("response", "output")) if v in keys})
        return {"columns": columns}
    if "text" in keys:
        return {"columns": {"prompt": "text"}}
    raise TLMConfigError(
        f"tlm_pool_dataset {path}: its rows have columns {sorted(keys)}; a pool file needs `instruction` (with "
        "`input`/`output`), `text`, `messages` (role/content) or `conversations` (ShareGPT). Other layouts: describe "
        "the file in dataset_info.json and name it instead."
    )


def _pool_args(names: str, data_args):
    pool_args = copy.copy(data_args)
    pool_args.dataset, pool_args.dataset_dir = pool_dataset_names(names, data_args)
    pool_args.eval_dataset, pool_args.val_size = None, 0.0
    pool_args.max_samples, pool_args.tokenized_path = None, None
    pool_args.streaming = False
    return pool_args


def load_pool(
    names: str,
    template,
    model_args,
    data_args,
    training_args,
    tokenizer_module,
    loss_tokens: str,
    lazy: bool = False,
):
    """The ``tlm_pool_dataset`` rows as training rows.

    A pool row with a response (a question and its answer, a document in chat form) is the whole exchange as
    LLaMA-Factory's supervised processing encodes it: the update learns the prompt and the answer (``tlm_loss_tokens:
    user``: the user's content and the answer's tokens). A row without one is a templated prompt, as for the test set.

    ``lazy``: a :class:`LazyPool` (for a sentence-encoder embedder, which needs no LLM pass over the pool): the
    aligned rows stay in Arrow on disk and a row is tokenised when it is picked, so a pool of millions costs no
    up-front processing.
    """
    pool_args = _pool_args(names, data_args)
    try:
        aligned = load_aligned(pool_args.dataset, model_args, pool_args, training_args)
        if aligned is None or len(aligned) == 0:
            raise ValueError("no rows")
        module = None
        if not lazy:
            module = get_dataset(template, model_args, pool_args, training_args, stage="tlm", **tokenizer_module)
    except ValueError as err:
        raise TLMConfigError(f"tlm_pool_dataset {names!r} could not be read, or has no rows: {err}") from err
    if module is not None and (module.get("train_dataset") is None or len(module["train_dataset"]) == 0):
        raise TLMConfigError(f"tlm_pool_dataset {names!r} has no rows: the pool selectors need rows to pick from.")
    check_text_only(aligned, f"tlm_pool_dataset {names}")
    tokenizer = tokenizer_module["tokenizer"]
    if lazy:
        return LazyPool(aligned, template, tokenizer, pool_args, loss_tokens, names)
    answered = [_answered(r) for r in aligned["_response"]]
    if not any(answered):
        pool = prompt_dataset(module["train_dataset"])
        return with_masks(pool, aligned, template, tokenizer, pool_args.cutoff_len, loss_tokens, "the pool")
    encode = PoolRowEncoder(template, tokenizer, pool_args, loss_tokens, names)
    return Dataset.from_list([encode(row, i) for i, row in enumerate(aligned)])


def _answered(response) -> bool:
    return len(response) == 1 and bool((response[0].get("content") or "").strip())


class PoolRowEncoder:
    """One aligned pool row -> ``input_ids``, ``loss_mask``, ``user_mask``, ``index``: the whole exchange as sft
    encodes it when the row has an answer, else the templated prompt (as at generation time)."""

    def __init__(self, template, tokenizer, data_args, loss_tokens: str, names: str) -> None:
        processor_cls = seam.resolve("llamafactory.data.processor.supervised.SupervisedDatasetProcessor")
        sft_args = copy.copy(data_args)
        sft_args.mask_history, sft_args.train_on_prompt = True, False
        self.supervised = processor_cls(template=template, tokenizer=tokenizer, processor=None, data_args=sft_args)
        self.unsupervised = seam.resolve("llamafactory.data.processor.unsupervised.UnsupervisedDatasetProcessor")(
            template=template, tokenizer=tokenizer, processor=None, data_args=data_args
        )
        self.template, self.tokenizer, self.loss_tokens, self.names = template, tokenizer, loss_tokens, names

    def __call__(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        batch = {k: [v] for k, v in row.items()}
        if _answered(row["_response"]):
            encoded = self.supervised.preprocess_dataset(batch)
            ids, labels = encoded["input_ids"][0], encoded["labels"][0]
            answer = [int(lab != IGNORE_INDEX) for lab in labels]
            source_len = answer.index(1) if 1 in answer else len(ids)
        else:
            ids = self.unsupervised.preprocess_dataset(batch)["input_ids"][0]
            answer, source_len = [0] * len(ids), len(ids)
        try:
            _, user = truncated_user_content_mask(
                self.template,
                self.tokenizer,
                row["_prompt"] + [{"role": "assistant", "content": ""}],
                10**9,
                row["_system"] or None,
                row["_tools"] or None,
            )
            user = (user + [0] * len(ids))[:source_len] + [0] * (len(ids) - source_len)
        except TemplateScopeError as err:
            if self.loss_tokens == "user":
                raise TLMConfigError(f"tlm_loss_tokens: user (tlm_pool_dataset {self.names}): {err}") from err
            user = [0] * len(ids)
        scope = [max(u, a) for u, a in zip(user, answer)] if self.loss_tokens == "user" else [1] * len(ids)
        return {"input_ids": ids, "loss_mask": scope, "user_mask": user, "index": index}


class LazyPool:
    """A pool kept as LLaMA-Factory's aligned rows (Arrow, memory-mapped) and encoded when a row is picked.

    Quacks like the eager pool's ``Dataset`` where the pool selectors read it: ``len``, ``pool[i]`` (a row's
    ``input_ids``, ``loss_mask``, ``user_mask``) and ``select(rows)`` (a ``Dataset`` of those rows, in that order,
    repeats kept). :meth:`texts` gives the text a sentence encoder embeds, a slice at a time.
    """

    def __init__(self, aligned: Dataset, template, tokenizer, data_args, loss_tokens: str, names: str) -> None:
        self.aligned, self.names = aligned, names
        self.encode = PoolRowEncoder(template, tokenizer, data_args, loss_tokens, names)

    def __len__(self) -> int:
        return len(self.aligned)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"pool row {index} is out of range (the pool has {len(self)} rows)")
        return self.encode(self.aligned[index], index)

    def select(self, rows) -> Dataset:
        return Dataset.from_list([self[r] for r in rows])

    def texts(self, start: int, stop: int) -> list[str]:
        """The encoder text of rows ``[start, stop)``: the prompt's messages, and the answer where there is one."""
        part = self.aligned[start:stop]
        return [
            message_text(prompt + (response if _answered(response) else []))
            for prompt, response in zip(part["_prompt"], part["_response"])
        ]


def message_text(messages: list[dict[str, Any]]) -> str:
    """What a sentence encoder reads of a conversation: its messages' contents, one per line."""
    return "\n".join(m.get("content") or "" for m in messages)


def answer_rows(aligned: Dataset, encoder: "Encoder") -> list[dict[str, Any]]:
    """For each row with a reference answer: ``index`` and :meth:`Encoder.answer_row`; rows without one are left out
    (the caller counts them)."""
    rows = []
    for i, row in enumerate(aligned):
        response = row["_response"]
        if len(response) != 1 or not (response[0].get("content") or "").strip() or len(row["_prompt"]) % 2 != 1:
            continue
        encoded = encoder.answer_row(row["_prompt"], response[0]["content"], row["_system"], row["_tools"])
        if encoded is not None:
            rows.append({"index": i, **encoded})
    return rows


class Encoder:
    """Encodes new conversations the way LLaMA-Factory's processors encode dataset rows (per-prompt sources:
    generated examples, in-context demonstrations, their prompts and reference answers)."""

    def __init__(self, template, tokenizer, data_args) -> None:
        self.template, self.tokenizer, self.cutoff_len = template, tokenizer, data_args.cutoff_len
        sft_args = copy.copy(data_args)
        sft_args.mask_history, sft_args.train_on_prompt = True, False
        self.sft = seam.resolve("llamafactory.data.processor.supervised.SupervisedDatasetProcessor")(
            template=template, tokenizer=tokenizer, processor=None, data_args=sft_args
        )
        every_answer = copy.copy(data_args)
        every_answer.mask_history, every_answer.train_on_prompt = False, False
        self.sft_all = seam.resolve("llamafactory.data.processor.supervised.SupervisedDatasetProcessor")(
            template=template, tokenizer=tokenizer, processor=None, data_args=every_answer
        )
        self.prompt = seam.resolve("llamafactory.data.processor.unsupervised.UnsupervisedDatasetProcessor")(
            template=template, tokenizer=tokenizer, processor=None, data_args=data_args
        )

    @staticmethod
    def _row(messages: list[dict], answer: str | None, system: str | None, tools: str | None) -> dict[str, list]:
        response = [{"role": "assistant", "content": answer}] if answer is not None else []
        return {
            "_prompt": [messages],
            "_response": [response],
            "_system": [system or ""],
            "_tools": [tools or ""],
            "_images": [None],
            "_videos": [None],
            "_audios": [None],
        }

    def prompt_ids(self, messages: list[dict], system: str | None = None, tools: str | None = None) -> list[int]:
        """The templated prompt as at generation time (the assistant header included)."""
        return self.prompt.preprocess_dataset(self._row(messages, None, system, tools))["input_ids"][0]

    def answer_row(self, messages: list[dict], answer: str, system: str | None = None, tools: str | None = None):
        """The sequence LLaMA-Factory's supervised processor builds for prompt + reference answer (with
        ``mask_history``: only the final answer is a target) and what measuring it needs: ``input_ids``,
        ``answer_mask`` (the answer's tokens and the template's closing tokens, truncated by ``cutoff_len`` as sft
        truncates them), ``answer_content_mask`` (the answer's own content tokens, from the template's encoding of
        the assistant turn; all zero when that cannot be rebuilt or the row was truncated), ``answer_bytes``,
        ``answer_truncated``. None when the processor drops the row."""
        encoded = self.exchange(messages, answer, system, tools)
        if encoded is None:
            return None
        ids, mask = encoded
        full = messages + [{"role": "assistant", "content": answer}]
        full_target = self.template.encode_oneturn(self.tokenizer, full, system or None, tools or None)[1]
        truncated = sum(mask) < len(full_target) + (1 if self.template.efficient_eos else 0)
        content = [0] * len(ids)
        if not truncated:
            try:
                full_ids, content_mask = answer_content_mask(
                    self.template, self.tokenizer, full, system or None, tools or None
                )
                if full_ids == ids[: len(full_ids)]:
                    content = content_mask + [0] * (len(ids) - len(content_mask))
            except TemplateScopeError:
                pass
        return {
            "input_ids": ids,
            "answer_mask": mask,
            "answer_content_mask": content,
            "answer_bytes": len(answer.encode("utf-8")),
            "answer_truncated": truncated,
        }

    def conversation(self, messages: list[dict], system: str | None = None, tools: str | None = None):
        """(input_ids, label mask) of a whole conversation ending with an assistant turn, every assistant turn a
        target (sft without ``mask_history``); user turns, system prompt and template tokens are not."""
        encoded = self.sft_all.preprocess_dataset(self._row(messages[:-1], messages[-1]["content"], system, tools))
        if not encoded["input_ids"]:
            raise ValueError("the conversation could not be encoded (it must alternate user / assistant turns)")
        return encoded["input_ids"][0], [int(lab != IGNORE_INDEX) for lab in encoded["labels"][0]]

    def exchange(self, messages: list[dict], answer: str, system: str | None = None, tools: str | None = None):
        """(input_ids, label mask) of prompt + answer as sft encodes them (labels: the final answer's tokens and
        the template's closing tokens); None when the processor drops the row."""
        encoded = self.sft.preprocess_dataset(self._row(messages, answer, system, tools))
        if not encoded["input_ids"]:
            return None
        return encoded["input_ids"][0], [int(lab != IGNORE_INDEX) for lab in encoded["labels"][0]]


def raw_column(data_args, column: str, n_rows: int) -> list:
    """A column of the recipe's dataset files as written (e.g. the answer options of each row), one value per
    prompt; the files are read as JSON / JSON lines through dataset_info.json."""
    info_path = os.path.join(data_args.dataset_dir, "dataset_info.json")
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as err:
        raise TLMConfigError(f"tlm_gate_options: cannot read {info_path} ({err}).") from err
    values: list = []
    for name in data_args.dataset:
        entry = info.get(name, {})
        path = os.path.join(data_args.dataset_dir, entry.get("file_name", ""))
        if not entry.get("file_name") or not os.path.isfile(path):
            raise TLMConfigError(f"tlm_gate_options reads local JSON files; dataset {name!r} has none ({path}).")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        rows = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
        if any(column not in row for row in rows):
            raise TLMConfigError(f"tlm_gate_options: dataset {name!r} has rows without the column {column!r}.")
        values += [row[column] for row in rows]
    values = values[: data_args.max_samples] if data_args.max_samples else values
    if len(values) != n_rows:
        raise TLMConfigError(
            f"tlm_gate_options: the column {column!r} has {len(values)} rows but the dataset gave {n_rows} prompts "
            "(LLaMA-Factory dropped or sampled rows); use a dataset without such rows."
        )
    bad = [i for i, v in enumerate(values) if not (isinstance(v, list) and all(isinstance(x, str) for x in v))]
    if bad:
        raise TLMConfigError(f"tlm_gate_options: column {column!r} must hold lists of strings (rows {bad[:5]}).")
    return values
