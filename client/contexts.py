"""Client contexts: named connection settings in one file, and the one place that decides
which servers and credentials a `Client` (and so `lepton-ctl`) uses.

The file is `config.toml` in the user's config dir (`platformdirs`, e.g.
`~/.config/lepton/config.toml`; `$LEPTON_CLIENT_CONFIG` names another, not
`$LEPTON_CONFIG`, which is the agent's), mode 0600 since it may hold tokens:

    current_context = "local"
    previous_context = "prod"        # where `local down` switches back to

    [contexts.local]
    servers = "127.0.0.1:7070"
    tls_dir = ""                     # "": plaintext
    cert_name = ""                   # "": admin, else the only user certificate
    token = ""

Resolution, per setting: an explicit argument (a flag) > a context named explicitly
(`--context`) > the environment (`$LEPTON_SERVER`, `$LEPTON_TLS_DIR`, `$LEPTON_CERT_NAME`,
`$LEPTON_TOKEN`) > the current context > the default server. A context's credentials
(TLS folder, certificate, token) go only to that context's own servers: with `--server` or
`$LEPTON_SERVER` they are not sent, so a token never reaches an address it was not made for.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lepton.common.durable import write_atomic
from lepton.common.errors import FailedPrecondition, InvalidArgument, NotFound

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "DEFAULT_SERVER",
    "LOCAL_CONTEXT",
    "ClientConfig",
    "Connection",
    "Context",
    "config_path",
    "load_config",
    "resolve_connection",
    "save_config",
    "switch_from_local",
    "switch_to_local",
]

log = logging.getLogger(__name__)

DEFAULT_SERVER = "127.0.0.1:7070"
LOCAL_CONTEXT = "local"
CONFIG_ENV = "LEPTON_CLIENT_CONFIG"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_CONTEXT_KEYS = ("servers", "tls_dir", "cert_name", "token")
_TOP_KEYS = ("current_context", "previous_context", "contexts")


@dataclass(frozen=True)
class Context:
    """One named cluster: where it is and how to prove who we are to it."""

    name: str
    servers: str
    tls_dir: str = ""
    cert_name: str = ""
    token: str = ""

    def to_dict(self, *, current: bool = False) -> dict[str, Any]:
        """The JSON/YAML shape of `config get-contexts`; the token is never printed."""
        doc = asdict(self)
        doc["token"] = "<set>" if self.token else ""
        doc["current"] = current
        return doc


@dataclass
class ClientConfig:
    contexts: dict[str, Context]
    current_context: str = ""
    previous_context: str = ""

    def get(self, name: str) -> Context:
        ctx = self.contexts.get(name)
        if ctx is None:
            known = ", ".join(sorted(self.contexts)) or "none"
            raise NotFound(f"no context {name!r} (known: {known})")
        return ctx

    def current(self) -> Context | None:
        return self.contexts.get(self.current_context) if self.current_context else None

    def use(self, name: str) -> None:
        """Make `name` current, remembering the one before (for `local down`)."""
        self.get(name)
        if name != self.current_context:
            self.previous_context = self.current_context
        self.current_context = name


def check_context_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"bad context name {name!r}: letters, digits, '.', '_' and '-', at most 63"
        )
    return name


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    import platformdirs  # only when there is no $LEPTON_CLIENT_CONFIG

    return Path(platformdirs.user_config_dir("lepton", appauthor=False)) / "config.toml"


def _text(doc: Mapping[str, Any], key: str, where: str) -> str:
    value = doc.get(key, "")
    if not isinstance(value, str):
        raise FailedPrecondition(f"{where}: {key} must be a string")
    return value


def load_config(path: Path | None = None) -> ClientConfig:
    """The config file, or an empty config when there is none. FailedPrecondition (naming
    the file and the key) when it cannot be read or holds what it should not."""
    path = path or config_path()
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return ClientConfig(contexts={})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise FailedPrecondition(f"cannot read the client config {path}: {e}") from None
    for key in doc:
        if key not in _TOP_KEYS:
            raise FailedPrecondition(f"{path}: unknown key {key!r}")
    raw = doc.get("contexts", {})
    if not isinstance(raw, dict):
        raise FailedPrecondition(f"{path}: contexts must be a table")
    contexts: dict[str, Context] = {}
    for name, body in raw.items():
        where = f"{path}: context {name!r}"
        if not isinstance(body, dict) or not _NAME.fullmatch(name):
            raise FailedPrecondition(f"{where}: not a valid context")
        for key in body:
            if key not in _CONTEXT_KEYS:
                raise FailedPrecondition(f"{where}: unknown key {key!r}")
        fields = {k: _text(body, k, where) for k in _CONTEXT_KEYS}
        if not fields["servers"]:
            raise FailedPrecondition(f"{where}: servers is missing")
        contexts[name] = Context(name=name, **fields)
    if any(c.token for c in contexts.values()):
        _warn_if_readable_by_others(path)
    return ClientConfig(
        contexts=contexts,
        current_context=_text(doc, "current_context", str(path)),
        previous_context=_text(doc, "previous_context", str(path)),
    )


def _warn_if_readable_by_others(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & 0o077:
        log.warning("%s holds tokens and is readable by others (mode %o): chmod 600 it",
                    path, mode & 0o777)


def _toml(value: str) -> str:
    # A JSON string is a TOML basic string (the same escapes), so no TOML writer is needed.
    return json.dumps(value)


def save_config(config: ClientConfig, path: Path | None = None) -> Path:
    """Write the whole file atomically, 0600 (it may hold tokens); its folder 0700."""
    path = path or config_path()
    lines = []
    for key in ("current_context", "previous_context"):
        value = getattr(config, key)
        if value:
            lines.append(f"{key} = {_toml(value)}")
    for name in sorted(config.contexts):
        ctx = config.contexts[name]
        lines += ["", f"[contexts.{_toml(name)}]"]
        lines += [f"{k} = {_toml(getattr(ctx, k))}" for k in _CONTEXT_KEYS if getattr(ctx, k)]
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, ("\n".join(lines) + "\n").encode(), mode=0o600)
    return path


@dataclass(frozen=True)
class Connection:
    """What a client connects to and with; `source` says where the servers came from
    ("--server", "context 'local'", "$LEPTON_SERVER", "the default"), for messages."""

    servers: str
    tls_dir: str
    cert_name: str | None
    token: str
    source: str


def resolve_connection(
    servers: str | None = None,
    *,
    tls_dir: str | None = None,
    cert_name: str | None = None,
    token: str | None = None,
    context: str | None = None,
    env: Mapping[str, str] | None = None,
    path: Path | None = None,
) -> Connection:
    """The one resolution of `Client()` and lepton-ctl (see the module doc). None means
    "not given"; "" given for `tls_dir` or `token` means plaintext / no token."""
    env = os.environ if env is None else env
    ctx: Context | None = None
    if context:
        ctx = load_config(path).get(check_context_name(context))
    if servers is not None:  # given, even empty: parse_servers then says "no server"
        source = "--server"
    elif ctx is not None:
        servers, source = ctx.servers, f"context {ctx.name!r}"
    elif env.get("LEPTON_SERVER"):
        servers, source = env["LEPTON_SERVER"], "$LEPTON_SERVER"
    else:
        ctx = load_config(path).current()
        if ctx is not None:
            servers, source = ctx.servers, f"context {ctx.name!r}"
        else:
            servers, source = DEFAULT_SERVER, "the default"
    # The context's credentials only with its own servers.
    own = ctx if ctx is not None and source.startswith("context") else None

    def pick(given: str | None, env_name: str, ctx_value: str) -> str | None:
        if given is not None:
            return given
        if own is not None and context:  # a context named explicitly beats the environment
            return ctx_value
        return env.get(env_name) or (ctx_value if own is not None else None)

    chosen_tls = pick(tls_dir, "LEPTON_TLS_DIR", own.tls_dir if own else "") or ""
    chosen_cert = pick(cert_name, "LEPTON_CERT_NAME", own.cert_name if own else "") or None
    chosen_token = pick(token, "LEPTON_TOKEN", own.token if own else "") or ""
    return Connection(servers, chosen_tls, chosen_cert, chosen_token.strip(), source)


def switch_to_local(servers: str, path: Path | None = None) -> Path:
    """`local up`: (re)write the `local` context for `servers` and make it current."""
    config = load_config(path)
    config.contexts[LOCAL_CONTEXT] = Context(LOCAL_CONTEXT, servers)
    config.use(LOCAL_CONTEXT)
    return save_config(config, path)


def switch_from_local(path: Path | None = None) -> str | None:
    """`local down`: when `local` is current, go back to the context that was current
    before `local up`. Returns the context now current ("" for none), None if unchanged."""
    config = load_config(path)
    if config.current_context != LOCAL_CONTEXT:
        return None
    back = config.previous_context
    config.current_context = back if back in config.contexts and back != LOCAL_CONTEXT else ""
    config.previous_context = ""
    save_config(config, path)
    return config.current_context
