"""The codes of a refused or failed local round (see `peft_lalora_relay.codes`, where they live so that the relay
ClientApp reads them without importing torch)."""

from peft_lalora_relay.codes import (  # noqa: F401 - re-exported
    BAD_REQUEST,
    BUDGET_EXCEEDED,
    CLIENT_CONFIG,
    ERROR_NAMES,
    NOT_CHARGED,
    OUT_OF_ORDER,
    POLICY,
    RUN_CONFIG_CHANGED,
    TRAINER_UNAVAILABLE,
    UNAUTHORIZED,
    UPDATE_FAILED,
)
