"""`levante plan` as rich tables (the formulas live in formulas.py, free of any UI import)."""

from __future__ import annotations

from levante.plan.hardware import GPUS


def _n(x: float) -> str:
    """3 significant figures with a unit suffix: the estimates carry no more precision than that."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _gb(b: float) -> str:
    return f"{b / 1e9:.3g} GB"


def format_plan(p: dict, title: str = "Levante plan"):
    """A rich renderable (tables) for a `plan()` dict."""
    from rich.console import Group
    from rich.table import Table

    params = Table(title=title, show_header=True)
    params.add_column("parameters")
    params.add_column("total", justify="right")
    params.add_column("active / token", justify="right")
    for k, v in p["breakdown"]["total"].items():
        if k != "mtp_proj" and (v or k == "head"):
            params.add_row(k, f"{v:,}", f"{p['breakdown']['active'][k]:,}")
    params.add_row("[b]main model[/b]", f"[b]{p['total_params']:,}[/b] ({_n(p['total_params'])})",
                   f"[b]{p['active_params']:,}[/b] ({_n(p['active_params'])})")
    if p["mtp_params"]:
        params.add_row("MTP modules (separate)", f"{p['mtp_params']:,} ({_n(p['mtp_params'])})", "")

    c = Table(title="compute and memory", show_header=False)
    c.add_column("what")
    c.add_column("value")
    f = p["flops"]
    c.add_row("train FLOPs / token", f"{_n(p['flops_per_token'])} (matmul {_n(f['matmul'])} + "
              f"attention {_n(f['attention'])} at seq {p['seq_len']})")
    c.add_row("tokens", f"{_n(p['tokens'])} ({p['tokens_note']})")
    c.add_row("train FLOPs", f"{p['train_flops']:.3g}")
    for k, hours in p["gpu_hours"].items():
        c.add_row(f"{GPUS[k]['name']} GPU-hours @ MFU {p['mfu']:g}", _n(hours))
    kv = p["kv_cache"]
    c.add_row("KV cache / token (MLA latent)", f"{kv['mla_bytes_per_token'] / 1024:.3g} KiB")
    c.add_row("KV cache / token (if full MHA)", f"{kv['mha_bytes_per_token'] / 1024:.3g} KiB "
              f"({kv['mha_over_mla']:.3g}x more)")
    for card, n in p["min_gpus"].items():
        c.add_row(f"min GPUs, {card} cards (AdamW)", "none up to 131072" if n is None else str(n))
    m = p["memory"]
    if m is None:
        c.add_row("memory per GPU", "does not fit on any sensible count")
    else:
        c.add_row("GPUs / expert parallel", f"{p['gpus']} ({p['gpus_note']}) / EP {m['expert_parallel']}")
        c.add_row(f"model state / GPU ({m['zero_stage']})",
                  f"AdamW {_gb(m['state_bytes']['adamw'])}, Muon {_gb(m['state_bytes']['muon'])}")
        c.add_row("gathered weights (FSDP)", _gb(m["gathered_bytes"]))
        a = m["activation_bytes"]
        c.add_row("activations / micro-batch", f"{_gb(a['full_recompute'])} recomputed, "
                  f"{_gb(a['no_recompute'])} without")
        t = m["total_bytes"]
        c.add_row("total / GPU", f"AdamW {_gb(t['adamw'])}, Muon {_gb(t['muon'])} "
                  f"({'fits' if m['fits'] else 'does NOT fit'} {GPUS[p['gpu']]['name']})")
        c.add_row("wall clock", f"{p['wall_clock_days']:.3g} days on {p['gpus']} x {GPUS[p['gpu']]['name']}")
    if "implied_mfu" in p:
        c.add_row("implied MFU", f"{p['implied_mfu']:.1%} for {p['gpu_hours_given']:,.0f} GPU-hours")
    if "energy_kwh" in p:
        c.add_row("energy", f"{p['energy_kwh'] / 1e3:,.0f} MWh at TDP, PUE {p['pue']:g}")
    if "cost" in p:
        c.add_row("cost", f"{p['cost']:,.0f} at the given price per GPU-hour")
    notes = "\n".join(f"[dim]- {a}[/dim]" for a in p["assumptions"])
    return Group(params, c, notes)
