"""Render an evaluation Report: the score table (report.md, the live ROUGE tab and the CLI all
print this one), the chart, and the report folder (predictions.jsonl, metrics.json, report.md,
rouge.png)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from phisum.evaluation import METRIC_LABELS, Report
from phisum.files import check_output_dir, replace_folder

EXAMPLES_SHOWN = 3


def save_report(report: Report, out_dir: Path, example_text: bool = True, overwrite: bool = False) -> Path:
    """Write the report folder atomically; an existing folder is replaced only with `overwrite`."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    with replace_folder(out_dir) as tmp:
        with open(tmp / "predictions.jsonl", "w", encoding="utf-8") as handle:
            for row in report.rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(report.metrics(), indent=2, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
        plot_report(report, tmp / "rouge.png")
        (tmp / "report.md").write_text(render_markdown(report, example_text), encoding="utf-8")
    return out_dir


def plot_report(report: Report, path: Path) -> Path:
    """Grouped bars: one group per metric, one bar per system, 95% bootstrap CI whiskers."""
    import matplotlib

    matplotlib.use("Agg")  # no display here, and safe inside a Gradio worker thread
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    metrics = report.metrics_used
    width = 0.8 / len(report.systems)
    for k, system in enumerate(report.systems):
        means = [report.aggregate[system][m] for m in metrics]
        ci = [report.intervals[system][m] for m in metrics]
        err = [[mean - c["low"] for mean, c in zip(means, ci)], [c["high"] - mean for mean, c in zip(means, ci)]]
        xs = [i + (k - (len(report.systems) - 1) / 2) * width for i in range(len(metrics))]
        bars = ax.bar(xs, means, width, yerr=err, capsize=4, label=system)
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in means], label_type="center", fontsize=7, color="white")
    ax.set_xticks(range(len(metrics)), [METRIC_LABELS[m] for m in metrics])
    ax.set_ylabel("score (max over references)")
    top = max((report.intervals[s][m]["high"] for s in report.systems for m in metrics), default=0.0)
    top = max(0.05, top) if math.isfinite(top) else 1.0
    ax.set_ylim(0, top * 1.45)
    title = f"{report.task}: {len(report.rows)} items, 95% bootstrap CI"
    if report.delta:  # the paired difference and its CI above each group
        title += f"; delta = {report.systems[1]} - {report.systems[0]}"
        for i, m in enumerate(metrics):
            d = report.delta[m]
            ax.text(i, top * 1.08, f"delta {d['mean']:+.3f}\n[{d['low']:+.3f}, {d['high']:+.3f}]",
                    ha="center", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper center", ncol=len(report.systems), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def score_table(report: Report, first_reference: bool = False, intervals: bool = True) -> str:
    """The markdown score table: one row per system (with 95% CIs), and the paired difference."""
    metrics = report.metrics_used
    aggregate = report.first_ref_aggregate if first_reference else report.aggregate
    delta = report.delta_first_ref if first_reference else report.delta
    lines = ["| system | " + " | ".join(METRIC_LABELS[m] for m in metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    for system in report.systems:
        cells = []
        for m in metrics:
            ci = report.intervals[system][m] if intervals and not first_reference else None
            cells.append(f"{aggregate[system][m]:.3f}" + (f" [{ci['low']:.3f}, {ci['high']:.3f}]" if ci else ""))
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    if delta:
        label = f"{report.systems[1]} - {report.systems[0]} (95% CI)"
        lines.append(f"| **{label}** | " + " | ".join(
            f"**{delta[m]['mean']:+.3f}** [{delta[m]['low']:+.3f}, {delta[m]['high']:+.3f}]" for m in metrics) + " |")
    return "\n".join(lines)


def failures_line(report: Report) -> str:
    """'' when nothing failed, else one line of counts per system."""
    parts = [f"{s}: {v['empty']} empty, {v['cut_at_max_new_tokens']} cut at the token limit"
             for s, v in report.failures.items() if any(v.values())]
    return ("Generation failures (counted, still scored): " + "; ".join(parts)) if parts else ""


def _input_word(report: Report) -> str:
    from phisum.tasks import TASKS

    task = TASKS.get(report.task)
    return task.input_word if task else "input"


def _quote(text: str, limit: int = 600) -> str:
    text = text if len(text) <= limit else text[:limit] + " ..."
    return "\n".join("> " + line for line in (text or "(empty output)").splitlines()) or "> (empty output)"


def _examples(report: Report, with_text: bool = True) -> list[str]:
    """Items where the second system gained (or lost) most ROUGE-Lsum; with one system, its best and worst.

    with_text=False names the items and their scores only: for reports committed beside code,
    where the dataset's text must not be copied (the text stays in predictions.jsonl)."""
    systems = report.systems
    if len(systems) == 2:
        key = lambda r: r["scores"][systems[1]]["rougeLsum"] - r["scores"][systems[0]]["rougeLsum"]  # noqa: E731
        title = f"ROUGE-Lsum {systems[1]} - {systems[0]}"
    else:
        key = lambda r: r["scores"][systems[0]]["rougeLsum"]  # noqa: E731
        title = f"ROUGE-Lsum of {systems[0]}"
    ranked = sorted(report.rows, key=key)
    count = min(EXAMPLES_SHOWN, len(ranked) // 2 or 1)
    lines = []
    for heading, picked in (("Best examples", ranked[::-1][:count]), ("Worst examples", ranked[:count])):
        lines += [f"## {heading} (by {title})", ""]
        if not with_text:
            for row in picked:
                scores = "; ".join(f"{s} ROUGE-1 {row['scores'][s]['rouge1']:.3f}, ROUGE-Lsum "
                                   f"{row['scores'][s]['rougeLsum']:.3f}, stop: {row['finish'][s]}" for s in systems)
                lines.append(f"- `{row['id']}` ({title}: {key(row):+.3f}): {scores}")
            lines += ["", "Texts of these items: predictions.jsonl (not committed; it holds the dataset's text).", ""]
            continue
        for row in picked:
            lines += [f"### {row['id']} ({title}: {key(row):+.3f})", "", f"{_input_word(report).capitalize()}:", "", _quote(row["input"], 800),
                      "", "Reference (first of {}):".format(len(row["references"])), "",
                      _quote(row["references"][0]), ""]
            for s in systems:
                sc = row["scores"][s]
                lines += [f"{s} (ROUGE-1 {sc['rouge1']:.3f}, ROUGE-Lsum {sc['rougeLsum']:.3f}, "
                          f"stop: {row['finish'][s]}):", "", _quote(row["outputs"][s]), ""]
    return lines


def render_markdown(report: Report, example_text: bool = True) -> str:
    cfg, ident, gen = report.config, report.identity, report.config.get("generation", {})
    n = len(report.rows)
    lines = [f"# {report.task} evaluation: {' vs '.join(report.systems)}", "",
             f"{n} items; base model `{ident.get('base_model')}` ({ident.get('profile')} profile, "
             f"{ident.get('backend', 'transformers')} backend"
             + (f", {ident['dtype']} on {ident.get('device')}" if ident.get("dtype") else "") + ")."]
    for name, info in ident.get("adapters", {}).items():
        lines.append(f"Adapter `{name}`: `{info['path']}` (adapter_model.safetensors sha256 "
                     f"`{(info['sha256'] or 'missing')[:16]}...`).")
    if report.data:
        lines.append(f"Data: {report.data.get('summary', report.data.get('source'))}; "
                     f"sha256 `{(report.data.get('sha256') or 'n/a')[:16]}`; {report.data.get('selection', '')}")
    lines += ["", "## Scores (max over references, mean over items; [95% bootstrap CI])", "",
              score_table(report), "",
              "## Scores against the first reference only", "",
              score_table(report, first_reference=True), "",
              f"Scoring: rouge-score, stemming {'on' if cfg.get('use_stemmer') else 'off'}; ROUGE-Lsum sentences "
              f"split with {cfg.get('sentence_splitter')}; each metric is the max over an item's references; "
              f"delta CI: paired bootstrap, {cfg.get('bootstrap', {}).get('resamples')} resamples, "
              f"seed {cfg.get('bootstrap', {}).get('seed')}."
              + (f" {METRIC_LABELS['semsim']}: cosine similarity of `{cfg['semantic'].get('model')}` sentence "
                 "embeddings (meaning rather than shared words; 1 = same direction)." if cfg.get("semantic") else ""),
              "",
              f"Generation: greedy={not gen.get('do_sample')}, max_new_tokens={gen.get('max_new_tokens')}, "
              f"batch size {cfg.get('batch_size')} rows, same prompt for every system.", "",
              "## Generation failures (counted, still scored)", "",
              "| system | empty output | cut at max_new_tokens (no EOS) |", "|---|---:|---:|"]
    for s in report.systems:
        f = report.failures[s]
        lines.append(f"| {s} | {f['empty']} of {n} | {f['cut_at_max_new_tokens']} of {n} |")
    truncated = sum(bool(r["notices"]) for r in report.rows)
    lines += ["", f"Inputs truncated to fit the context: {truncated}.",
              f"Throughput: {report.items_per_second:.2f} items/s "
              f"({60 * report.items_per_second * len(report.systems):.1f} summaries/min), {report.seconds:.0f} s "
              "of generation.", "", "![ROUGE](rouge.png)", "", *_examples(report, example_text)]
    return "\n".join(lines).rstrip() + "\n"
