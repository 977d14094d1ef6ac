"""``tlm_selector: generate``: training rows written by a generator (TT-SI / TT-D, Acikgoz et al., 2025).

For a prompt the gate flags, a generator writes ``tlm_generate_k`` new examples of the same task with their answers,
seeded with the test prompt only (never its reference answer): the model itself in its starting state (TT-SI,
``tlm_generator: self``), a stronger local model (TT-D, a folder or hub id) or an OpenAI-compatible endpoint (TT-D,
``http://host:port/v1``: ``llamafactory-cli api``, vLLM's server, a hosted API). The generator is never trusted: each
example is parsed, and malformed ones, repeats of the test prompt and answers equal to the test row's reference
answer (a leak check) are recorded and dropped. ``tlm_generate_use: train`` fine-tunes on the usable examples
(the SFT loss on their answers, through the recipe's template); ``icl`` (TT-ICL) puts them in the prompt as
demonstrations instead.
"""

import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tlm_plugin.seam import without_hf_deepspeed_config
from tlm_plugin.selectors.base import PromptDataSource
from tlm_plugin.train.outputs import GENERATED_FILE


DEFAULT_PROMPT = """Here is a task that someone asked:

{prompt}

Write {k} new example(s) of the same kind of task. Each new example must be different from the task above but test
the same skill, in the same style, and must come with its correct answer. Use exactly this format for each example:

### Example 1
Input: <the complete new task>
Output: <its answer>
"""
_BLOCK = re.compile(r"^\s*#+\s*Example\s*\d+\s*:?\s*$", re.IGNORECASE | re.MULTILINE)
_FIELD = re.compile(r"^\s*(Input|Output)\s*:\s*", re.IGNORECASE | re.MULTILINE)
# a field that is only an angle-bracketed phrase copies the format's placeholder ("<the complete new task>")
_PLACEHOLDER = re.compile(r"^<[^<>\n]{1,200}>$")


@dataclass
class Example:
    input: str
    output: str
    status: str = "ok"  # ok, malformed, placeholder, repeats_prompt, leaks_reference, duplicate, surplus


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def parse_examples(text: str) -> list[Example]:
    """The ``### Example N / Input: / Output:`` blocks of a generator's reply, in order; a block without both
    fields (or with an empty one) is kept as ``malformed`` with whatever was found, one whose input or output is
    only a ``<placeholder>`` (the format copied, not filled in) as ``placeholder``."""
    blocks = [b for b in _BLOCK.split(text) if b.strip()] if _BLOCK.search(text) else [text]
    examples = []
    for block in blocks:
        parts = _FIELD.split(block)
        fields: dict[str, str] = {}
        for name, value in zip(parts[1::2], parts[2::2]):
            fields.setdefault(name.lower(), value.strip())
        example = Example(fields.get("input", ""), fields.get("output", ""))
        if not example.input or not example.output:
            example.status = "malformed"
        elif _PLACEHOLDER.match(example.input) or _PLACEHOLDER.match(example.output):
            example.status = "placeholder"
        examples.append(example)
    return examples


def filter_examples(examples: list[Example], k: int, test_prompt: str, reference: str | None) -> list[Example]:
    """Mark what must not be trained on: a repeat of the test prompt, an answer equal to the reference answer, a
    repeated example, more than ``k`` examples. Returns the same list; usable examples keep status ``ok``."""
    seen = set()
    usable = 0
    for ex in examples:
        if ex.status != "ok":
            continue
        if _norm(ex.input) == _norm(test_prompt) or (
            len(_norm(test_prompt)) > 20 and _norm(test_prompt) in _norm(ex.input)
        ):
            ex.status = "repeats_prompt"
        elif reference is not None and _norm(reference) and _norm(ex.output) == _norm(reference):
            ex.status = "leaks_reference"
        elif (_norm(ex.input), _norm(ex.output)) in seen:
            ex.status = "duplicate"
        elif usable >= k:
            ex.status = "surplus"
        else:
            seen.add((_norm(ex.input), _norm(ex.output)))
            usable += 1
    return examples


# ---------------------------------------------------------------------------------------------------------------
# Generators: text in, text out


class EndpointGenerator:
    """An OpenAI-compatible chat endpoint (``.../v1``); the key, if any, from an environment variable."""

    def __init__(self, url: str, model: str | None, key_env: str, timeout: float = 600.0) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout
        self.key = os.environ.get(key_env) or None
        self.model = model or self.first_model()

    def _request(self, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=data, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
            return json.loads(response.read().decode("utf-8"))

    def first_model(self) -> str:
        models = self._request("/models", timeout=30).get("data") or []
        if not models:
            raise ValueError(f"{self.url}/models lists no model; set tlm_generate_model")
        return models[0]["id"]

    def __call__(self, text: str, temperature: float, top_p: float, max_tokens: int, seed: int) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": text}],
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
            "n": 1,
            "seed": seed,
        }
        reply = self._request("/chat/completions", body)
        return reply["choices"][0]["message"]["content"] or ""


def check_endpoint(url: str, key_env: str) -> str | None:
    """None when the endpoint answers ``/models``, else why it cannot be used (the caller refuses the run)."""
    try:
        EndpointGenerator(url, None, key_env).first_model()
    except (urllib.error.URLError, OSError, ValueError, KeyError) as err:
        return f"tlm_generator: the endpoint {url} cannot be reached ({err})."
    return None


class ModelGenerator:
    """A causal LM that samples a reply: the model being adapted (``self``) or a teacher loaded once."""

    def __init__(self, model, tokenizer, device, chat) -> None:
        self.model, self.tokenizer, self.device, self.chat = model, tokenizer, device, chat

    def __call__(self, text: str, temperature: float, top_p: float, max_tokens: int, seed: int) -> str:
        ids = self.chat(text)
        torch.manual_seed(seed)
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            out = self.model.generate(
                input_ids=torch.tensor([ids], device=self.device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.device),
                synced_gpus=False,  # per prompt, each rank on its own (see train.generation.synced_gpus)
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_tokens,
                pad_token_id=self.tokenizer.pad_token_id
                if self.tokenizer.pad_token_id is not None
                else self.tokenizer.eos_token_id,
            )
        self.model.train(was_training)
        return self.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def load_teacher(name: str, device, dtype):
    """A local folder or hub id as a ModelGenerator, with its own tokenizer and chat template."""
    tokenizer = AutoTokenizer.from_pretrained(name)
    with without_hf_deepspeed_config():  # whole on this rank: no ZeRO-3 partitions that no engine would gather
        model = AutoModelForCausalLM.from_pretrained(name, torch_dtype=dtype).to(device).eval()

    def chat(text: str) -> list[int]:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return tokenizer(text)["input_ids"]

    return ModelGenerator(model, tokenizer, device, chat)


def is_endpoint(generator: str) -> bool:
    return generator.startswith(("http://", "https://"))


# ---------------------------------------------------------------------------------------------------------------
# The data source


class GenerateSource(PromptDataSource):
    """Examples written by the generator for each flagged prompt: training rows, or demonstrations (``icl``)."""

    record_file = GENERATED_FILE
    measure_data_loss = True

    def prepare(self, ctx) -> None:
        a = ctx.settings
        self.ctx, self.k, self.use = ctx, a.tlm_generate_k, a.tlm_generate_use
        self.sampling = (a.tlm_generate_temperature, a.tlm_generate_top_p, a.tlm_generate_max_tokens)
        self.template_text = DEFAULT_PROMPT
        if a.tlm_generate_prompt:
            with open(a.tlm_generate_prompt, encoding="utf-8") as f:
                self.template_text = f.read()
        if a.tlm_generator == "self":
            encoder = ctx.encoder
            self.generator = ModelGenerator(
                ctx.model, ctx.tokenizer, ctx.device, lambda t: encoder.prompt_ids([{"role": "user", "content": t}])
            )
        elif is_endpoint(a.tlm_generator):
            self.generator = EndpointGenerator(a.tlm_generator, a.tlm_generate_model, a.tlm_generate_api_key_env)
        else:
            self.generator = load_teacher(a.tlm_generator, ctx.device, ctx.dtype)

    def rows(self, index: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        ctx = self.ctx
        row = ctx.aligned[index]
        test_prompt = row["_prompt"][-1]["content"]
        reference = row["_response"][0]["content"] if len(row["_response"]) == 1 else None  # leak check only
        text = self.template_text.replace("{prompt}", test_prompt).replace("{k}", str(self.k))
        temperature, top_p, max_tokens = self.sampling
        try:
            reply = self.generator(text, temperature, top_p, max_tokens, ctx.prompt_seed(index))
            error = None
        except (urllib.error.URLError, OSError, KeyError, ValueError) as err:  # a failing generator never ends the run
            reply, error = "", f"{type(err).__name__}: {err}"
        examples = filter_examples(parse_examples(reply), self.k, test_prompt, reference)
        usable = [ex for ex in examples if ex.status == "ok"]
        fields = {
            "generator_reply": reply[:4000],
            "generated": [{"input": ex.input, "output": ex.output, "status": ex.status} for ex in examples],
            "n_usable": len(usable),
            "generator_error": error,
        }
        if not usable:
            fields["status"] = "no usable example" if not error else "generator failed"
            return [], fields
        fields["status"] = "ok"
        system, tools = row["_system"] or None, row["_tools"] or None
        if self.use == "icl":  # TT-ICL: demonstrations in the prompt's history, no training
            demos = []
            for ex in usable:
                demos += [{"role": "user", "content": ex.input}, {"role": "assistant", "content": ex.output}]
            fields["answer_messages"] = demos + list(row["_prompt"])
            return [], fields
        rows = []
        for ex in usable:
            encoded = ctx.encoder.exchange([{"role": "user", "content": ex.input}], ex.output, system, tools)
            if encoded is not None:
                rows.append({"input_ids": encoded[0], "loss_mask": encoded[1]})
        return rows, fields
