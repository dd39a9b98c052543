"""Server settings: defaults, then a TOML file, then environment variables, then
command-line options, each overriding the one before.

The file (`--config FILE` or KEYSVC_CONFIG) holds the settings of SETTINGS below
under their dotted names (`[database] url = ...`); an unknown name is an error, so
a typo never passes silently. Every value is checked at start and an error names
the setting and where its value came from.

The HSM PIN is read from KEYSVC_HSM_PIN or from the file named by hsm.pin_file
(KEYSVC_HSM_PIN_FILE, --pin-file), never from a command line, the configuration
file or code; it is shown masked.
"""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

import hsm
from keysvc.authz import OPTIONAL_DUAL_CONTROL

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATABASE_URL = "sqlite:///data/keysvc.db"
DEFAULT_TOKEN_LABEL = "keysvc"
CONFIG_ENV = "KEYSVC_CONFIG"
PIN_ENV = "KEYSVC_HSM_PIN"
LOG_FORMATS = ("human", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ACCESS_LOG_MODES = ("all", "errors", "off")
SAFE_ROTATION_MODES = ("auto", "on", "off")
MASK = "****"


class ConfigurationError(Exception):
    """A setting is missing or wrong; the message names it."""


@dataclass(frozen=True)
class Settings:
    listen: str = DEFAULT_LISTEN
    database_url: str = DEFAULT_DATABASE_URL
    hsm_module: str = hsm.DEFAULT_MODULE_PATH
    token_label: str = DEFAULT_TOKEN_LABEL
    pin: str = field(default="", repr=False)
    workers: int = 1
    reflection: bool = True
    max_message_bytes: int = 4 * 1024 * 1024
    max_seal_message_bytes: int = 64 * 1024
    max_batch_items: int = 1000
    # Detokenize answers PERMISSION_DENIED unless this is set (until callers have roles).
    allow_detokenize: bool = False
    # Seconds between purges of expired tokens.
    token_purge_interval: float = 60.0
    # Operating (see README, "Operating keysvc"): '' serves no metrics.
    metrics_listen: str = ""
    log_format: str = "human"
    log_level: str = "INFO"
    log_access: str = "errors"
    health_interval: float = 1.0
    health_timeout: float = 5.0
    # Where the PIN was read from ('' when from KEYSVC_HSM_PIN).
    pin_file: str = ""
    # Mutual TLS and the role policy; all four are needed unless insecure_loopback,
    # the development mode in plain text, allowed on a loopback address only.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    policy: str = ""
    insecure_loopback: bool = False
    # With TLS: ImportKey, DestroyKeyVersion and ShredTokenDomain need two key-admins.
    dual_control: bool = True
    # Which operations dual control covers (comma-separated short names; DeliverMasterKey
    # always needs two key-admins).
    dual_control_operations: str = "ImportKey,DestroyKeyVersion,ShredTokenDomain,ProposePolicy"
    # The configuration file these settings came from ('' when none): SIGHUP re-reads
    # its log level.
    config_file: str = ""
    # With TLS: items per second per caller identity (0: no limit).
    verify_rate: float = 2000.0
    detokenize_rate: float = 100.0
    # Replicas (see README, "Replicas"): the address this replica is listed with ('':
    # the listen address, with the port bound), heartbeats, and safe rotation ("auto":
    # on with PostgreSQL, off with SQLite) with how long RotateKey waits for promotion.
    replica_address: str = ""
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0
    safe_rotation: str = "auto"
    rotation_wait: float = 3.0

    @property
    def hsm_config(self) -> hsm.HsmConfig:
        return hsm.HsmConfig(token_label=self.token_label, pin=self.pin, module_path=self.hsm_module)

    @property
    def dual_control_names(self) -> tuple[str, ...]:
        """The operations dual control covers, as configured (short names)."""
        return tuple(name.strip() for name in self.dual_control_operations.split(",") if name.strip())

    @property
    def rotates_safely(self) -> bool:
        """Whether a rotation's new version waits for every live replica before it is primary."""
        if self.safe_rotation == "auto":
            return self.database_url.startswith("postgresql")
        return self.safe_rotation == "on"


@dataclass(frozen=True)
class Setting:
    """One setting: its dotted name in the file, its Settings field, its variable."""

    name: str
    field: str
    env: str
    kind: type

    @property
    def option(self) -> str:
        return "--" + self.field.replace("_", "-")


SETTINGS = (
    Setting("listen", "listen", "KEYSVC_LISTEN", str),
    Setting("workers", "workers", "KEYSVC_WORKERS", int),
    Setting("reflection", "reflection", "KEYSVC_REFLECTION", bool),
    Setting("database.url", "database_url", "KEYSVC_DATABASE_URL", str),
    Setting("hsm.module", "hsm_module", "KEYSVC_HSM_MODULE", str),
    Setting("hsm.token_label", "token_label", "KEYSVC_TOKEN_LABEL", str),
    Setting("hsm.pin_file", "pin_file", "KEYSVC_HSM_PIN_FILE", str),
    Setting("limits.max_message_bytes", "max_message_bytes", "KEYSVC_MAX_MESSAGE_BYTES", int),
    Setting("limits.max_seal_message_bytes", "max_seal_message_bytes", "KEYSVC_MAX_SEAL_MESSAGE_BYTES", int),
    Setting("limits.max_batch_items", "max_batch_items", "KEYSVC_MAX_BATCH_ITEMS", int),
    Setting("metrics.listen", "metrics_listen", "KEYSVC_METRICS_LISTEN", str),
    Setting("log.format", "log_format", "KEYSVC_LOG_FORMAT", str),
    Setting("log.level", "log_level", "KEYSVC_LOG_LEVEL", str),
    Setting("log.access", "log_access", "KEYSVC_LOG_ACCESS", str),
    Setting("health.interval", "health_interval", "KEYSVC_HEALTH_INTERVAL", float),
    Setting("health.timeout", "health_timeout", "KEYSVC_HEALTH_TIMEOUT", float),
    Setting("tokens.allow_detokenize", "allow_detokenize", "KEYSVC_ALLOW_DETOKENIZE", bool),
    Setting("tokens.purge_interval", "token_purge_interval", "KEYSVC_TOKEN_PURGE_INTERVAL", float),
    Setting("tls.cert", "tls_cert", "KEYSVC_TLS_CERT", str),
    Setting("tls.key", "tls_key", "KEYSVC_TLS_KEY", str),
    Setting("tls.client_ca", "tls_client_ca", "KEYSVC_TLS_CLIENT_CA", str),
    Setting("auth.policy", "policy", "KEYSVC_POLICY", str),
    Setting("insecure_loopback", "insecure_loopback", "KEYSVC_INSECURE_LOOPBACK", bool),
    Setting("auth.dual_control", "dual_control", "KEYSVC_DUAL_CONTROL", bool),
    Setting("auth.dual_control_operations", "dual_control_operations", "KEYSVC_DUAL_CONTROL_OPERATIONS", str),
    Setting("limits.verify_per_second", "verify_rate", "KEYSVC_VERIFY_RATE", float),
    Setting("limits.detokenize_per_second", "detokenize_rate", "KEYSVC_DETOKENIZE_RATE", float),
    Setting("replicas.address", "replica_address", "KEYSVC_REPLICA_ADDRESS", str),
    Setting("replicas.heartbeat_interval", "heartbeat_interval", "KEYSVC_REPLICA_HEARTBEAT_INTERVAL", float),
    Setting("replicas.heartbeat_timeout", "heartbeat_timeout", "KEYSVC_REPLICA_HEARTBEAT_TIMEOUT", float),
    Setting("replicas.safe_rotation", "safe_rotation", "KEYSVC_SAFE_ROTATION", str),
    Setting("replicas.rotation_wait", "rotation_wait", "KEYSVC_ROTATION_WAIT", float),
)
_BY_NAME = {setting.name: setting for setting in SETTINGS}
_BY_FIELD = {setting.field: setting for setting in SETTINGS}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _setting_error(setting: Setting, message: str) -> ConfigurationError:
    return ConfigurationError(f"{setting.name}: {message}")


def _no_pin_error() -> ConfigurationError:
    return ConfigurationError(
        "hsm.pin_file: no HSM PIN: set KEYSVC_HSM_PIN, or name a PIN file with hsm.pin_file, "
        "KEYSVC_HSM_PIN_FILE or --pin-file")


def read_pin_file(pin_file: str) -> str:
    """The PIN in `pin_file`, which only its owner may read. Raises ConfigurationError."""
    path = Path(pin_file)
    try:
        mode = path.stat().st_mode
        pin = path.read_text().strip()
    except OSError as error:
        raise ConfigurationError(f"hsm.pin_file: cannot read the PIN file {pin_file}: {error.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(f"hsm.pin_file: the PIN file {pin_file} is readable by others: chmod 600 it")
    if not pin:
        raise ConfigurationError(f"hsm.pin_file: the PIN file {pin_file} is empty")
    return pin


def read_pin(pin_file: str | None) -> str:
    """The HSM PIN from KEYSVC_HSM_PIN, else from `pin_file` (or KEYSVC_HSM_PIN_FILE)."""
    pin = os.environ.get(PIN_ENV)
    if pin:
        return pin
    pin_file = pin_file or os.environ.get("KEYSVC_HSM_PIN_FILE")
    if not pin_file:
        raise _no_pin_error()
    return read_pin_file(pin_file)


def _host_port_error(value: str) -> str | None:
    host, colon, port = value.rpartition(":")
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        return f"must be host:port, not {value!r}"
    return None


def _problems(settings: Settings) -> list[tuple[str, str]]:
    """(field, message) for every value out of bounds."""
    problems = []
    if (message := _host_port_error(settings.listen)) is not None:
        problems.append(("listen", message))
    if settings.workers < 1:
        problems.append(("workers", "must be at least 1"))
    unknown = [name for name in settings.dual_control_names if name not in OPTIONAL_DUAL_CONTROL]
    if unknown:
        problems.append(("dual_control_operations", f"unknown operation(s) {', '.join(unknown)}: choose among "
                         f"{', '.join(OPTIONAL_DUAL_CONTROL)}"))
    if not (settings.database_url.startswith("sqlite:") or settings.database_url.startswith("postgresql")):
        problems.append(("database_url", "must be a sqlite:/// or postgresql:// URL"))
    if not settings.token_label:
        problems.append(("token_label", "must not be empty"))
    for name in ("max_message_bytes", "max_seal_message_bytes", "max_batch_items"):
        if getattr(settings, name) < 1:
            problems.append((name, "must be at least 1"))
    if settings.metrics_listen and (message := _host_port_error(settings.metrics_listen)) is not None:
        problems.append(("metrics_listen", message))
    if settings.log_format not in LOG_FORMATS:
        problems.append(("log_format", f"must be one of {', '.join(LOG_FORMATS)}, not {settings.log_format!r}"))
    if settings.log_level not in LOG_LEVELS:
        problems.append(("log_level", f"must be one of {', '.join(LOG_LEVELS)}, not {settings.log_level!r}"))
    if settings.log_access not in ACCESS_LOG_MODES:
        problems.append(("log_access", f"must be one of {', '.join(ACCESS_LOG_MODES)}, not {settings.log_access!r}"))
    if not settings.health_interval > 0:
        problems.append(("health_interval", "must be more than 0 seconds"))
    if not settings.health_timeout > 0:
        problems.append(("health_timeout", "must be more than 0 seconds"))
    for name in ("verify_rate", "detokenize_rate"):
        if getattr(settings, name) < 0:
            problems.append((name, "must be 0 (no limit) or more"))
    if not settings.token_purge_interval > 0:
        problems.append(("token_purge_interval", "must be more than 0 seconds"))
    if settings.replica_address and (message := _host_port_error(settings.replica_address)) is not None:
        problems.append(("replica_address", message))
    if not 0.1 <= settings.heartbeat_interval <= 60:
        problems.append(("heartbeat_interval", "must be between 0.1 and 60 seconds"))
    if not settings.heartbeat_timeout >= 2 * settings.heartbeat_interval:
        problems.append(("heartbeat_timeout", "must be at least twice replicas.heartbeat_interval (one late "
                                              "heartbeat must not make a replica dead)"))
    if settings.safe_rotation not in SAFE_ROTATION_MODES:
        problems.append(("safe_rotation", f"must be one of {', '.join(SAFE_ROTATION_MODES)}, "
                                          f"not {settings.safe_rotation!r}"))
    if not 0 <= settings.rotation_wait <= 60:
        problems.append(("rotation_wait", "must be between 0 and 60 seconds"))
    if settings.insecure_loopback:
        if not _is_loopback(settings.listen.rpartition(":")[0]):
            problems.append(("insecure_loopback", "serves in plain text, without roles: only on a loopback address "
                                                  "such as 127.0.0.1"))
    else:
        for name in ("tls_cert", "tls_key", "tls_client_ca", "policy"):
            path = getattr(settings, name)
            if not path:
                problems.append((name, "is required (mutual TLS and roles), unless --insecure-loopback for local "
                                       "development; `keysvc dev-pki DIR` makes development ones"))
            elif not Path(path).is_file():
                problems.append((name, f"{path} is not a readable file"))
    return problems


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate(settings: Settings, sources: Mapping[str, str] | None = None) -> Settings:
    """Returns `settings` when every value is usable, else raises ConfigurationError naming
    the first wrong setting (and, given `sources`, where its value came from)."""
    for field_name, message in _problems(settings):
        setting = _BY_FIELD[field_name]
        origin = f" (from {sources[field_name]})" if sources and field_name in sources else ""
        raise _setting_error(setting, message + origin)
    return settings


# -- reading -----------------------------------------------------------------------------------


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _typed_from_file(setting: Setting, value: Any) -> Any:
    if setting.kind is bool and isinstance(value, bool):
        return value
    if setting.kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if setting.kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if setting.kind is str and isinstance(value, str):
        return value
    raise _setting_error(setting, f"must be {_KIND_NAMES[setting.kind]}")


_KIND_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def _typed_from_text(setting: Setting, text: str) -> Any:
    text = text.strip()
    try:
        if setting.kind is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        return setting.kind(text)
    except ValueError:
        raise _setting_error(setting, f"{setting.env} must be {_KIND_NAMES[setting.kind]}") from None


def read_file(path: str) -> dict[str, Any]:
    """The settings a TOML file sets, by Settings field. Raises ConfigurationError."""
    try:
        with open(path, "rb") as config_file:
            document = tomllib.load(config_file)
    except OSError as error:
        raise ConfigurationError(f"configuration file {path}: cannot read it: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigurationError(f"configuration file {path}: not valid TOML: {error}") from None
    values = {}
    for name, value in _flatten(document).items():
        if name in ("hsm.pin", "pin"):
            raise ConfigurationError(
                f"{name}: the PIN is never read from the configuration file ({path}): "
                "name a file holding it with hsm.pin_file, or set KEYSVC_HSM_PIN")
        setting = _BY_NAME.get(name)
        if setting is None:
            raise ConfigurationError(f"{name}: unknown setting in {path}; known: {', '.join(_BY_NAME)}")
        try:
            values[setting.field] = _typed_from_file(setting, value)
        except ConfigurationError as error:
            raise ConfigurationError(f"{error} (in {path})") from None
    return values


def load_settings(
    config_path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[Settings, dict[str, str]]:
    """The validated settings and, by field, where each value came from ('default',
    the file, the variable, or the command line).

    `config_path` defaults to KEYSVC_CONFIG; `overrides` are command-line values by
    Settings field. Raises ConfigurationError naming the setting at fault.
    """
    environ = os.environ if environ is None else environ
    config_path = config_path or environ.get(CONFIG_ENV) or None
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config_path:
        for name, value in read_file(config_path).items():
            values[name], sources[name] = value, config_path
    for setting in SETTINGS:
        text = environ.get(setting.env)
        if text:
            values[setting.field], sources[setting.field] = _typed_from_text(setting, text), setting.env
    for name, value in (overrides or {}).items():
        values[name], sources[name] = value, _BY_FIELD[name].option if name in _BY_FIELD else "command line"
    settings = Settings(**values, config_file=config_path or "")
    if environ.get(PIN_ENV):
        settings, sources["pin"] = replace(settings, pin=environ[PIN_ENV], pin_file=""), PIN_ENV
    elif not settings.pin_file:
        raise _no_pin_error()
    else:
        try:
            pin = read_pin_file(settings.pin_file)
        except ConfigurationError as error:
            raise ConfigurationError(f"{error} (from {sources.get('pin_file', 'default')})") from None
        settings, sources["pin"] = replace(settings, pin=pin), "the file named by hsm.pin_file"
    return validate(settings, sources), sources


# -- showing ---------------------------------------------------------------------------------


def masked_url(url: str) -> str:
    """`url` with any password replaced by ****."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def describe(settings: Settings, sources: Mapping[str, str]) -> str:
    """The effective configuration as TOML, each value's origin in a comment, secrets masked."""
    lines = ["# effective keysvc configuration (secrets masked)"]
    table = ""
    # Top-level settings first (in TOML they cannot follow a [table]), then each table
    # once, in the order its first setting is listed.
    sections = list(dict.fromkeys(setting.name.rpartition(".")[0] for setting in SETTINGS))
    for setting in sorted(SETTINGS, key=lambda setting: (bool(setting.name.rpartition(".")[0]),
                                                         sections.index(setting.name.rpartition(".")[0]))):
        section, _, key = setting.name.rpartition(".")
        if section != table:
            lines.append(f"\n[{section}]")
            table = section
        value = getattr(settings, setting.field)
        if setting.field == "database_url":
            value = masked_url(value)
        lines.append(f"{key} = {_toml_value(value)}  # {sources.get(setting.field, 'default')}")
    lines.append(f"# hsm pin: {MASK if settings.pin else '(none)'}  ({sources.get('pin', 'not set')})")
    return "\n".join(lines)

