"""Learning while serving (``llamafactory-cli api``): the learner's windows, the drift guard, the server's limits."""

from dataclasses import dataclass

from tlm_plugin.errors import TLMConfigError
from tlm_plugin.settings.base import SettingsGroup, setting


@dataclass
class ServeArguments(SettingsGroup):
    """The learner behind the server (windows of ``tlm_chunk_size`` prompts), its drift guard, the HTTP limits."""

    purpose = "learning while serving (tlm_mode: serve)"

    tlm_learn: bool = setting(
        True,
        "Serve mode: learn from the traffic. false: the same server, every prompt still kept in tlm_stream.jsonl, no "
        "learner (the baseline to compare against, or a server that only collects prompts to learn from later).",
    )
    tlm_serve_window_s: float | None = setting(
        None,
        "Serve mode: also close a window after this many seconds since its first prompt, with fewer than "
        "tlm_chunk_size prompts (low traffic still learns). Default: windows of exactly tlm_chunk_size prompts, "
        "which makes the learning a deterministic function of the stream.",
        low=0,
        low_open=True,
    )
    tlm_probe_dataset: str | None = setting(
        None,
        "Serve mode: a dataset (name in dataset_info.json) of prompts with reference answers that every new adapter "
        "version is measured on before it is served: the answers' bits per byte. Without it the prompts' own "
        "log-perplexity before / after each window is recorded and no version is ever held back.",
    )
    tlm_probe_tolerance: float = setting(
        0.01,
        "Serve mode: a version whose probe answer bits per byte exceed the best served version's by more than this "
        "is not served (recorded as rejected; the learner goes back to the current version).",
        low=0,
    )
    tlm_probe_patience: int = setting(
        3,
        "Serve mode: rejected versions in a row after which learning pauses (POST /tlm/resume or a rollback "
        "resumes it).",
        low=1,
    )
    tlm_serve_retries: int = setting(
        3,
        "Serve mode: restarts of a learner that failed before learning pauses with its error in GET /tlm/status "
        "(answering never stops).",
        low=0,
    )
    tlm_serve_queue_limit: int = setting(
        64,
        "Serve mode: chat requests in the server at once (answering or waiting); one more is answered 429 with "
        "Retry-After.",
        low=1,
    )
    tlm_serve_max_body_bytes: int = setting(
        1_000_000,
        "Serve mode: the largest request body accepted (413 above it).",
        low=1,
    )
    tlm_serve_allow_open: bool = setting(
        False,
        "Serve mode: start on an address other than loopback without API_KEY. Every prompt is stored and learned "
        "from, so by default such a server refuses to start.",
    )

    def check_group(self) -> None:
        if self.tlm_mode == "serve" and self.tlm_reset != "never":
            raise TLMConfigError("tlm_reset applies to tlm_mode online / per_prompt, not to tlm_mode: serve.")

    def inert_fields(self) -> dict[str, str]:
        inert = {}
        if self.tlm_probe_dataset is None:
            why = "it configures the drift guard, which needs tlm_probe_dataset"
            inert.update(tlm_probe_tolerance=why, tlm_probe_patience=why)
        if not self.tlm_learn:
            why = "it configures the learner, and tlm_learn is false"
            for key in ("tlm_serve_window_s", "tlm_probe_dataset", "tlm_serve_retries"):
                inert[key] = why
        return inert
