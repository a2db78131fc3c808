"""Push an aggregated LA-LoRA adapter folder to the Hugging Face Hub in one commit. Do not use
`PeftModel.push_to_hub` for these adapters: it replaces the card with peft's generic one.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

# What huggingface_hub's own `http_backoff` retries (network errors of its HTTP client; 408, 429, 5xx). Private
# names, but in every huggingface_hub release: they spare us guessing which HTTP client (httpx or httpx2) it uses.
from huggingface_hub.utils._http import _DEFAULT_RETRY_ON_EXCEPTIONS as TRANSIENT_ERRORS
from huggingface_hub.utils._http import _DEFAULT_RETRY_ON_STATUS_CODES as TRANSIENT_STATUS

from ..checks import check_int, check_number
from ..errors import ConfigError, HubError, LALoraWarning
from ..tuner.saving import is_lalora_card

logger = logging.getLogger(__name__)

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
OPTIONAL_FILES = ("README.md", "privacy_report.json", "pooling.safetensors")


def push_adapter_folder(
    folder: str,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload LA-LoRA adapter",
    max_retries: int = 3,
    backoff: float = 1.0,
    allow_fixed_noise_seed: bool = False,
) -> str:
    """
    Upload `REQUIRED_FILES` and, when present, `OPTIONAL_FILES` of `folder` (the card from `write_model_card`,
    the privacy report, `peft_lalora.pooling`'s statistics; nothing else) to the model repo `repo_id` (created if
    needed) in ONE commit; returns the commit URL. What huggingface_hub's `http_backoff` retries (HTTP 408, 429,
    5xx, network errors) is retried: `1 + max_retries` attempts, waiting `backoff * 2**k` s before retry `k + 1`.
    Every failure raises `HubError`; local files are never modified. A folder whose `privacy_report.json` says
    `secret_randomness: false` (a fixed `noise_seed`: no guarantee) is refused unless `allow_fixed_noise_seed`.
    """
    _check_args(folder, repo_id, max_retries, backoff, commit_message)
    contents = _read_artifacts(folder)
    _check_secret_randomness(folder, contents, allow_fixed_noise_seed)
    _check_online()
    api = HfApi(token=_resolve_token(token))
    # Our own loop: `http_backoff` retries one request, and `create_repo` / `create_commit` do not go through it;
    # retrying the pair is safe (the repo is created with exist_ok; a commit lands in one request or not at all).
    attempts = 1 + max_retries
    for attempt in range(1, attempts + 1):
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            operations = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=data) for n, data in contents.items()]
            url = str(api.create_commit(repo_id, operations, commit_message=commit_message).commit_url)
            logger.info("Pushed %s to %s in one commit: %s", sorted(contents), repo_id, url)
            return url
        except Exception as exc:  # noqa: BLE001 - every error is translated below
            if not _is_transient(exc):
                translated = _translate(exc, repo_id, endpoint=api.endpoint)
                if translated is None:  # a programming error: let it surface unchanged
                    raise
                raise translated from exc
            if attempt == attempts:
                raise HubError(
                    f"Pushing {folder!r} to `{repo_id}` failed after {attempts} attempts: {_describe(exc)}. The Hub "
                    f"at {api.endpoint} seems unavailable; retry later or raise `max_retries` (got {max_retries}) "
                    "or `backoff`. Nothing was committed and the local files are unchanged."
                ) from exc
            wait = backoff * 2 ** (attempt - 1)
            logger.warning(
                "Push to %s failed (%s), attempt %d of %d; retrying in %.2f s.",
                repo_id,
                _describe(exc),
                attempt,
                attempts,
                wait,
            )
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def _check_args(folder, repo_id, max_retries, backoff, commit_message) -> None:
    if not isinstance(folder, (str, os.PathLike)) or not os.path.isdir(folder):
        raise HubError(
            f"`folder` must be an existing adapter folder, got {folder!r}. Save the adapter with "
            "`save_pretrained(folder)` first."
        )
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/") or " " in repo_id:
        raise ConfigError(f"`repo_id` must look like 'namespace/name' (or 'name'), got {repo_id!r}.")
    check_int("max_retries", max_retries, 0, "Use 0 for a single attempt.")
    check_number("backoff", backoff, "a number of seconds >= 0", lambda v: v >= 0)
    if not isinstance(commit_message, str) or not commit_message.strip():
        raise ConfigError(f"`commit_message` must be a non-empty string, got {commit_message!r}.")


def _read_artifacts(folder) -> dict:
    """name -> bytes of the files to upload (a snapshot: the push never touches the folder again)."""
    missing = [name for name in REQUIRED_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise HubError(
            f"`folder` {str(folder)!r} has no {' and no '.join(missing)}: an adapter folder needs "
            f"{list(REQUIRED_FILES)}. Save the adapter with `save_pretrained(folder)` first; nothing was pushed."
        )
    files = {name: Path(folder, name) for name in REQUIRED_FILES + OPTIONAL_FILES}
    contents = {name: path.read_bytes() for name, path in files.items() if path.is_file()}
    for name in ("adapter_config.json", "privacy_report.json"):
        if name in contents:
            try:
                json.loads(contents[name])
            except ValueError as exc:
                raise HubError(f"`folder` holds a {name} that is not valid JSON ({exc}); nothing was pushed.") from exc
    card = contents.get("README.md")
    if card is None or not is_lalora_card(card.decode("utf-8", errors="replace")):
        problem = (
            "has no README.md: the repo will have no model card"
            if card is None
            else "has a README.md that is not an LA-LoRA model card (peft's `save_pretrained` writes a generic one "
            "without the privacy guarantee)"
        )
        fix = "Call `peft_lalora.hub.write_model_card(folder, ...)` before pushing."
        warnings.warn(f"{str(folder)!r} {problem}. {fix}", LALoraWarning, stacklevel=3)
    return contents


def _check_secret_randomness(folder, contents: dict, allow: bool) -> None:
    """The noise of a run with a fixed `noise_seed` can be re-created from the seed; publishing it is opt-in."""
    if "privacy_report.json" not in contents:
        return
    report = json.loads(contents["privacy_report.json"])
    if not isinstance(report, dict) or report.get("secret_randomness") is not False:  # missing: an older report
        return
    detail = f" ({report['noise_seed_warning']})" if report.get("noise_seed_warning") else ""
    if not allow:
        raise HubError(
            f"`folder` {str(folder)!r} holds a privacy_report.json with `secret_randomness: false`: the "
            f"run's DP noise came from a fixed `noise_seed`{detail}, so anyone who knows the seed can "
            "re-create it and the adapter carries no privacy guarantee. Retrain without a fixed "
            "`noise_seed` to publish it, or pass `allow_fixed_noise_seed=True` (the "
            "`allow_fixed_noise_seed` argument of the trainer) to upload it anyway; nothing was pushed."
        )
    warnings.warn(
        f"Pushing {str(folder)!r}, trained with a fixed noise seed: it carries no privacy guarantee "
        "(`allow_fixed_noise_seed=True`).",
        LALoraWarning,
        stacklevel=3,
    )


def _check_online() -> None:
    # huggingface_hub reads the variables once, at import; a push also honours them when set later.
    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper()
    if constants.is_offline_mode() or env in constants.ENV_VARS_TRUE_VALUES:
        raise HubError(
            "Cannot push: Hugging Face Hub offline mode is on (`HF_HUB_OFFLINE=1` or "
            "`TRANSFORMERS_OFFLINE=1`). Unset it (`unset HF_HUB_OFFLINE`, before Python starts) to push; "
            "nothing was pushed and the local files are unchanged."
        )


def _resolve_token(token):
    if token is not None:
        if not isinstance(token, str) or not token.strip():
            raise HubError(f"`token` must be a non-empty Hugging Face access token string, got {token!r}.")
        return token
    found = get_token()
    if not found:
        raise HubError(
            "Cannot push: no Hugging Face token found. Log in with `hf auth login`, pass "
            '`token="hf_..."` (a token with write access), or set the `HF_TOKEN` environment variable; '
            "nothing was pushed."
        )
    return found


def _status(exc) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def _is_transient(exc) -> bool:
    if isinstance(exc, HfHubHTTPError):
        return _status(exc) in TRANSIENT_STATUS
    return isinstance(exc, TRANSIENT_ERRORS) and not isinstance(exc, OfflineModeIsEnabled)


def _describe(exc) -> str:
    status = _status(exc)
    return f"HTTP {status}" if status is not None else f"{type(exc).__name__}: {exc}"


def _translate(exc, repo_id: str, endpoint: str) -> HubError | None:
    status = _status(exc)
    tail = "Nothing was committed and the local files are unchanged."
    if isinstance(exc, OfflineModeIsEnabled):
        return HubError(f"Cannot push to `{repo_id}`: offline mode is on. Unset `HF_HUB_OFFLINE`. {tail}")
    if status in (401, 403):
        return HubError(
            f"The Hub at {endpoint} refused to let this token write to `{repo_id}` (HTTP {status}): the "
            "token is invalid or has no write access to that namespace. Log in again with "
            f"`hf auth login`, or pass `token=` / set `HF_TOKEN` to a token with write access. {tail}"
        )
    if status == 404:
        return HubError(
            f"The Hub at {endpoint} has no repo `{repo_id}` and could not create it (HTTP 404). Check "
            f"the namespace in `repo_id` and the token's permissions. {tail}"
        )
    if status is not None:
        return HubError(f"Pushing to `{repo_id}` failed with HTTP {status}: {exc}. {tail}")
    if isinstance(exc, ValueError):
        return HubError(f"Pushing to `{repo_id}` was refused: {exc}. {tail}")
    return None
