"""The model card's client-level DP paragraph (DP-FedAvg on the server, `privacy_report.json`'s `client_level`),
stated next to the sample-level guarantee (`card._privacy_section`)."""

from __future__ import annotations


def client_level_text(report) -> str:
    """Markdown on the client-level guarantee (`report`: a `PrivacyReport` or None), or "" when the run had none."""
    entry = None if report is None else report.client_level
    if not entry:
        return ""
    guarantee = f"(epsilon = {entry['epsilon']:.4g}, delta = {entry['delta']:g})"
    lead = (
        f"**Client-level DP** {guarantee}: adding or removing one client's whole data changes the distribution of "
        "the released adapters by at most this (DP-FedAvg: clients Poisson-sampled at rate q, each client's "
        "update clipped to S, Gaussian noise z * S on the sum, divided by the expected number of clients; "
        "opacus' RDP accountant over the rounds). It trusts the server, which sees each clipped update."
    )
    if entry.get("noise_seed_warning"):
        lead = (
            "> **Warning:** the server's sampling and noise came from a fixed `noise_seed`: the client-level "
            f"guarantee below does **not** hold.\n\nHad it been secret: {lead}"
        )
    rows = [
        ("client-level epsilon", f"{entry['epsilon']:.4g}"),
        ("client-level delta", f"{entry['delta']:g}"),
        ("noise multiplier z", f"{entry['noise_multiplier']:.4g}"),
        ("client clip norm S", f"{entry['client_clip_norm']:g}"),
        ("client sample rate q = m / N", f"{entry['sample_rate']:.4g}"),
        ("rounds", str(entry["rounds"])),
    ]
    table = ["", "| client-level quantity | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n\n" + lead + "\n" + "\n".join(table)
