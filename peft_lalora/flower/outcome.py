"""What a Flower run really achieved, from the strategy's round history: the rounds aggregated, the rounds lost
(aborted below quorum, or never run because the run stopped or lost its SuperLink) and how it ended. The report,
the card and the decision to publish read it here, once. A run ends `completed` (every configured round was
attempted), `stopped` (its quorum became unreachable) or `failed` (an exception, e.g. the SuperLink went away).
"""

from __future__ import annotations

from ..errors import LALoraError

NOT_RUN = "not run: the run ended before this round"


class FlowerRunError(LALoraError, RuntimeError):
    """A Flower run that aggregated nothing, stopped early or lost its SuperLink (the ServerApp exits non-zero)."""


class QuorumUnreachable(FlowerRunError):
    """Raised by `LALoraStrategy` after `max-aborted-rounds` consecutive aborted rounds: stop asking clients."""


def outcome(history: list, num_rounds: int, error: BaseException | None = None) -> dict:
    """{status, rounds_configured, rounds_aggregated, rounds_lost: {round: why}, error} of a run's history."""
    aggregated = [h["round"] for h in history if not h["aborted"]]
    lost = {str(h["round"]): _why(h) for h in history if h["aborted"]}
    lost.update({str(r): NOT_RUN for r in range(len(history), num_rounds)})
    status = "completed" if error is None else "stopped" if isinstance(error, QuorumUnreachable) else "failed"
    return {
        "status": status,
        "rounds_configured": num_rounds,
        "rounds_aggregated": aggregated,
        "rounds_lost": lost,
        "error": None if error is None else f"{type(error).__name__}: {error}",
    }


def _why(entry: dict) -> str:
    failed = "; ".join(f"client {k}: {v}" for k, v in entry["failed"].items()) or "no client was sent the round"
    return f"aborted, {len(entry['survivors'])} client(s) survived ({failed})"


def failure_message(result: dict, output_dir: str) -> str | None:
    """The error text of a run that must end non-zero, or None for a run that completed with an aggregated round."""
    aggregated, lost = result["rounds_aggregated"], sorted(int(r) for r in result["rounds_lost"])
    if result["status"] == "completed" and aggregated:
        return None
    head = {
        "completed": f"No round of the {result['rounds_configured']} was aggregated",
        "stopped": "The run stopped early: its quorum can no longer be reached",
        "failed": "The run failed during its rounds (a lost SuperLink, or an error in a round)",
    }[result["status"]]
    cause = f" ({result['error']})" if result["error"] else ""
    if lost and result["rounds_lost"][str(lost[0])] != NOT_RUN:
        cause += f"; round {lost[0]}: {result['rounds_lost'][str(lost[0])]}"
    kept = (
        f"the adapter of the {len(aggregated)} aggregated round(s) {aggregated} is saved in {output_dir!r} but "
        "was NOT pushed"
        if aggregated
        else "nothing was published: no adapter, no model card, no push"
    )
    return (
        f"{head}{cause}. Rounds lost: {lost}; {kept}. What the clients charged stays on their ledgers: see "
        f"`unreported`, `refused` and `rounds_lost` in {output_dir}/privacy_report.json and flower_history.json."
    )
