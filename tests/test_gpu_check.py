"""bench/gpu_check.py's own logic, without network or GPU: what a node uses from the bundle, and the bundle's files.

The bundle itself (``--prepare``, PyPI) and its run on a node without network (``--bundle --cpu`` in a network
namespace) are ``make gpu-check-cpu``.
"""

import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import pytest
from tlm_testing import REPO


spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check
spec.loader.exec_module(gpu_check)


def wheel(path: Path, name: str, version: str, requires: list[str]) -> Path:
    dist = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(path / f"{dist}-py3-none-any.whl", "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{name.replace('-', '_')}/__init__.py", "x = 1\n" * 100)
        metadata = [f"Name: {name}", f"Version: {version}"] + [f"Requires-Dist: {r}" for r in requires]
        z.writestr(f"{dist}.dist-info/METADATA", "\n".join(metadata) + "\n")
    return path / f"{dist}-py3-none-any.whl"


def manifest(tmp_path: Path) -> dict:
    entries = []
    for name, version, role, spec, requires in [
        (
            "transformers",
            "5.6.0",
            "core",
            ">=4.55,!=4.57.0,<=5.6.0",
            ["tokenizers (<=0.23.0,>=0.22.0)", "huggingface-hub<2.0,>=1.3.0"],
        ),
        ("accelerate", "1.11.0", "core", ">=1.3,<=1.11.0", []),
        ("peft", "0.18.1", "core", ">=0.18,<=0.18.1", []),
        ("tokenizers", "0.22.2", "core", "", []),
        ("huggingface-hub", "1.33.0", "core", "", []),
        ("datasets", "4.0.0", "needed", ">=3.0,<=4.0.0", []),
        ("llamafactory-tlm", "0.1.0", "project", "", []),
        ("torchaudio", "2.11.0", "torchaudio", "", []),
    ]:
        path = wheel(tmp_path, name, version, requires)
        entries.append({"name": name, "version": version, "role": role, "node_spec": spec, "file": path.name})
    return {"packages": entries}


@pytest.mark.parametrize(
    "node,installed",
    [
        # newer than LLaMA-Factory 0.9.5 supports: the bundle's copies, and what the bundle's transformers needs
        # where the node's copy does not fit it (tokenizers 0.23.2 > 0.23.0, huggingface-hub 2.1 >= 2.0)
        (
            {
                "transformers": "5.17.0",
                "accelerate": "1.15.0",
                "peft": "0.19.0",
                "tokenizers": "0.23.2",
                "huggingface-hub": "2.1.0",
                "datasets": None,
                "torch": "2.11.0",
                "torchaudio": "2.11.0",
            },
            {"transformers", "accelerate", "peft", "tokenizers", "huggingface-hub", "datasets", "llamafactory-tlm"},
        ),
        # inside the bounds: the node's own; datasets too new for LLaMA-Factory: the bundle's
        (
            {
                "transformers": "4.57.1",
                "accelerate": "1.11.0",
                "peft": "0.18.0",
                "tokenizers": "0.21.0",
                "huggingface-hub": "0.36.0",
                "datasets": "4.4.0",
                "torch": "2.11.0",
                "torchaudio": None,
            },
            {"datasets", "llamafactory-tlm", "torchaudio"},
        ),
        # 4.57.0 is excluded by the project
        (
            {
                "transformers": "4.57.0",
                "accelerate": "1.3.0",
                "peft": "0.18.1",
                "tokenizers": "0.22.2",
                "huggingface-hub": "1.33.0",
                "datasets": "3.0.0",
                "torch": "2.6.0",
                "torchaudio": "2.6.0",
            },
            {"transformers", "llamafactory-tlm"},
        ),
    ],
)
def test_the_node_keeps_what_is_inside_the_bounds(tmp_path, monkeypatch, node, installed):
    monkeypatch.setattr(gpu_check, "node_version", lambda name: node.get(name))
    chosen, lines = gpu_check.choose(manifest(tmp_path), tmp_path)
    assert {e["name"] for e in chosen} == installed
    assert any(line.startswith("transformers") for line in lines)


def test_a_node_whose_old_torch_has_no_torchaudio_is_told_what_to_bring(tmp_path, monkeypatch):
    node = {"transformers": "5.6.0", "accelerate": "1.11.0", "peft": "0.18.1", "torch": "2.6.0", "torchaudio": None}
    monkeypatch.setattr(gpu_check, "node_version", lambda name: node.get(name))
    with pytest.raises(SystemExit, match="torchaudio.*torch 2.6.0"):
        gpu_check.choose(manifest(tmp_path), tmp_path)


def test_stored_wheels_keep_every_member_byte_for_byte(tmp_path):
    original = wheel(tmp_path, "demo-pkg", "1.0", ["numpy"])
    copy = tmp_path / "stored" / original.name
    copy.parent.mkdir()
    gpu_check.stored_copy(original, copy)
    with zipfile.ZipFile(original) as a, zipfile.ZipFile(copy) as b:
        assert a.namelist() == b.namelist()
        assert all(a.read(n) == b.read(n) for n in a.namelist())
        assert all(i.compress_type == zipfile.ZIP_STORED for i in b.infolist())


def test_requirements_are_read_from_the_wheel_metadata(tmp_path):
    path = wheel(
        tmp_path,
        "transformers",
        "5.6.0",
        [
            "tokenizers (<=0.23.0,>=0.22.0)",
            "numpy>=1.17",
            "fsspec[http]<=2025.3.0",
            "typer",
            "torch; extra == 'torch'",
        ],
    )
    assert gpu_check.requirements(path) == {
        "tokenizers": "<=0.23.0,>=0.22.0",
        "numpy": ">=1.17",
        "fsspec": "<=2025.3.0",
        "typer": "",
    }  # requirements under a marker (extras) do not count


def test_a_bundle_for_another_python_or_a_torn_copy_is_refused(tmp_path):
    (tmp_path / "payload.tar.xz").write_bytes(b"not the payload")
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    base = {"format": gpu_check.FORMAT, "packages": [], "payload": {"file": "payload.tar.xz", "sha256": "0" * 64}}
    (tmp_path / "manifest.json").write_text(json.dumps({**base, "python": "3.9"}))
    with pytest.raises(SystemExit, match="Python 3.9.*--python-version"):
        gpu_check.install(tmp_path, tmp_path / "site", tmp_path / "unpacked")
    (tmp_path / "manifest.json").write_text(json.dumps({**base, "python": here}))
    with pytest.raises(SystemExit, match="checksum"):
        gpu_check.install(tmp_path, tmp_path / "site", tmp_path / "unpacked")


def test_predictions_without_the_metric_packages_leave_the_metrics_out(monkeypatch, caplog):
    from tlm_plugin.train import generation

    monkeypatch.setattr(generation, "METRIC_PACKAGES", {"tlm_no_such_module": "tlm-no-such-package"})
    monkeypatch.setattr(generation.similarity_metrics, "warned", False, raising=False)
    assert generation.similarity_metrics(None, [[1, 2]], [[1, 2]]) == {}
