"""The Hugging Face hub: is it allowed (HF_HUB_OFFLINE) and reachable, asked in seconds.

Models and datasets both ask before touching the network, so that a machine with
no network gets a clear answer at once instead of after a library's retries.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """True when the user told huggingface libraries not to touch the network."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_address() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_host() -> str:
    host, port = hub_address()
    return f"{host}:{port}"


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub, so that no network fails in seconds, not after datasets' ~25 s of retries.

    Behind a proxy the probe says nothing, so it is skipped and datasets decides.
    """
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        socket.create_connection(hub_address(), timeout=timeout).close()
    except OSError:
        return False
    return True
