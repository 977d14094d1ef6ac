"""Test helpers: a tiny random Llama with a small BPE tokenizer built offline, tiny datasets, CLI runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tlm_plugin.train import outputs


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ADAPTEVAL_FIXED_DIR", REPO.parent / "shared" / "data" / "adapteval"))
VENV_BIN = Path(sys.executable).parent
CANARY = "ZQXCANARYQZX"

CORPUS = [
    "The river delta is formed by sediment deposited where the river meets the sea.",
    "Interest rates influence the price of bonds and the cost of mortgages.",
    "A patient with a persistent cough and fever should see a doctor for a chest examination.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Compound interest grows savings faster than simple interest over many years.",
    "Mountains affect rainfall because moist air cools as it rises over them.",
    "Antibiotics treat bacterial infections but do not work against viruses.",
    "Diversifying a portfolio reduces the risk of large losses from one asset.",
]
QUESTIONS = [
    ("Explain how a river delta forms.", "Sediment settles where the river slows at the sea."),
    ("What do interest rates change?", "They change bond prices and mortgage costs."),
    ("I have a cough and a fever. What should I do?", "See a doctor for a chest examination."),
    ("What does photosynthesis produce?", "It produces glucose from light energy."),
    ("Why is compound interest powerful?", "Interest earns interest over time."),
    ("How do mountains affect rain?", "Rising air cools and drops rain on the windward side."),
    ("Do antibiotics cure the flu?", "No, the flu is a virus."),
    ("Why diversify investments?", "It lowers the risk of a large loss."),
    ("What is sediment?", "Small particles of rock and soil carried by water."),
    ("What is a bond?", "A loan to a government or company that pays interest."),
    ("What is a fever?", "A body temperature above normal."),
    ("What is glucose?", "A sugar that stores energy."),
]


def _build_tiny_model(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    texts = CORPUS + [q for q, _ in QUESTIONS] + [a for _, a in QUESTIONS] + ["user assistant system\n", CANARY]
    tok.train_from_iterator(texts * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.save_pretrained(path)

    import torch

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)


def write_dataset(directory: Path, rows: list[dict], name: str = "tiny", columns: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(rows), encoding="utf-8")
    info_path = directory / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info[name] = {"file_name": f"{name}.json", **({"columns": columns} if columns else {})}
    info_path.write_text(json.dumps(info), encoding="utf-8")
    return directory


def base_recipe(model_dir: Path, data_dir: Path, output_dir: Path, **overrides) -> dict:
    recipe = {
        "model_name_or_path": str(model_dir),
        "trust_remote_code": False,
        "stage": "tlm",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_target": "q_proj,v_proj",
        "dataset": "tiny",
        "dataset_dir": str(data_dir),
        "template": "chatml",
        "cutoff_len": 256,
        "preprocessing_num_workers": None,
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1.0e-3,
        "num_train_epochs": 1.0,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
        "do_sample": False,
        "max_new_tokens": 8,
        "per_device_eval_batch_size": 4,
        "dataloader_num_workers": 0,
    }
    recipe.update(overrides)
    return {k: v for k, v in recipe.items() if v is not None}


def run_cli(
    recipe: dict, tmp_path: Path, extra_env: dict | None = None, args: list[str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run ``llamafactory-cli train recipe.yaml`` as a user would (fresh process, the venv's bin on PATH)."""
    import yaml

    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "LLAMAFACTORY_VERBOSITY": "WARN",
        "OMP_NUM_THREADS": "1",
        "DISABLE_VERSION_CHECK": "1",
    }
    env.update(extra_env or {})
    cmd = [str(VENV_BIN / "llamafactory-cli"), "train", str(recipe_path), *(args or [])]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def read_jsonl(path: Path) -> list[dict]:
    """Every line of a JSONL file the run wrote (strictly: a torn or missing line is a failure, not dropped)."""
    rows = outputs.read_jsonl(str(path))
    assert len(rows) == sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip()), path
    return rows


def cli_env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "LLAMAFACTORY_VERBOSITY": "WARN",
        "OMP_NUM_THREADS": "1",
        "DISABLE_VERSION_CHECK": "1",
    }


def run_and_kill(recipe: dict, tmp_path: Path, watch: str, at_lines: int) -> int:
    """Start the run, SIGKILL its whole process group once ``output_dir/watch`` has ``at_lines`` lines."""
    import yaml

    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    watched = Path(recipe["output_dir"]) / watch
    proc = subprocess.Popen(
        [str(VENV_BIN / "llamafactory-cli"), "train", str(path)],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if watched.is_file() and len(watched.read_text(encoding="utf-8").splitlines()) >= at_lines:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return len(watched.read_text(encoding="utf-8").splitlines())
