"""The codes of a refused or failed local round, shared by every caller of a client (a Flower error reply, the
private trainer's socket reply). Flower's own codes are < 100."""

BUDGET_EXCEEDED = 100  # the round would exceed the client's budget: refused, nothing trained or charged
CLIENT_CONFIG = 101  # the run's settings or the node's config / data are invalid: nothing trained or charged
UPDATE_FAILED = 102  # the local round failed after its charge (e.g. every sampled gradient was non-finite)
POLICY = 103  # the run's settings break the node's own privacy policy (`policy.NodePolicy`): nothing charged
BAD_REQUEST = 110  # the private trainer could not read the request (framing, JSON, caps, fields): nothing charged
UNAUTHORIZED = 111  # the request did not present the trainer's token: nothing charged
OUT_OF_ORDER = 112  # the request's round is before a round this run already trained: nothing charged
TRAINER_UNAVAILABLE = 113  # the relay could not reach the private trainer (or lost it mid-request)
RUN_CONFIG_CHANGED = 114  # the request's run config is not the one this run already trained with: nothing charged
NOT_CHARGED = (BUDGET_EXCEEDED, CLIENT_CONFIG, POLICY, BAD_REQUEST, UNAUTHORIZED, OUT_OF_ORDER, RUN_CONFIG_CHANGED)
ERROR_NAMES = {
    BUDGET_EXCEEDED: "budget exceeded",
    CLIENT_CONFIG: "invalid configuration",
    UPDATE_FAILED: "update failed",
    POLICY: "refused by the node's policy",
    BAD_REQUEST: "bad request to the private trainer",
    UNAUTHORIZED: "unauthorized at the private trainer",
    OUT_OF_ORDER: "round out of order at the private trainer",
    TRAINER_UNAVAILABLE: "private trainer unavailable",
    RUN_CONFIG_CHANGED: "run config changed mid-run at the private trainer",
}
