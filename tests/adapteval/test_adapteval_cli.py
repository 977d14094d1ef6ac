"""The ``adapteval`` command line."""

import argparse
import json

from adapteval import cli


def test_build_offline_writes_a_dataset_dir(tmp_path, capsys):
    code = cli.main(["build", "--bench", "reasoning", "--out", str(tmp_path), "--n", "8", "--seed", "3", "--offline"])
    assert code == 0
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(info) == set(manifest["datasets"]) == {"gsm_symbolic", "logiqa_evals"}
    assert info["gsm_symbolic"] == {
        "file_name": "gsm_symbolic.json",
        "formatting": "alpaca",
        "columns": {"prompt": "instruction", "query": "input", "response": "output"},
    }
    assert manifest["datasets"]["logiqa_evals"]["seed"] == 3
    printed = capsys.readouterr().out
    assert "gsm_symbolic" in printed and "logiqa_evals" in printed


def test_a_second_build_into_the_same_folder_adds_to_it(tmp_path):
    assert cli.main(["build", "--bench", "reasoning", "--out", str(tmp_path), "--n", "4", "--offline"]) == 0
    assert cli.main(["build", "--bench", "instruction", "--out", str(tmp_path), "--n", "4", "--offline"]) == 0
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert set(info) == {"gsm_symbolic", "logiqa_evals", "chatterbot"}


def test_unknown_bench_is_a_user_error_listing_valid_names(tmp_path, capsys):
    code = cli.main(["build", "--bench", "domian", "--out", str(tmp_path / "out"), "--offline"])
    assert code == cli.EXIT_USER_ERROR
    error = capsys.readouterr().err
    assert "unknown AdaptEval bench or dataset 'domian'" in error
    assert "valid benches: domain, instruction, reasoning, fewshot, arc, arc-dev, arc-sft, all" in error
    assert not (tmp_path / "out").exists()


def test_bad_n_is_a_user_error(tmp_path, capsys):
    assert cli.main(["build", "--bench", "reasoning", "--out", str(tmp_path), "--n", "0", "--offline"]) == 2
    assert "n must be at least 1" in capsys.readouterr().err


def test_a_new_subcommand_is_one_function(monkeypatch):
    def add_report_command(subparsers: argparse._SubParsersAction) -> None:
        parser = subparsers.add_parser("hello")
        parser.add_argument("--results", required=True)
        parser.set_defaults(handler=lambda args: 7 if args.results == "r.json" else 1)

    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, add_report_command])
    assert cli.main(["hello", "--results", "r.json"]) == 7
    assert cli.build_parser().parse_args(["build", "--bench", "all", "--out", "x"]).n is None  # 5000, ARC: all


def test_commands_that_score_say_which_extra_to_install_when_its_packages_are_missing(monkeypatch, capsys):
    monkeypatch.setattr(cli, "EXTRA_PACKAGES", {"no_such_module_for_adapteval": "no-such-package"})
    assert cli.main(["report", "nowhere"]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "no-such-package" in err and "llamafactory-tlm[adapteval]" in err
