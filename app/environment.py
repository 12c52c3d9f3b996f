"""Every SEEDVC_* environment variable, named and read here and nowhere else (README: "Environment variables").

The service's configuration is its serve config file; the environment carries what differs per deployment or per node
and what must stay out of config files: secrets. A replica reads it when it starts (Ray gives replicas the
environment of the node's `ray start`, plus a runtime_env's env_vars). A variable that is set but empty counts as
unset, so that an env file can list every name with blanks for the ones not used.

No Ray imports: app/ is a library (deployments/ read it in their replicas, the clients and the tests use it too).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

# ---- read by the service --------------------------------------------------------------------------------------------
MODEL = "SEEDVC_MODEL"  # `hub` or a model bundle directory; overrides converter.model
VOICE_STORE = "SEEDVC_VOICE_STORE"  # path or fsspec URL; overrides converter.voice_store and ingress.voice_store
API_KEYS = "SEEDVC_API_KEYS"  # static API keys, "id=key,id2=key2"; when set, the config's (development) keys are off
ADMIN_KEY = "SEEDVC_ADMIN_KEY"  # enables the admin API (/v1/admin/keys); never in a config file
TOKEN_SECRET = "SEEDVC_TOKEN_SECRET"  # signs session tokens; the same on every ingress replica
TURN_SECRET = "SEEDVC_TURN_SECRET"  # coturn's static-auth-secret, when ingress.turn_secret is not set
RTP_HOST = "SEEDVC_RTP_HOST"  # this node's address as RTP peers reach it (per node; the config is per cluster)
SERVICE_VARIABLES = (MODEL, VOICE_STORE, API_KEYS, ADMIN_KEY, TOKEN_SECRET, TURN_SECRET, RTP_HOST)

# ---- read by the clients (client/, bench.load), never by the service -----------------------------------------------
CLIENT_API_KEY = "SEEDVC_API_KEY"  # the API key the command-line clients send, when --api-key is not given

# ---- set, never read as a setting: marks every process of `deployments.local_cluster` so `down` stops only those ----
LOCAL_CLUSTER_MARKER = "SEEDVC_LOCAL_CLUSTER"

# ---- test-only switches ---------------------------------------------------------------------------------------------
BROWSER_TESTS = "SEEDVC_BROWSER_TESTS"  # "1": collect tests/browser (scripts/test sets it in a network namespace)


def _value(environ: Mapping[str, str], name: str) -> str | None:
    return environ.get(name) or None  # set but empty: unset


@dataclass(frozen=True)
class ServiceEnvironment:
    """What the service reads from its environment; None where a variable is unset."""

    model: str | None = None
    voice_store: str | None = None
    api_keys: str | None = None  # as given: app.auth.tokens.static_keys parses it
    admin_key: str | None = None
    token_secret: str | None = None
    turn_secret: str | None = None
    rtp_host: str | None = None

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> ServiceEnvironment:
        """From this process's environment (or the given mapping)."""
        env = os.environ if environ is None else environ
        return cls(
            model=_value(env, MODEL),
            voice_store=_value(env, VOICE_STORE),
            api_keys=_value(env, API_KEYS),
            admin_key=_value(env, ADMIN_KEY),
            token_secret=_value(env, TOKEN_SECRET),
            turn_secret=_value(env, TURN_SECRET),
            rtp_host=_value(env, RTP_HOST),
        )


def client_api_key(environ: Mapping[str, str] | None = None) -> str | None:
    """The command-line clients' default API key (SEEDVC_API_KEY)."""
    return _value(os.environ if environ is None else environ, CLIENT_API_KEY)


def browser_tests_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Test-only: whether this pytest run collects the browser tests (SEEDVC_BROWSER_TESTS=1)."""
    return (os.environ if environ is None else environ).get(BROWSER_TESTS) == "1"
