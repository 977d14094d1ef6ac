"""The learner behind a learning server: windows of received prompts, TLM's online update, adapter version N+1.

Runs as its own process (``python -m tlm_plugin.serving.learner OUTPUT_DIR``), started and watched by the server,
at a lower CPU priority: a failure here never stops answering, and answering comes first. It reads the prompts from
``tlm_stream.jsonl``, takes them in windows of ``tlm_chunk_size`` learnable prompts (or what arrived within
``tlm_serve_window_s``), and learns each window as ``tlm_mode: online`` learns a chunk: one pass, micro-batches of
``per_device_train_batch_size``, an update per ``gradient_accumulation_steps`` micro-batches, the TLM loss with the
selector's S(x) from the current forward (the running P0 quantile of ``tlm_select_fraction`` included), an update
with no selected row (or a non-finite loss) skipped without moving the optimizer or the LR schedule.

After a window: the window's prompts are scored again (log-perplexity before / after), the probe set measured
(answer bits per byte), and the version is published (:meth:`Store.publish`) or, worse than the best served version
by more than ``tlm_probe_tolerance``, recorded as rejected, and the learner returns to the current version's
adapter and state. Learning is a pure function of the stream (windows by count): a learner restarted after a kill
continues from the current version's saved state and gives the records an uninterrupted one would.
"""

import contextlib
import ctypes
import fcntl
import json
import math
import os
import signal
import sys
import time
from typing import Any

import torch
from datasets import Dataset
from llamafactory.data import get_template_and_fix_tokenizer
from llamafactory.extras.logging import get_logger
from llamafactory.model import load_model, load_tokenizer
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import get_scheduler

from tlm_plugin.errors import TLMConfigError
from tlm_plugin.serving import recipe as serve_recipe
from tlm_plugin.serving.store import STATE_FILE, Store
from tlm_plugin.train import outputs
from tlm_plugin.train.batching import pad_batch
from tlm_plugin.train.data import Encoder, answer_rows, check_text_only, load_aligned
from tlm_plugin.train.loss import masked_log_perplexity, tlm_loss, token_nll
from tlm_plugin.train.passes import mean_nll, nll_pass
from tlm_plugin.train.run import ANSWER_MASKS, LN2
from tlm_plugin.train.setup import build_selector
from tlm_plugin.train.token_scope import TemplateScopeError, truncated_user_content_mask
from tlm_plugin.train.trainer import TLMTrainer


logger = get_logger(__name__)

POLL_S = 0.2
NICE = 10  # the learner yields the CPU to answering


def learnable(record: dict[str, Any]) -> str | None:
    """Why a received request is not learned from (None: it is). The prompt's length is checked on encoding."""
    if not record.get("learn", True):
        return "tlm_learn: false"
    messages = record.get("messages") or []
    if not messages or messages[-1].get("role") != "user":
        return "the last turn is not a user turn (tool or function output)"
    if not str(messages[-1].get("content") or "").strip():
        return "empty user turn"
    return None


class WindowLearner:
    def __init__(self, recipe: dict[str, Any], store: Store) -> None:
        self.recipe, self.store = recipe, store
        current = store.current()
        adapter = store.version_dir(current) if current is not None else None
        parsed = serve_recipe.train_args(recipe, adapter)
        self.tlm_args, model_args, data_args, self.training_args, finetuning_args, _ = parsed
        args = self.training_args
        tokenizer_module = load_tokenizer(model_args)
        self.tokenizer = tokenizer_module["tokenizer"]
        self.template = get_template_and_fix_tokenizer(self.tokenizer, data_args)
        self.cutoff_len = data_args.cutoff_len
        self.encoder = Encoder(self.template, self.tokenizer, data_args)
        self.probe = self._probe_rows(model_args, data_args)
        model = load_model(self.tokenizer, model_args, finetuning_args, is_trainable=True)
        self.trainer = TLMTrainer(
            tlm_args=self.tlm_args,
            selector=build_selector(self.tlm_args, seed=args.seed),
            model=model,
            args=args,
            finetuning_args=finetuning_args,
            gen_kwargs={},
            **tokenizer_module,
        )
        self.model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        self.model.to(args.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self.trainer.create_optimizer()
        if args.warmup_ratio:
            logger.warning("tlm_mode: serve: warmup_ratio needs a run length; a stream has none. Use warmup_steps.")
        if args.lr_scheduler_type not in ("constant", "constant_with_warmup"):
            logger.warning(
                f"tlm_mode: serve: lr_scheduler_type {args.lr_scheduler_type} decays over a run length, which a "
                "stream does not have; the learning rate stays constant after warmup_steps."
            )
        self.scheduler = get_scheduler("constant_with_warmup", self.optimizer, num_warmup_steps=args.warmup_steps or 0)
        self.scaler = torch.amp.GradScaler(args.device.type) if args.fp16 else None
        self.selector = self.trainer.selector
        self.current = current
        if current is not None:
            self._load_state(current)
        self._prepared: dict[int, dict[str, Any] | str] = {}

    # ------------------------------------------------------------------ data
    def _probe_rows(self, model_args, data_args) -> Dataset | None:
        names = self.tlm_args.tlm_probe_dataset
        if names is None:
            return None
        try:
            aligned = load_aligned([n.strip() for n in names.split(",")], model_args, data_args, self.training_args)
        except ValueError as err:
            raise TLMConfigError(f"tlm_probe_dataset {names!r} could not be read: {err}") from err
        check_text_only(aligned, f"tlm_probe_dataset {names}")
        rows = answer_rows(aligned, self.encoder)
        if not rows:
            raise TLMConfigError(
                f"tlm_probe_dataset {names!r} has no row with a reference answer: the drift guard measures how likely "
                "those answers are."
            )
        return Dataset.from_list(rows)

    def prepare(self, record: dict[str, Any]) -> dict[str, Any] | str:
        """The request's training row, or why it is not learned (kept until its window is learned)."""
        seq = record["seq"]
        if seq not in self._prepared:
            why = learnable(record)
            self._prepared[seq] = why if why is not None else self.encode(record)
        return self._prepared[seq]

    def encode(self, record: dict[str, Any]) -> dict[str, Any] | str:
        """A training row (``input_ids``, ``loss_mask``, ``index`` = seq), or why the prompt is not learned."""
        messages, system, tools = record["messages"], record.get("system"), record.get("tools")
        full, _ = self.template.encode_oneturn(
            self.tokenizer, [*messages, {"role": "assistant", "content": ""}], system or None, tools or None
        )
        if len(full) > self.cutoff_len:
            return f"longer than cutoff_len ({len(full)} > {self.cutoff_len} tokens)"
        ids = self.encoder.prompt_ids(messages, system, tools)
        if self.tlm_args.tlm_loss_tokens == "user":
            try:
                ids, mask = truncated_user_content_mask(
                    self.template, self.tokenizer, messages, self.cutoff_len, system or None, tools or None
                )
            except TemplateScopeError as err:
                return f"tlm_loss_tokens: user is not available for this template: {err}"
            if sum(mask) < 2:
                mask = [1] * len(ids)
        else:
            mask = [1] * len(ids)
        return {"input_ids": ids, "loss_mask": mask, "index": record["seq"]}

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "selector": self.selector.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def _load_state(self, version: int) -> None:
        """The adapter and learner state of ``version`` (v0 has no learner state: a fresh optimizer)."""
        folder = self.store.version_dir(version)
        weights = load_file(os.path.join(folder, "adapter_model.safetensors"))
        with torch.no_grad():
            set_peft_model_state_dict(self.model, weights)
        path = os.path.join(folder, STATE_FILE)
        if os.path.isfile(path):
            state = torch.load(path, map_location="cpu", weights_only=False)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state["scaler"] is not None:
                self.scaler.load_state_dict(state["scaler"])
            self.selector.load_state_dict(state["selector"])
            torch.set_rng_state(state["rng"])
            if state["cuda_rng"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.current = version

    def _write(self, folder: str) -> None:
        self.model.save_pretrained(folder)
        torch.save(self._state(), os.path.join(folder, STATE_FILE))

    # ------------------------------------------------------------------ measures
    def _pass(self, dataset: Dataset, masks: tuple[str, ...], desc: str) -> dict[str, Any]:
        return nll_pass(
            self.trainer,
            dataset,
            masks=masks,
            batch_size=self.tlm_args.tlm_score_batch_size,
            token_budget=self.training_args.per_device_train_batch_size * max(map(len, dataset["input_ids"])),
            prefix_cache=self.tlm_args.tlm_score_prefix_cache,
            desc=desc,
        )

    def probe_bpb(self) -> float | None:
        """The probe answers' bits per byte under the current adapter: total bits / total bytes."""
        if self.probe is None:
            return None
        result = self._pass(self.probe, ANSWER_MASKS, "probe answers")
        nbytes = dict(zip(self.probe["index"], self.probe["answer_bytes"]))
        bits = sum(float(nll) for nll in result["answer_mask_nll"]) / LN2
        return bits / sum(nbytes[int(i)] for i in result["index"])

    def prompt_log_ppl(self, rows: list[dict[str, Any]]) -> dict[int, float]:
        result = self._pass(Dataset.from_list(rows), ("loss_mask",), "window prompts")
        return dict(zip((int(i) for i in result["index"]), mean_nll(result, "loss_mask").tolist()))

    # ------------------------------------------------------------------ one window
    def train_window(self, rows: list[dict[str, Any]]) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
        """One pass over ``rows`` as online mode learns a chunk; per-row records and the window's step counts."""
        args = self.training_args
        bs, ga = args.per_device_train_batch_size, args.gradient_accumulation_steps
        micro = [rows[i : i + bs] for i in range(0, len(rows), bs)]
        updates = [micro[i : i + ga] for i in range(0, len(micro), ga)]
        pad = self.tokenizer.pad_token_id
        records: dict[int, dict[str, Any]] = {}
        counts = {"optimizer_steps": 0, "skipped_steps": 0, "overflow_steps": 0, "nonfinite_batches": 0}
        self.model.train()
        for update in updates:
            backward = False
            for batch in update:
                padded = pad_batch(
                    [r["input_ids"] for r in batch],
                    pad,
                    {"loss_mask": [r["loss_mask"] for r in batch]},
                    device=args.device,
                )
                with self.trainer.accelerator.autocast():
                    logits = self.model(
                        input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False
                    ).logits
                nll = token_nll(logits, padded["input_ids"], padded["attention_mask"])
                log_ppl, _ = masked_log_perplexity(nll, padded["loss_mask"])
                weights = self.selector.weights(log_ppl.detach().float().cpu()).to(log_ppl.device)
                loss = tlm_loss(log_ppl, weights)
                for row, n, lp, w in zip(
                    batch, padded["attention_mask"].sum(-1).tolist(), log_ppl.tolist(), weights.tolist()
                ):
                    records[row["index"]] = {"n_tokens": n, "log_ppl": lp, "selected": w > 0, "weight": w}
                if not torch.isfinite(loss):
                    counts["nonfinite_batches"] += 1
                    continue
                if bool((weights > 0).any()):
                    scaled = loss / ga
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                    backward = True
            if not backward:  # nothing selected (or only non-finite losses): no step, the schedule waits
                self.optimizer.zero_grad(set_to_none=True)
                counts["skipped_steps"] += 1
                continue
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if args.max_grad_norm and args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, args.max_grad_norm)
            stepped = True
            if self.scaler is not None:
                scale = self.scaler.get_scale()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                stepped = self.scaler.get_scale() >= scale
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if stepped:
                self.scheduler.step()
                counts["optimizer_steps"] += 1
            else:
                counts["overflow_steps"] += 1
        self.model.eval()
        return records, counts

    def learn(self, window: list[dict[str, Any]], next_seq: int) -> dict[str, Any]:
        """Learn one window of stream records; publish or reject its version; returns the outcome's metadata."""
        rows, records = [], {}
        for record in window:
            encoded = self.prepare(record)
            del self._prepared[record["seq"]]
            if isinstance(encoded, str):
                records[record["seq"]] = {"learned": False, "reason": encoded}
            else:
                rows.append(encoded)
        start = time.perf_counter()
        learned, counts = self.train_window(rows) if rows else ({}, {})
        train_s = time.perf_counter() - start
        after = self.prompt_log_ppl(rows) if rows else {}
        for seq, rec in learned.items():
            records[seq] = {"learned": True, **rec, "log_ppl_after": after.get(seq)}
        probe = self.probe_bpb()
        number = self.store.next_number()
        before_mean = _mean([r["log_ppl"] for r in learned.values()])
        meta = {
            "version": number,
            "parent": self.current,
            "first_seq": window[0]["seq"],
            "next_seq": next_seq,
            "prompts": len(window),
            "learned": len(learned),
            "selected": sum(1 for r in learned.values() if r["selected"]),
            **counts,
            "log_ppl_before": before_mean,
            "log_ppl_after": _mean(list(after.values())),
            "probe_answer_bpb": probe,
            "train_s": round(train_s, 3),
            "time": time.time(),
            "records": [{"index": seq, **records[seq]} for seq in sorted(records)],
        }
        best = self.best_probe()
        tolerance = self.tlm_args.tlm_probe_tolerance
        if probe is not None and best is not None and probe > best + tolerance:
            meta["rejected_because"] = (
                f"probe answer bits per byte {probe:.4f} > best served {best:.4f} + tolerance {tolerance}"
            )
            self.store.reject(number, meta)
            self._load_state(self.current)  # back to the version being served
        else:
            self.store.publish(number, self._write, meta)
            self.current = number
        status = "rejected" if "rejected_because" in meta else "published"
        with open(self.store.scores_path, "a", encoding="utf-8") as f:
            f.write("".join(outputs.jsonl_line({**r, "version": number, "status": status}) for r in meta["records"]))
        return {**meta, "status": status}

    def best_probe(self) -> float | None:
        rolled_back = set(self.store.control()["rolled_back"])
        values = [self.store.meta(n).get("probe_answer_bpb") for n in self.store.published() if n not in rolled_back]
        values = [v for v in values if v is not None]
        return min(values) if values else None

    def publish_first(self) -> None:
        """v0: the adapter before any learning (the recipe's, or a new LoRA), with the probe's starting value."""
        meta = {"version": 0, "parent": None, "next_seq": 0, "prompts": 0, "probe_answer_bpb": self.probe_bpb()}
        meta["time"] = time.time()
        self.model.eval()
        self.store.publish(0, lambda folder: self.model.save_pretrained(folder), meta)
        self.current = 0


class Loop:
    """The learner's life: v0, then windows from the stream as they fill, the drift guard's pause, a status file."""

    def __init__(self, learner: WindowLearner, store: Store) -> None:
        self.learner, self.store = learner, store
        outcomes = store.outcomes()
        self.next_seq = max([o["next_seq"] for o in outcomes], default=0)
        self.totals = {"windows": len(outcomes), "learned": 0, "selected": 0, "skipped_steps": 0, "optimizer_steps": 0}
        for o in outcomes:
            for key in ("learned", "selected", "skipped_steps", "optimizer_steps"):
                self.totals[key] += int(o.get(key) or 0)
        self.offset, self.pending = 0, []
        self._rebuild_scores(outcomes)

    def _rebuild_scores(self, outcomes: list[dict[str, Any]]) -> None:
        """tlm_scores.jsonl from the outcomes on disk (a kill between a version and its lines loses no line)."""
        lines = [
            outputs.jsonl_line({**r, "version": o["version"], "status": o["status"]})
            for o in outcomes
            for r in o.get("records", [])
        ]
        outputs.atomic_write(self.store.scores_path, "".join(lines))

    def status(self, state: str, message: str = "") -> None:
        self.store.write_learner_status(
            {
                "state": state,
                "message": message,
                "pid": os.getpid(),
                "current": self.learner.current,
                "next_seq": self.next_seq,
                "pending": len(self.pending),
                **self.totals,
                "updated": time.time(),
            }
        )

    def _fill(self) -> None:
        records, self.offset = self.store.read_stream(self.offset)
        self.pending += [r for r in records if r["seq"] >= self.next_seq]

    def next_window(self) -> list[dict[str, Any]] | None:
        """The next window, when it is complete: ``tlm_chunk_size`` prompts to learn (with the requests received
        in between that are not learned: ``tlm_learn: false``, tool turns, longer than ``cutoff_len``), or, with ``tlm_serve_window_s``, whatever arrived that long after its first prompt."""
        self._fill()
        size, limit = self.learner.tlm_args.tlm_chunk_size, self.learner.tlm_args.tlm_serve_window_s
        count = 0
        for k, record in enumerate(self.pending):
            if not isinstance(self.learner.prepare(record), str):
                count += 1
                if count == size:
                    return self.pending[: k + 1]
        if limit is not None and count and time.time() - self.pending[0]["time"] >= limit:
            return list(self.pending)
        return None

    def guard_paused(self) -> str | None:
        patience = self.learner.tlm_args.tlm_probe_patience
        if self.learner.probe is None:
            return None
        in_a_row = self.store.rejections_in_a_row()
        if in_a_row >= patience:
            return f"learning paused: {in_a_row} versions in a row were worse on the probe set (POST /tlm/resume)"
        return None

    def run(self, stop: "list[bool]") -> None:
        if self.learner.current is None:
            self.status("starting", "measuring and publishing v0")
            self.learner.publish_first()
        self.status("waiting")
        while not stop:
            paused = self.guard_paused()
            if paused:
                self.status("paused", paused)
                time.sleep(POLL_S)
                continue
            window = self.next_window()
            if window is None:
                self.status("waiting")
                time.sleep(POLL_S)
                continue
            self.status("learning", f"window of {len(window)} requests from seq {window[0]['seq']}")
            outcome = self.learner.learn(window, window[-1]["seq"] + 1)
            self.next_seq = outcome["next_seq"]
            self.pending = self.pending[len(window) :]
            self.totals["windows"] += 1
            for key in ("learned", "selected", "skipped_steps", "optimizer_steps"):
                self.totals[key] += int(outcome.get(key) or 0)
            probe = outcome["probe_answer_bpb"]
            print(
                f"tlm serve: v{outcome['version']} {outcome['status']} (requests {outcome['first_seq']}.."
                f"{outcome['next_seq'] - 1}, learned {outcome['learned']}, selected {outcome['selected']}"
                + (f", probe answer bpb {probe:.4f}" if probe is not None else "")
                + ")",
                flush=True,
            )


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the server dies (even by kill -9), so no learner outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the server is already gone
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    output_dir = argv[0]
    _die_with_parent()
    with contextlib.suppress(OSError):
        os.nice(NICE)
    store = Store(output_dir)
    stop: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    with open(os.path.join(output_dir, outputs.LEARNER_LOCK_FILE), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one learner per output_dir (a previous one finishes dying first)
        store.remove_partial()
        with open(os.path.join(output_dir, outputs.SERVE_RECIPE_FILE), encoding="utf-8") as f:
            recipe = json.load(f)
        loop = Loop(WindowLearner(recipe, store), store)
        loop.run(stop)


if __name__ == "__main__":
    main()
