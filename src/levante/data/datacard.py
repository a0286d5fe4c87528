"""The human-readable side of `levante data prepare`: report.html (charts, embedded PNGs, offline)
and DATACARD.md, a summary of the training content (sources, licences, languages, volumes, filters,
dates) of the kind the EU AI Act (Art. 53(1)(d)) asks general-purpose model providers to publish."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from levante.util import atomic_write_text


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _bar(title: str, labels: list[str], series: dict[str, list[float]], ylabel: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 0.38 * len(labels) + 2), 3.2))
    bottom = [0.0] * len(labels)
    for name, values in series.items():
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=60 if len(labels) > 8 else 0)
    if len(series) > 1:
        ax.legend()
    try:
        return _png(fig)
    finally:
        plt.close(fig)


def write_html(path: Path, report: dict) -> None:
    langs = sorted(report["languages"])
    lang = report["languages"]
    charts = [("Documents per language",
               _bar("documents per language", langs, {k: [lang[x][k] for x in langs]
                                                      for k in ("kept", "rejected", "duplicates")}, "documents"))]
    if report["rejected"]:
        reasons = sorted(report["rejected"], key=report["rejected"].get, reverse=True)
        counts = {"rejected": [report["rejected"][r] for r in reasons]}
        charts.append(("Rejections by reason", _bar("rejected documents", reasons, counts, "documents")))
    if report["licenses"]:
        lics = sorted(report["licenses"])
        counts = {"bytes": [report["licenses"][x]["bytes"] for x in lics]}
        charts.append(("Kept bytes per licence", _bar("kept bytes per licence", lics, counts, "bytes")))
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v['kept']:,}</td><td>{v['bytes']:,}</td><td>{v['rejected']:,}"
                   f"</td><td>{v['duplicates']:,}</td></tr>" for k, v in sorted(lang.items()))
    body = "".join(f"<h2>{t}</h2><img alt='{t}' src='data:image/png;base64,{png}'>" for t, png in charts)
    totals = (f"documents in {report['documents_in']:,} · kept {report['kept']:,} · rejected "
              f"{sum(report['rejected'].values()):,} · duplicates {report['duplicates']:,} · PII replaced "
              f"{sum(report['pii'].values()):,}")
    atomic_write_text(path, f"""<!doctype html><html><head><meta charset="utf-8"><title>data prepare report</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}td,th{{padding:2px 10px;text-align:right}}</style>
</head><body><h1>levante data prepare</h1><p>{totals}</p>{body}
<h2>Per language</h2><table><tr><th>lang</th><th>kept</th><th>bytes</th><th>rejected</th><th>duplicates</th></tr>
{rows}</table><h2>PII</h2><p>{html.escape(str(report['pii']))}</p></body></html>
""")


def write_datacard(path: Path, report: dict, created: str) -> None:
    cfg = report["config"]
    lines = [
        "# Data card", "",
        f"Produced by `levante data prepare` on {created} (UTC).", "",
        "## Volumes", "",
        f"- documents in: {report['documents_in']:,}; kept: {report['kept']:,} ({report['bytes_kept']:,} bytes of "
        f"text); rejected: {sum(report['rejected'].values()):,}; duplicates removed: {report['duplicates']:,}",
        f"- inputs excluded (TDM opt-out): {len(report['excluded_inputs'])}", "",
        "## Sources and licences", "",
        "| source | licence |", "|---|---|",
        *[f"| {i['source']} | {i['license']} |" for i in report["inputs"]],
        *[f"| {e['source']} | excluded: {e['reason']} |" for e in report["excluded_inputs"]], "",
        "| licence | documents | bytes |", "|---|---:|---:|",
        *[f"| {k} | {v['kept']:,} | {v['bytes']:,} |" for k, v in report["licenses"].items()], "",
        "## Languages", "",
        "| language | kept | bytes | rejected | duplicates |", "|---|---:|---:|---:|---:|",
        *[f"| {k} | {v['kept']:,} | {v['bytes']:,} | {v['rejected']:,} | {v['duplicates']:,} |"
          for k, v in report["languages"].items()], "",
        "## Processing", "",
        f"- language identification: py3langid (offline model), allowed languages "
        f"{', '.join(cfg['langid']['allowed'])}; default minimum score {cfg['langid']['min_score']}",
        f"- quality filters: {'on' if cfg['filters']['enabled'] else 'off'} (Gopher / FineWeb-2 style rules; "
        f"per-language overrides for {', '.join(sorted(cfg['filters']['lang'])) or 'none'})",
        f"- deduplication: exact {'on' if cfg['dedup']['exact'] else 'off'}, near-duplicate MinHash "
        f"{'on' if cfg['dedup']['near'] else 'off'} (word {cfg['dedup']['ngram']}-grams, Jaccard >= "
        f"{cfg['dedup']['threshold']})",
        f"- personal data: {'scrubbed' if cfg['pii']['enabled'] else 'not scrubbed'} "
        f"({', '.join(cfg['pii']['types'])}); replaced: "
        f"{', '.join(f'{k} {v:,}' for k, v in report['pii'].items()) or 'none'}", "",
        "## Rejections", "",
        "| reason | documents |", "|---|---:|",
        *[f"| {k} | {v:,} |" for k, v in sorted(report["rejected"].items(), key=lambda kv: -kv[1])], "",
    ]
    atomic_write_text(path, "\n".join(lines))
