"""TT-SI / TT-D / TT-ICL (``tlm_selector: generate``) and the per-prompt gates."""

import json
import math
import os
import socket
import subprocess
import time

import pytest
import torch
from openai_server import OpenAIServer
from tlm_testing import CANARY, QUESTIONS, VENV_BIN, base_recipe, read_jsonl, run_cli, write_dataset

from tlm_plugin.selectors.generate import filter_examples, parse_examples
from tlm_plugin.train.gate import RunningFraction, dedupe, flag_fraction, margin, option_letters


# ---------------------------------------------------------------------------------------------------------------
# Pure parts


def test_margin_is_the_gap_between_the_two_most_likely_candidates():
    scores = [-1.0, -2.0, -0.5]
    exps = [math.exp(s) for s in scores]
    probs = [e / sum(exps) for e in exps]
    u, p = margin(scores)
    assert p == pytest.approx(probs)
    assert u == pytest.approx(sorted(probs)[-1] - sorted(probs)[-2])
    assert margin([-3.0]) == (1.0, [1.0]) and margin([]) == (1.0, [])
    assert margin([1000.0, 999.0])[0] == pytest.approx(math.tanh(0.5))  # stable for large scores


def test_options_of_a_multiple_choice_prompt_and_candidate_deduplication():
    prompt = "Pick one.\nOptions: A. red\n B. green\nC) blue\n(D) black\n\nAnswer:"
    assert option_letters(prompt) == ["A", "B", "C", "D"]
    assert option_letters("A. only one option") == []
    assert option_letters("Steps:\nA. do\nB. that\nThen:\nA. x\nB. y\nC. z") == ["A", "B", "C"]
    assert dedupe(["Paris", " paris ", "Paris", "", "Rome  city", "Rome city"]) == ["Paris", "paris", "Rome  city"]


def test_calibrated_fraction_flags_the_most_uncertain():
    margins = [0.9, 0.1, 0.5, 0.2]
    assert flag_fraction(margins, 0.5, higher_is_unsure=False) == [False, True, False, True]
    assert flag_fraction([3.0, 5.0, 4.0], 1 / 3, higher_is_unsure=True) == [False, True, False]
    running = RunningFraction(0.25, higher_is_unsure=False)
    # each against the prompts seen so far: floor(0.25 n + 1/2) = 0, 1, 1, 1 flagged, the lowest margin (0.1) first
    assert [running(m) for m in margins] == [False, True, False, False]


def test_generator_output_is_parsed_and_never_trusted():
    reply = (
        "### Example 1\nInput: What is 2+3?\nOutput: 5\n"
        "### Example 2\nInput: What is the capital of France?\n"  # no output: malformed
        "### Example 3\nInput: Explain how a river delta forms.\nOutput: deltas\n"  # repeats the test prompt
        "### Example 4\nInput: What is 4+4?\nOutput: Sediment settles where the river slows.\n"  # the reference
        "### Example 5\nInput: What is 2+3?\nOutput: 5\n"  # duplicate
        "### Example 6\nInput: What is 1+1?\nOutput: 2\n"  # more than k
    )
    examples = filter_examples(
        parse_examples(reply), 1, "Explain how a river delta forms.", "Sediment settles where the river slows."
    )
    assert [e.status for e in examples] == [
        "ok",
        "malformed",
        "repeats_prompt",
        "leaks_reference",
        "duplicate",
        "surplus",
    ]
    assert (examples[0].input, examples[0].output) == ("What is 2+3?", "5")
    assert [e.status for e in parse_examples("no structure at all")] == ["malformed"]
    assert [e.status for e in parse_examples("")] == ["malformed"]
    # the format copied instead of filled in (a small model does this): never trained on
    copied = "### Example 1\nInput: <the complete new task>\nOutput: D. The station is west.\n"
    copied += "### Example 2\nInput: Which is larger, 3 or <5>?\nOutput: <its answer>\n"
    copied += "### Example 3\nInput: Is <b> a tag?\nOutput: Yes, <b> is bold.\n"
    assert [e.status for e in parse_examples(copied)] == ["placeholder", "placeholder", "ok"]


# ---------------------------------------------------------------------------------------------------------------
# Against an OpenAI-compatible test server (tests/openai_server.py) that writes well-formed examples


TEACHER_REPLY = (
    "### Example 1\nInput: What does a bond pay?\nOutput: A bond pays interest to its holder.\n"
    "### Example 2\nInput: Name a sugar.\nOutput: Glucose is a sugar.\n"
    "### Example 3\nInput: broken block without output\n"
)


def run_in_process(recipe: dict) -> None:
    from llamafactory.train.tuner import run_exp

    run_exp(recipe)


@pytest.mark.slow
def test_tt_d_with_an_endpoint_trains_on_usable_examples_and_never_sends_the_answer(
    tiny_model, tiny_data, tmp_path, monkeypatch
):
    server = OpenAIServer(TEACHER_REPLY)
    monkeypatch.setenv("TEST_TEACHER_KEY", "secret-key")
    try:
        out = tmp_path / "out"
        run_in_process(
            base_recipe(
                tiny_model,
                tiny_data,
                out,
                tlm_selector="generate",
                tlm_mode="per_prompt",
                tlm_generator=server.url,
                tlm_generate_k=2,
                tlm_prompt_epochs=3,
                tlm_generate_api_key_env="TEST_TEACHER_KEY",
                tlm_eval_answers=True,
                do_predict=True,
                learning_rate=1e-2,
            )
        )
    finally:
        server.close()
    assert len(server.requests) == len(QUESTIONS)
    assert all(r["model"] == "teacher" and r["auth"] == "Bearer secret-key" for r in server.requests)
    sent = json.dumps(server.requests)
    assert CANARY not in sent  # the reference answers never reach the generator
    assert all(any(q in r["messages"][0]["content"] for q, _ in QUESTIONS) for r in server.requests)

    records = read_jsonl(out / "tlm_generated.jsonl")
    assert [r["index"] for r in records] == list(range(len(QUESTIONS)))
    for r in records:
        assert [g["status"] for g in r["generated"]] == ["ok", "ok", "malformed"]
        assert r["n_usable"] == 2 and r["steps"] == 2 * 3  # 2 examples x 3 epochs, batch 1
        assert r["data_loss_after"] < r["data_loss_before"]
    assert all(r["answer_bpb"] != r["answer_bpb_base"] for r in read_jsonl(out / "tlm_scores.jsonl"))
    summary = json.loads((out / "tlm_summary.json").read_text())
    assert summary["per_prompt"]["generated_examples"] == {"ok": 2 * len(QUESTIONS), "malformed": len(QUESTIONS)}
    assert summary["optimizer_steps"] == 6 * len(QUESTIONS)
    assert len(read_jsonl(out / "generated_predictions.jsonl")) == len(QUESTIONS)
    from safetensors.torch import load_file

    weights = load_file(str(out / "adapter_model.safetensors"))  # the restored starting adapter
    assert all(float(v.abs().sum()) == 0.0 for k, v in weights.items() if "lora_B" in k)


@pytest.mark.slow
def test_leaked_and_repeated_examples_are_filtered_and_a_prompt_without_examples_is_answered_untrained(
    tiny_model, tmp_path
):
    rows = [{"instruction": q, "input": "", "output": a} for q, a in QUESTIONS[:2]]
    data = write_dataset(tmp_path / "data", rows)
    leak = f"### Example 1\nInput: Something new?\nOutput: {QUESTIONS[0][1]}\n### Example 2\nInput: {QUESTIONS[1][0]}\nOutput: x\n"
    server = OpenAIServer(leak)
    try:
        out = tmp_path / "out"
        run_in_process(
            base_recipe(
                tiny_model,
                data,
                out,
                tlm_selector="generate",
                tlm_mode="per_prompt",
                tlm_generator=server.url,
                tlm_generate_k=2,
                tlm_eval_answers=True,
            )
        )
    finally:
        server.close()
    first, second = read_jsonl(out / "tlm_generated.jsonl")
    assert [g["status"] for g in first["generated"]] == ["leaks_reference", "ok"]
    assert [g["status"] for g in second["generated"]] == ["ok", "repeats_prompt"]
    assert first["steps"] == 1 and second["steps"] == 1


@pytest.mark.slow
def test_tt_icl_answers_with_the_examples_as_demonstrations_and_does_not_train(tiny_model, tiny_data, tmp_path):
    server = OpenAIServer(TEACHER_REPLY)
    try:
        out = tmp_path / "out"
        run_in_process(
            base_recipe(
                tiny_model,
                tiny_data,
                out,
                tlm_selector="generate",
                tlm_mode="per_prompt",
                tlm_generator=server.url,
                tlm_generate_k=2,
                tlm_generate_use="icl",
                tlm_eval_answers=True,
                do_predict=True,
            )
        )
    finally:
        server.close()
    records = read_jsonl(out / "tlm_generated.jsonl")
    assert all(r["steps"] == 0 and r["n_usable"] == 2 for r in records)
    scores = read_jsonl(out / "tlm_scores.jsonl")
    assert all(r["answer_bpb"] != r["answer_bpb_base"] for r in scores)  # measured under the longer prompt
    preds = read_jsonl(out / "generated_predictions.jsonl")
    assert all("What does a bond pay?" in p["prompt"] for p in preds)  # the demonstrations are in the prompt


@pytest.mark.slow
def test_margin_gate_scores_the_options_as_a_direct_computation_does(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [
        {"instruction": f"{q}\nOptions:\nA. yes\nB. no\nC. maybe", "input": "", "output": "A"}
        for q, _ in QUESTIONS[:4]
    ]
    data = write_dataset(tmp_path / "data", rows)
    out = tmp_path / "out"
    run_in_process(
        base_recipe(
            tiny_model,
            data,
            out,
            tlm_selector="nearest",
            tlm_mode="per_prompt",
            tlm_sift_budget=1,
            tlm_gate="margin",
            tlm_gate_tau=0.5,
        )
    )
    records = read_jsonl(out / "tlm_sift_selection.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    for r, row in zip(records, rows):
        assert [c["text"] for c in r["candidates"]] == ["A", "B", "C"]
        prompt = tokenizer.encode(f"<|im_start|>user\n{row['instruction']}<|im_end|>\n<|im_start|>assistant\n")
        scores = []
        for letter in "ABC":
            answer = tokenizer.encode(letter)
            ids = torch.tensor([prompt + answer])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            scores.append(sum(float(logp[len(prompt) - 1 + k, answer[k]]) for k in range(len(answer))) / len(answer))
        assert [c["score"] for c in r["candidates"]] == pytest.approx(scores, abs=1e-4)
        probs = [math.exp(s) / sum(math.exp(x) for x in scores) for s in scores]
        u = sorted(probs)[-1] - sorted(probs)[-2]
        assert r["gate_score"] == pytest.approx(u, abs=1e-4)
        assert r["flagged"] == (u < 0.5) and r["steps"] == (1 if u < 0.5 else 0)


@pytest.mark.slow
def test_perplexity_gate_with_a_calibrated_fraction_serves_sift_runs(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    run_in_process(
        base_recipe(
            tiny_model,
            tiny_data,
            out,
            tlm_selector="sift",
            tlm_mode="per_prompt",
            tlm_sift_budget=2,
            tlm_gate="perplexity",
            tlm_gate_fraction=0.5,
        )
    )
    records = read_jsonl(out / "tlm_sift_selection.jsonl")
    scores = [r["gate_score"] for r in records]
    flagged = [r["flagged"] for r in records]
    assert sum(flagged) == len(QUESTIONS) // 2
    assert min(s for s, f in zip(scores, flagged) if f) > max(s for s, f in zip(scores, flagged) if not f)
    assert all(r["steps"] == (2 if r["flagged"] else 0) for r in records)


@pytest.mark.slow
def test_sampled_candidates_for_free_form_prompts(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    run_in_process(
        base_recipe(
            tiny_model,
            tiny_data,
            out,
            tlm_selector="generate",
            tlm_mode="per_prompt",
            tlm_gate="margin",
            tlm_gate_candidates=4,
            tlm_gate_max_tokens=6,
            tlm_generate_max_tokens=16,
        )
    )
    for r in read_jsonl(out / "tlm_generated.jsonl"):
        texts = [c["text"] for c in r["candidates"]]
        assert 1 <= len(texts) <= 4 and len(set(" ".join(t.split()) for t in texts)) == len(texts)
        # the margin by hand: softmax over the candidates' mean log-likelihoods, top probability minus the second
        exps = [math.exp(c["score"]) for c in r["candidates"]]
        probs = [e / sum(exps) for e in exps]
        assert [c["p"] for c in r["candidates"]] == pytest.approx(probs)
        ranked = sorted(probs, reverse=True)
        assert r["gate_score"] == pytest.approx(ranked[0] - ranked[1] if len(ranked) > 1 else 1.0)
        assert r["flagged"] == (r["gate_score"] < 0.95)  # the default tlm_gate_tau (TT-SI's)


# ---------------------------------------------------------------------------------------------------------------
# Real processes: llamafactory-cli api as the teacher, a local teacher folder, torchrun, refusals


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_tt_d_against_a_real_llamafactory_api_and_a_local_teacher_folder(tiny_model, tiny_data, tmp_path):
    port = _free_port()
    env = {
        **os.environ,
        "API_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
    }
    api = subprocess.Popen(
        [str(VENV_BIN / "llamafactory-cli"), "api", "--model_name_or_path", str(tiny_model), "--template", "chatml"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        import urllib.request

        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline and api.poll() is None, "llamafactory-cli api did not start"
                time.sleep(1)
        out = tmp_path / "api"
        recipe = base_recipe(
            tiny_model,
            tiny_data,
            out,
            tlm_selector="generate",
            tlm_mode="per_prompt",
            tlm_generator=f"http://127.0.0.1:{port}/v1",
            tlm_generate_max_tokens=24,
            do_predict=True,
        )
        proc = run_cli(recipe, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        os.killpg(api.pid, 9)
        api.wait()
    records = read_jsonl(out / "tlm_generated.jsonl")
    assert len(records) == len(QUESTIONS) and all(r["generator_error"] is None for r in records)
    assert all(r["generator_reply"] for r in records)  # the API answered every prompt
    # a random tiny model writes no well-formed example: every prompt is answered without training
    assert all(r["steps"] == 0 or r["n_usable"] > 0 for r in records)
    assert len(read_jsonl(out / "generated_predictions.jsonl")) == len(QUESTIONS)

    teacher = tmp_path / "teacher"
    recipe = base_recipe(
        tiny_model,
        tiny_data,
        teacher,
        tlm_selector="generate",
        tlm_mode="per_prompt",
        tlm_generator=str(tiny_model),
        tlm_generate_max_tokens=24,
    )
    proc = run_cli(recipe, tmp_path, extra_env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["index"] for r in read_jsonl(teacher / "tlm_generated.jsonl")] == list(range(len(QUESTIONS)))


@pytest.mark.slow
def test_tt_si_with_the_model_itself_through_llamafactory_cli(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "self"
    recipe = base_recipe(
        tiny_model,
        tiny_data,
        out,
        tlm_selector="generate",
        tlm_mode="per_prompt",
        tlm_generator="self",
        tlm_gate="margin",
        tlm_gate_candidates=3,
        tlm_gate_max_tokens=6,
        tlm_generate_max_tokens=24,
        do_predict=True,
        max_new_tokens=4,
    )
    proc = run_cli(recipe, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_jsonl(out / "tlm_generated.jsonl")
    assert [r["index"] for r in records] == list(range(len(QUESTIONS)))
    for r in records:  # the gate ran, the model wrote something, and nothing unusable was trained on
        assert r["gate"] == "margin" and 0.0 <= r["gate_score"] <= 1.0
        assert r["flagged"] == (r["gate_score"] < 0.95)
        assert not r["flagged"] or isinstance(r["generator_reply"], str)
        assert r["steps"] == 0 or r["n_usable"] > 0
    summary = json.loads((out / "tlm_summary.json").read_text())
    assert summary["per_prompt"]["n_flagged"] == sum(r["flagged"] for r in records)
    assert len(read_jsonl(out / "generated_predictions.jsonl")) == len(QUESTIONS)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"tlm_generator": "http://127.0.0.1:9/v1"}, "the endpoint http://127.0.0.1:9/v1 cannot be reached"),
        ({"tlm_generator": "/no/such/teacher"}, "tlm_generator: '/no/such/teacher'"),
        ({"tlm_generator": "nobody/no-such-model"}, "the teacher model 'nobody/no-such-model' cannot be loaded"),
    ],
)
def test_an_unreachable_generator_is_refused_before_the_model_loads(tiny_model, tiny_data, tmp_path, overrides, match):
    out = tmp_path / "out"
    recipe = base_recipe(tiny_model, tiny_data, out, tlm_selector="generate", tlm_mode="per_prompt", **overrides)
    proc = run_cli(recipe, tmp_path)
    assert proc.returncode != 0 and match in proc.stderr
    assert not out.exists() or not any(out.iterdir())
