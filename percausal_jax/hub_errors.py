"""What a failed Hugging Face hub download means for the user (:func:`hub_failure`): the hub refused the request
(no such repo or revision, gated, offline and not cached) is a :class:`UserError`, exit 2; the hub could not be
reached or its cache could not be written is a :class:`StorageError`, exit 3 ("could not download ..."); anything
else is a bug and keeps its traceback."""

from __future__ import annotations

import contextlib

from percausal_jax.errors import StorageError, UserError


def _causes(e: BaseException) -> list[BaseException]:
    """``e`` and the exceptions it was raised from, outermost first."""
    chain: list[BaseException] = []
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def _one_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else repr(e)}"


def _network_error_types() -> tuple[type, ...]:
    """The transport errors of the HTTP clients huggingface_hub may have used (httpx, or requests in older
    versions): only those already imported can have raised."""
    import sys

    types: list[type] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout")), ("aiohttp", ("ClientConnectionError",))):
        mod = sys.modules.get(module)
        types += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    with contextlib.suppress(ImportError):
        from huggingface_hub.errors import XetDownloadError

        types.append(XetDownloadError)
    return tuple(types)


def hub_failure(e: Exception, name: str, what: str, repo_type: str, revision: str | None) -> UserError | None:
    """What a failed ``snapshot_download`` of ``name`` means for the user: a :class:`UserError` (exit 2) when the
    hub refused the request (no such repo or revision, gated or private, invalid id, offline and not cached); a
    :class:`StorageError` (exit 3, "could not download ...") when the hub could not be reached or failed (connection,
    timeout, 5xx, 429) or the hub cache could not be written; ``None`` for anything else (a bug: re-raised)."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    chain = _causes(e)
    rev = revision or "main"
    cache = getattr(constants, "HF_HUB_CACHE", "the hub cache")

    def status(x: BaseException) -> int | None:
        return getattr(getattr(x, "response", None), "status_code", None)

    refused = (hf.RepositoryNotFoundError, hf.RevisionNotFoundError, hf.HFValidationError,
               *(getattr(hf, n) for n in ("DisabledRepoError", "RemoteEntryNotFoundError", "BadRequestError",
                                          "EgressLimitError") if hasattr(hf, n)))
    for x in chain:
        if isinstance(x, refused) or (isinstance(x, hf.HfHubHTTPError) and status(x) in (401, 403, 404)):
            hint = (" (gated: accept its terms on the hub, then set HF_TOKEN)" if isinstance(x, hf.GatedRepoError)
                    else " (no such repo, or a private one and HF_TOKEN is not set)"
                    if isinstance(x, hf.RepositoryNotFoundError) else "")
            return UserError(f"{name}: not a local {what}, and the hub refused it (revision {rev}, repo type "
                             f"{repo_type}){hint}: {_one_line(x)}")
    if any(isinstance(x, hf.OfflineModeIsEnabled) for x in chain) or (
            isinstance(e, hf.LocalEntryNotFoundError) and len(chain) == 1):
        return UserError(f"{name}: not a local {what}, and the hub download failed (HF_HUB_OFFLINE is set: only "
                         f"the local hub cache {cache} is searched, and it has no snapshot of revision {rev}): "
                         f"{_one_line(e)}")
    where = f"{what} {name} (revision {rev}) from the Hugging Face hub ({constants.ENDPOINT})"
    network = _network_error_types()
    for x in reversed(chain):  # the root cause names the failure best ("Connection refused")
        if isinstance(x, network) or isinstance(x, hf.HfHubHTTPError):  # 401/403/404 were sorted out above
            return StorageError(f"could not download {where}: {_one_line(x)}; re-run once the hub is reachable "
                                "(or set HF_HUB_OFFLINE=1 to use only the local hub cache)")
    for x in chain:
        if isinstance(x, OSError) and not isinstance(x, hf.LocalEntryNotFoundError):
            return StorageError(f"could not download {where} into {cache}: {_one_line(x)}; re-run once there is "
                                "room / access")
    if isinstance(e, hf.LocalEntryNotFoundError):  # raised by huggingface_hub after an error it did not chain
        return StorageError(f"could not download {where}: {_one_line(e)}; re-run once the hub is reachable")
    return None
