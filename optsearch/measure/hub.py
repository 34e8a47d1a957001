"""The Hugging Face hub, or its absence: found out once per process, said once per missing piece.

Offline, huggingface_hub retries every download for about a minute and the loaders then blame the
repository ("does not appear to have a file named model_index.json"). `offline_reason()` tries the
hub's host once (HF_HUB_OFFLINE set: no try); when it cannot be reached it switches
huggingface_hub and datasets to offline mode for the rest of the process, so what is cached loads
at once and what is not fails at once, each with `missing()`'s one line and its fix.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

from huggingface_hub import constants


@functools.cache
def offline_reason() -> str | None:
    """Why the hub cannot be used ("HF_HUB_OFFLINE is set", "huggingface.co is unreachable"), or
    None when it can. Tried once per process."""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    try:
        socket.create_connection((host, endpoint.port or 443), timeout=3).close()
        return None
    except OSError:
        pass
    import datasets

    constants.HF_HUB_OFFLINE = True  # read at each call: no more retries in this process
    datasets.config.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"  # and in the processes this one starts
    return f"{host} is unreachable"


def missing(what: str, reason: str, fix: str) -> str:
    """One line for a piece the hub would give: what, why it cannot, and what to do."""
    return (f"{what} is not in this machine's Hugging Face cache ({constants.HF_HOME}) and {reason}: "
            f"{fix}")
