"""What a run says when it ends: ``tlm_summary.json`` (the numbers) and a few lines on the console (the gist)."""

import os
from typing import Any

import llamafactory
import numpy as np

import tlm_plugin
from tlm_plugin.train import outputs


def summary(rows, stats, tlm_args, training_args, timings, log_p0_used=None, pool_store=None) -> dict[str, Any]:
    def mean(values):
        values = [v for v in values if v is not None and v == v]
        return float(np.mean(values)) if values else None

    selected = [r for r in rows if r.get("selected")]
    answered = [r for r in rows if r.get("answer_bpb") is not None and not r.get("answer_truncated")]
    result = {
        "mode": tlm_args.tlm_mode,
        "settings": tlm_args.to_dict(),
        "loss_tokens": tlm_args.tlm_loss_tokens,
        "log_p0_used": log_p0_used,
        "n_prompts": len(rows),
        "n_selected": len(selected),
        "n_skipped": len(rows) - len(selected),
        "mean_log_ppl_before": mean([r.get("log_ppl") for r in rows]),
        "mean_log_ppl_after": mean([r.get("log_ppl_after") for r in rows]),
        "mean_log_ppl_before_selected": mean([r.get("log_ppl") for r in selected]),
        "mean_log_ppl_after_selected": mean([r.get("log_ppl_after") for r in selected]),
        "mean_log_ppl_user_before": mean([r.get("log_ppl_user") for r in rows]),
        "mean_log_ppl_user_after": mean([r.get("log_ppl_user_after") for r in rows]),
        "backward_passes": stats["backward_rows"],
        "optimizer_steps": stats["optimizer_steps"],
        "skipped_steps": stats["skipped_steps"],
        "overflow_steps": stats.get("overflow_steps", 0),
        "nonfinite_rows": stats["nonfinite_rows"],
        "score_shared_prefix_tokens": stats.get("score_shared_prefix_tokens", 0),
        **({"per_prompt": stats["per_prompt"]} if "per_prompt" in stats else {}),
        **({"pool_store": pool_store} if pool_store else {}),
        "wall_time_s": {k: round(v, 3) for k, v in timings.items()},
        "world_size": training_args.world_size,
        "versions": {"llamafactory_tlm": tlm_plugin.__version__, "llamafactory": llamafactory.__version__},
    }
    if tlm_args.tlm_eval_answers:
        result.update(
            {
                "n_answers": len(answered),
                "n_answers_missing": sum(r.get("answer_bpb_base") is None for r in rows),
                "n_answers_truncated": sum(bool(r.get("answer_truncated")) for r in rows),
                "mean_answer_bpb_base": mean([r.get("answer_bpb_base") for r in answered]),
                "mean_answer_bpb": mean([r.get("answer_bpb") for r in answered]),
                "mean_answer_content_bpb_base": mean([r.get("answer_content_bpb_base") for r in answered]),
                "mean_answer_content_bpb": mean([r.get("answer_content_bpb") for r in answered]),
            }
        )
    return result


def console_lines(result: dict[str, Any], output_dir: str, trained: bool = True) -> list[str]:
    """The end-of-run summary: mode and method, selected n/N, steps, mean log-perplexity before -> after, answer
    bits per byte when measured, and where the files are."""
    settings = result.get("settings", {})
    method = settings.get("tlm_selector", "?")
    lines = [f"stage tlm: {result['mode']} / {method}, {result['n_prompts']} prompts"]
    if not trained:
        lines.append("  no adaptation (do_train: false): the unadapted model's scores and answers")
    else:
        per_prompt = result.get("per_prompt") or {}
        if per_prompt:
            lines.append(
                f"  learned on {per_prompt.get('n_trained', result['n_selected'])}/{result['n_prompts']} prompts; "
                f"{result['optimizer_steps']} optimizer steps, {result['skipped_steps']} skipped"
            )
        else:
            lines.append(
                f"  selected {result['n_selected']}/{result['n_prompts']}; {result['optimizer_steps']} optimizer "
                f"steps, {result['skipped_steps']} skipped"
            )
    before, after = result.get("mean_log_ppl_before"), result.get("mean_log_ppl_after")
    if before is not None:
        lines.append(
            f"  mean log-perplexity of the prompts: {before:.4f}"
            + (f" -> {after:.4f}" if after is not None and trained else "")
        )
    bpb_base, bpb = result.get("mean_answer_bpb_base"), result.get("mean_answer_bpb")
    if bpb_base is not None:
        lines.append(
            f"  reference answers, bits per byte: {bpb_base:.4f}"
            + (f" -> {bpb:.4f}" if bpb is not None and trained else "")
            + f" (n={result.get('n_answers')})"
        )
    present = [name for name in _SHOWN if os.path.exists(os.path.join(output_dir, name))]
    lines.append(f"  outputs: {output_dir} ({', '.join(present)})")
    return lines


_SHOWN = (
    "adapter_model.safetensors",
    outputs.SUMMARY_FILE,
    outputs.SCORES_FILE,
    outputs.PREDICTIONS_FILE,
    outputs.SIFT_SELECTION_FILE,
    outputs.GENERATED_FILE,
    outputs.DEMOS_FILE,
)
