"""The ingress's API keys, quotas and admin key, put together from its config and the environment, and the HTTP
answers the admin API gives for the key store's errors. The keys themselves: app/auth/keystore.py, app/auth/usage.py.
"""

from __future__ import annotations

from fastapi import HTTPException

from app.auth.admin import AdminKey
from app.auth.keystore import KeyExists, KeyNotFound, KeyRevoked, KeyStore, Quotas, StaticKeyError
from app.auth.tokens import ApiKeys, TokenError
from app.auth.usage import UsageMeter
from app.environment import ADMIN_KEY
from app.serving.config import IngressConfig

KEY_STORE_DIR = "_keys"  # inside the voice store, unless `key_store` names another place


def key_store(config: IngressConfig, static: ApiKeys | None, admin: AdminKey | None) -> KeyStore:
    if static is None and admin is None:
        raise ValueError(
            "no API keys configured: set ingress.api_keys or the SEEDVC_API_KEYS environment variable, or "
            f"{ADMIN_KEY} to create keys at run time"
        )
    root = config.key_store or f"{config.voice_store.rstrip('/')}/{KEY_STORE_DIR}"
    defaults = Quotas(
        max_sessions=config.default_max_sessions,
        max_stream_minutes_per_day=config.default_max_stream_minutes_per_day,
    )
    return KeyStore(root, static=static, default_quotas=defaults, cache_ttl_s=config.key_cache_ttl_s)


def usage_meter(config: IngressConfig, keys: KeyStore) -> UsageMeter:
    return UsageMeter(
        keys,
        lease_ttl_s=config.session_lease_ttl_s,
        flush_interval_s=config.usage_flush_interval_s,
        retry_after_s=config.retry_after_s,
        cache_ttl_s=config.key_cache_ttl_s,
    )


def admin_error(error: Exception) -> HTTPException:
    """The HTTP answer to a failed admin operation (the messages name key ids and limits, never secrets)."""
    if isinstance(error, KeyNotFound):
        return HTTPException(status_code=404, detail="no such key")
    if isinstance(error, StaticKeyError | KeyExists | KeyRevoked):
        return HTTPException(status_code=409, detail=str(error))
    if isinstance(error, TokenError):  # usage of a key that does not exist
        return HTTPException(status_code=404, detail="no such key")
    return HTTPException(status_code=422, detail=str(error))
