"""A self-contained HTML report of a run: loss curves and per-language bits-per-byte (embedded PNGs)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from levante.util import atomic_write_text  # noqa: E402


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    train, evals = [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            (evals if "eval" in record else train).append(record)
    return train, evals


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def loss_figure(train: list[dict], evals: list[dict]) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["loss"] for r in train], label="train loss")
    if any("mtp_loss" in r for r in train):
        ax.plot(steps, [r.get("mtp_loss", float("nan")) for r in train], label="MTP loss", alpha=0.7)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval"]["loss"] for r in evals], "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def bpb_figure(before: dict, after: dict) -> str:
    langs = sorted(after)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = range(len(langs))
    if before:
        ax.bar([x - 0.2 for x in xs], [before[lang]["bpb"] for lang in langs], width=0.4, label="untrained")
    ax.bar([x + 0.2 for x in xs], [after[lang]["bpb"] for lang in langs], width=0.4, label="trained")
    ax.set_xticks(list(xs), langs)
    ax.set_ylabel("bits / byte (held-out)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return _png(fig)


def chat_section(chat: dict, examples_per_lang: int = 2) -> str:
    """Before/after answers to the same held-out prompts, and the chat metrics of each model."""
    models = chat["models"]
    names = list(models)
    metric_rows = "".join(
        f"<tr><td>{label}</td>" + "".join(f"<td>{models[n][key]:.0%}</td>" for n in names) + "</tr>"
        for key, label in (("end_of_turn_rate", "answers ending with &lt;|end|&gt;"),
                           ("same_language_rate", "answers in the prompt's language"),
                           ("preference_accuracy", "held-out pairs: log p(chosen) &gt; log p(rejected)")))
    dpo = chat.get("dpo_eval") or {}
    extra = (f"<p>DPO held-out reward accuracy {dpo['reward_accuracy']:.0%}, mean reward margin "
             f"{dpo['reward_margin']:.3f} ({dpo['pairs']} pairs).</p>" if "reward_accuracy" in dpo else "")
    shown, rows = {}, ""
    for i, p in enumerate(chat["prompts"]):
        if shown.get(p["lang"], 0) >= examples_per_lang:
            continue
        shown[p["lang"]] = shown.get(p["lang"], 0) + 1
        rows += (f"<tr><td>{html.escape(p['lang'])}</td><td>{html.escape(p['user'])}</td>"
                 + "".join(f"<td>{html.escape(models[n]['answers'][i])}</td>" for n in names) + "</tr>")
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    return (f"<h2>Chat</h2><p>SFT {chat['steps']['sft']} steps, then DPO {chat['steps']['dpo']} steps on the "
            f"bundled post-training set; {len(chat['prompts'])} held-out prompts, greedy answers.</p>"
            f"<table><tr><th></th>{head}</tr>{metric_rows}</table>{extra}"
            f"<table class=chat><tr><th>lang</th><th>prompt</th>{head}</tr>{rows}</table>")


def _data_section(data: dict | None) -> str:
    """Per split and language: documents kept, rejected and removed as duplicates by data prepare."""
    if not data:
        return ""
    rows = "".join(f"<tr><td>{html.escape(split)}</td><td>{html.escape(lang)}</td><td>{v['kept']}</td>"
                   f"<td>{v['rejected']}</td><td>{v['duplicates']}</td></tr>"
                   for split, langs in data.items() for lang, v in sorted(langs.items()))
    return ("<h2>Data</h2><table><tr><th>split</th><th>lang</th><th>kept</th><th>rejected</th>"
            f"<th>duplicates</th></tr>{rows}</table>")


def write_report(out_dir: Path, eval_result: dict, samples: list[tuple[str, str]], summary: dict,
                 chat: dict | None = None, data: dict | None = None) -> Path:
    out_dir = Path(out_dir)
    train, evals = read_metrics(out_dir / "metrics.jsonl")
    after = eval_result["trained"]["per_language"]
    before = eval_result.get("untrained", {}).get("per_language", {})
    rows = "".join(
        f"<tr><td>{html.escape(lang)}</td><td>{before.get(lang, {}).get('bpb', float('nan')):.3f}</td>"
        f"<td>{after[lang]['bpb']:.3f}</td><td>{after[lang]['loss']:.3f}</td></tr>"
        for lang in sorted(after))
    sample_html = "".join(f"<h3>{html.escape(p)}</h3><pre>{html.escape(t)}</pre>" for p, t in samples)
    facts = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in summary.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Levante quickstart report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:900px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
pre{{white-space:pre-wrap;background:#f6f6f6;padding:8px}}table.chat td{{text-align:left}}</style></head><body>
<h1>Levante quickstart report</h1><ul>{facts}</ul>{_data_section(data)}
<h2>Loss</h2><img alt="loss curves" src="data:image/png;base64,{loss_figure(train, evals)}">
<h2>Held-out bits per byte</h2><img alt="bits per byte" src="data:image/png;base64,{bpb_figure(before, after)}">
<table><tr><th>lang</th><th>untrained bpb</th><th>trained bpb</th><th>trained loss</th></tr>{rows}</table>
<h2>Samples</h2>{sample_html}{chat_section(chat) if chat else ""}</body></html>"""
    path = out_dir / "report.html"
    atomic_write_text(path, page)
    return path
