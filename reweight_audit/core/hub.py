"""Can the Hugging Face hub be reached? Asked once per process.

On a machine without network access the hub libraries retry for half a minute
or more before giving up. One connection attempt (a few seconds at most, and
through the configured proxy when there is one) answers the question for the
whole run: models then load from the local cache only, and ``hf:`` datasets,
which are streamed, fail at once with one line saying why.
"""
from __future__ import annotations

import os
import socket
import threading
import urllib.request
from functools import lru_cache
from urllib.parse import urlparse

DEFAULT_ENDPOINT = "https://huggingface.co"
CONNECT_TIMEOUT_S = 3.0
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's reading of its boolean variables


def endpoint() -> str:
    """The hub's address: ``HF_ENDPOINT`` or huggingface.co."""
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def offline_reason() -> str | None:
    """Why the hub cannot be used now, as a few words for a message; None when it answers."""
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").upper() in _TRUE:
            return f"{variable} is set"
    return _unreachable(endpoint())


@lru_cache(maxsize=None)
def _unreachable(url: str) -> str | None:
    """One TCP connection to the hub (or its proxy), in a thread so a hanging DNS lookup cannot stall us."""
    parsed = urlparse(url)
    host, scheme = parsed.hostname or "", parsed.scheme or "https"
    port = parsed.port or (443 if scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxied = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxied.hostname or host, proxied.port or 8080
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc.strerror or type(exc).__name__)

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(CONNECT_TIMEOUT_S + 0.5)
    if not outcome:
        return f"no answer from {host}:{port} within {CONNECT_TIMEOUT_S:g} s"
    return None if outcome[0] is None else f"cannot connect to {host}:{port}: {outcome[0]}"
