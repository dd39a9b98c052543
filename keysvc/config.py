"""Server settings: command-line options, with environment variables as defaults.

The HSM PIN is read from KEYSVC_HSM_PIN or from the file named by
KEYSVC_HSM_PIN_FILE (or --pin-file), never from a command line or from code.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import hsm

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATABASE_URL = "sqlite:///data/keysvc.db"
DEFAULT_TOKEN_LABEL = "keysvc"


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

    @property
    def hsm_config(self) -> hsm.HsmConfig:
        return hsm.HsmConfig(token_label=self.token_label, pin=self.pin, module_path=self.hsm_module)


def read_pin(pin_file: str | None) -> str:
    """The HSM PIN from KEYSVC_HSM_PIN, else from `pin_file` (or KEYSVC_HSM_PIN_FILE)."""
    pin = os.environ.get("KEYSVC_HSM_PIN")
    if pin:
        return pin
    pin_file = pin_file or os.environ.get("KEYSVC_HSM_PIN_FILE")
    if not pin_file:
        raise ConfigurationError("no HSM PIN: set KEYSVC_HSM_PIN or KEYSVC_HSM_PIN_FILE (or --pin-file)")
    path = Path(pin_file)
    try:
        mode = path.stat().st_mode
        pin = path.read_text().strip()
    except OSError as error:
        raise ConfigurationError(f"cannot read the PIN file {pin_file}: {error.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(f"the PIN file {pin_file} is readable by others: chmod 600 it")
    if not pin:
        raise ConfigurationError(f"the PIN file {pin_file} is empty")
    return pin


def validate(settings: Settings) -> Settings:
    host, colon, port = settings.listen.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise ConfigurationError(f"--listen must be host:port, not {settings.listen!r}")
    if settings.workers < 1:
        raise ConfigurationError("--workers must be at least 1")
    if not (settings.database_url.startswith("sqlite:") or settings.database_url.startswith("postgresql")):
        raise ConfigurationError("--database must be a sqlite:/// or postgresql:// URL")
    return settings

