"""The Hugging Face hub: is it reachable, and is a model already in the local cache.

Without a network, transformers and datasets retry the hub again and again before they fail. lorakit asks once,
with a short time-out, before it loads a hub model or dataset: a cached model then loads from the cache at once
(`local_files_only`), and one that is not cached is one error line that says why (offline by setting, or the
network error) and how to get it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from .errors import LorakitError

PROBE_TIMEOUT_S = 5.0
_TRUE = {"1", "on", "yes", "true"}


def is_hub_id(source: str) -> bool:
    """A name to look up on the hub (`gpt2-medium`, `org/name`), not a local path."""
    try:
        if Path(source).expanduser().exists():
            return False
    except (OSError, ValueError):  # a name no file system takes (too long, a NUL): no hub id either
        return False
    return not source.startswith(("/", "./", "../", "~", ".\\")) and source.count("/") <= 1


def offline_by_setting(datasets: bool = False) -> str | None:
    """The variable that asks for no network (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE; for datasets also
    HF_DATASETS_OFFLINE), or None."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") + (("HF_DATASETS_OFFLINE",) if datasets else ())
    return next((k for k in names if os.environ.get(k, "").strip().lower() in _TRUE), None)


@functools.cache
def unreachable_reason() -> str | None:
    """Why the hub cannot be reached (the network error, one line), or None when it answers. Asked once per
    process, through huggingface_hub's own HTTP session (so proxies and HF_ENDPOINT apply)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except Exception as e:  # httpx/requests connection errors, time-outs, SSL errors
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"{constants.ENDPOINT} cannot be reached ({text})"
    return None


def is_cached(repo_id: str, filename: str = "config.json") -> bool:
    """Whether `filename` of a hub model is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # an invalid repo id
        return False
    return isinstance(found, str)


def local_files_only(repo_id: str, what: str = "model", instead: str = "pass a local folder") -> bool:
    """For a hub model about to be loaded: True to load it from the cache without the network, False to let
    transformers use the hub as usual. `what` and `instead` word the error: what the id is, what else to do.

    Raises:
        LorakitError: the model is not cached and the hub is out of reach (by setting or by network error).
    """
    setting = offline_by_setting()
    if setting:
        reason = f"{setting} is set"
    else:
        reason = unreachable_reason()
        if reason is None:
            return False
    if is_cached(repo_id):
        return True
    raise LorakitError(
        f"{repo_id}: {what} is not in the local Hugging Face cache and the hub is out of reach: {reason}; "
        f"download it where there is a network (`hf download {repo_id}`) or {instead}"
    )


def check_dataset_reachable(name: str) -> None:
    """A hub dataset needs the hub unless the user asked for the cache only (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE).

    Raises:
        LorakitError: the hub cannot be reached, naming the network error.
    """
    if offline_by_setting(datasets=True):
        return
    reason = unreachable_reason()
    if reason is not None:
        raise LorakitError(
            f"{name}: not a local file or folder, and the Hugging Face hub is out of reach to load it as a dataset: "
            f"{reason}; set HF_DATASETS_OFFLINE=1 to use a cached copy, or pass a local file"
        )


def dataset_not_cached(name: str) -> str | None:
    """The error line for a hub dataset that failed to load while the hub is off by setting (datasets then
    only reads its cache), or None when it is not."""
    setting = offline_by_setting(datasets=True)
    if setting is None:
        return None
    return (
        f"{name}: not a file or folder, and as a hub dataset it is not in the local Hugging Face cache while the "
        f"hub is out of reach ({setting} is set); download it where there is a network "
        f"(`hf download --repo-type dataset {name}`) or pass a local file"
    )
