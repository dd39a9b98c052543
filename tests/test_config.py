"""Configuration: a TOML file, environment variables over it, options over both;
errors name the setting and where its value came from; `keysvc config check`
prints the effective configuration with the PIN (and database passwords) masked."""

from __future__ import annotations

import os
import subprocess
import tomllib

import grpc
import pytest

from keysvc import config
from keysvc.v1 import keys_pb2, keys_pb2_grpc
from tests.servers import KEYSVC, start_keysvc_server, stop_keysvc_server

FULL_FILE = """
listen = "127.0.0.1:6000"
workers = 2
reflection = false
insecure_loopback = true

[database]
url = "postgresql://keysvc:db-Passw0rd@db.example:5432/keysvc"

[hsm]
module = "/opt/hsm/lib.so"
token_label = "prod"
pin_file = "{pin_file}"

[limits]
max_message_bytes = 1048576
max_seal_message_bytes = 8192
max_batch_items = 100

[metrics]
listen = "127.0.0.1:9464"

[log]
format = "json"
level = "WARNING"
access = "all"

[health]
interval = 0.5
timeout = 2

[tokens]
allow_detokenize = true
purge_interval = 30
"""


@pytest.fixture
def pin_file(tmp_path):
    path = tmp_path / "pin"
    path.write_text("987654\n")
    path.chmod(0o600)
    return path


def write(tmp_path, text: str):
    path = tmp_path / "keysvc.toml"
    path.write_text(text)
    return str(path)


def test_every_setting_is_read_from_the_file(tmp_path, pin_file):
    path = write(tmp_path, FULL_FILE.format(pin_file=pin_file))
    settings, sources = config.load_settings(path, environ={})
    assert settings == config.Settings(
        listen="127.0.0.1:6000", workers=2, reflection=False,
        database_url="postgresql://keysvc:db-Passw0rd@db.example:5432/keysvc",
        hsm_module="/opt/hsm/lib.so", token_label="prod", pin="987654", pin_file=str(pin_file),
        max_message_bytes=1048576, max_seal_message_bytes=8192, max_batch_items=100,
        metrics_listen="127.0.0.1:9464", log_format="json", log_level="WARNING", log_access="all",
        health_interval=0.5, health_timeout=2.0, allow_detokenize=True, token_purge_interval=30.0,
        insecure_loopback=True, config_file=path,
    )
    assert sources["workers"] == path and sources["pin"] == "the file named by hsm.pin_file"


def test_environment_overrides_the_file_and_options_override_both(tmp_path, pin_file):
    path = write(tmp_path, FULL_FILE.format(pin_file=pin_file))
    settings, sources = config.load_settings(
        path, environ={"KEYSVC_WORKERS": "3", "KEYSVC_REFLECTION": "yes", "KEYSVC_HSM_PIN": "111111",
                       "KEYSVC_HEALTH_INTERVAL": "2.5", "KEYSVC_LISTEN": "127.0.0.1:7000"},
        overrides={"listen": "127.0.0.1:8000"})
    assert (settings.workers, settings.reflection, settings.health_interval) == (3, True, 2.5)
    assert settings.pin == "111111"  # KEYSVC_HSM_PIN wins over the file's pin_file
    assert settings.listen == "127.0.0.1:8000" and sources["listen"] == "--listen"
    assert sources["workers"] == "KEYSVC_WORKERS" and sources["max_batch_items"] == path


def test_the_config_file_can_be_named_by_keysvc_config(tmp_path, pin_file):
    path = write(tmp_path, f'workers = 4\n[hsm]\npin_file = "{pin_file}"\n')
    settings, _ = config.load_settings(None, environ={"KEYSVC_CONFIG": path, "KEYSVC_INSECURE_LOOPBACK": "1"})
    assert settings.workers == 4


@pytest.mark.parametrize("text, message", [
    ('workers = "two"', "workers: must be a whole number (in "),
    ("workers = 0", "workers: must be at least 1 (from "),
    ('listen = "nowhere"', "listen: must be host:port, not 'nowhere' (from "),
    ('[database]\nurl = "mysql://x"', "database.url: must be a sqlite:/// or postgresql:// URL (from "),
    ('[log]\nformat = "xml"', "log.format: must be one of human, json, not 'xml' (from "),
    ('[log]\nlevel = "LOUD"', "log.level: must be one of DEBUG, INFO, WARNING, ERROR"),
    ("[health]\ninterval = 0", "health.interval: must be more than 0 seconds"),
    ('[log]\naccess = "some"', "log.access: must be one of all, errors, off, not 'some'"),
    ('[metrics]\nlisten = "127.0.0.1:99999"', "metrics.listen: must be host:port"),
    ("[limits]\nmax_batch_items = -1", "limits.max_batch_items: must be at least 1"),
    ('[hsm]\ntokn_label = "x"', "hsm.tokn_label: unknown setting in "),
    ('[hsm]\npin = "123456"', "hsm.pin: the PIN is never read from the configuration file"),
    ("reflection = 1", "reflection: must be true or false"),
    ("workers = [", "not valid TOML"),
    ('[auth]\ndual_control_operations = "ImportKey,DeliverMasterKey"',
     "auth.dual_control_operations: unknown operation(s) DeliverMasterKey: choose among ImportKey, "),
])
def test_a_wrong_file_setting_is_named(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigurationError) as raised:
        config.load_settings(path, environ={"KEYSVC_HSM_PIN": "123456"})
    assert message in str(raised.value)
    assert "123456" not in str(raised.value)


def test_mutual_tls_is_required_unless_insecure_loopback_which_only_loopback_allows(tmp_path, pin_file):
    environ = {"KEYSVC_HSM_PIN_FILE": str(pin_file)}
    with pytest.raises(config.ConfigurationError, match=r"tls.cert: is required .* --insecure-loopback"):
        config.load_settings(None, environ=environ)
    with pytest.raises(config.ConfigurationError, match="insecure_loopback: .* only on a loopback address"):
        config.load_settings(None, environ={**environ, "KEYSVC_INSECURE_LOOPBACK": "1", "KEYSVC_LISTEN": "0.0.0.0:1"})
    with pytest.raises(config.ConfigurationError, match="tls.key: .* is not a readable file"):
        config.load_settings(None, environ={**environ, "KEYSVC_TLS_CERT": str(pin_file),
                                            "KEYSVC_TLS_KEY": str(tmp_path / "missing")})
    settings, _ = config.load_settings(None, environ={**environ, "KEYSVC_INSECURE_LOOPBACK": "yes",
                                                      "KEYSVC_LISTEN": "[::1]:50051"})
    assert settings.insecure_loopback


def test_a_wrong_environment_setting_is_named():
    with pytest.raises(config.ConfigurationError, match="workers: KEYSVC_WORKERS must be a whole number"):
        config.load_settings(None, environ={"KEYSVC_WORKERS": "many", "KEYSVC_HSM_PIN": "1"})
    with pytest.raises(config.ConfigurationError, match=r"health.interval: must be more than 0 seconds \(from KEYSVC_HEALTH_INTERVAL\)"):
        config.load_settings(None, environ={"KEYSVC_HEALTH_INTERVAL": "-1", "KEYSVC_HSM_PIN": "1"})


def test_pin_problems_are_named(tmp_path, pin_file):
    with pytest.raises(config.ConfigurationError, match="hsm.pin_file: no HSM PIN"):
        config.load_settings(None, environ={})
    pin_file.chmod(0o644)
    with pytest.raises(config.ConfigurationError, match="hsm.pin_file: the PIN file .* is readable by others"):
        config.load_settings(None, environ={"KEYSVC_HSM_PIN_FILE": str(pin_file)})
    with pytest.raises(config.ConfigurationError, match=r"cannot read the PIN file .*\(from KEYSVC_HSM_PIN_FILE\)"):
        config.load_settings(None, environ={"KEYSVC_HSM_PIN_FILE": str(tmp_path / "missing")})


def _keysvc(*args, env_extra=None, cwd=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYSVC_")}
    env.update(env_extra or {})
    return subprocess.run([KEYSVC, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


def test_config_check_prints_the_effective_configuration_with_secrets_masked(tmp_path, pin_file):
    path = write(tmp_path, FULL_FILE.format(pin_file=pin_file))
    done = _keysvc("config", "check", "--config", path, env_extra={"KEYSVC_WORKERS": "3"})
    assert done.returncode == 0, done.stderr
    for secret in ("987654", "db-Passw0rd"):
        assert secret not in done.stdout + done.stderr
    printed = tomllib.loads(done.stdout)  # it is TOML: it can serve as a file
    assert printed["workers"] == 3 and printed["hsm"]["token_label"] == "prod"
    assert printed["database"]["url"] == "postgresql://keysvc:****@db.example:5432/keysvc"
    assert "workers = 3  # KEYSVC_WORKERS" in done.stdout
    assert f'token_label = "prod"  # {path}' in done.stdout
    assert "# hsm pin: ****" in done.stdout


def test_config_check_fails_with_exit_2_naming_the_setting(tmp_path):
    path = write(tmp_path, '[log]\nformat = "xml"\n')
    done = _keysvc("config", "check", "--config", path, env_extra={"KEYSVC_HSM_PIN": "246810"})
    assert done.returncode == 2
    assert "log.format: must be one of human, json" in done.stderr
    assert "246810" not in done.stdout + done.stderr


def test_serve_takes_its_settings_from_the_file_and_its_options_still_win(token, tmp_path, merchant):
    # The file asks for JSON logs and a port; the command line's --listen 127.0.0.1:0 wins.
    path = write(tmp_path, f'listen = "127.0.0.1:1"\n[log]\nformat = "json"\n[database]\n'
                           f'url = "sqlite:///{tmp_path / "k.db"}"\n')
    server = start_keysvc_server(token, f"sqlite:///{tmp_path / 'k.db'}", tmp_path / "server.log",
                                 extra_args=("--config", path))
    try:
        with grpc.insecure_channel(server.address) as channel:
            keys_pb2_grpc.KeyServiceStub(channel).CreateKey(keys_pb2.CreateKeyRequest(
                merchant_id=merchant, name="k", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256), timeout=10)
    finally:
        stop_keysvc_server(server)
    assert not server.address.endswith(":1")
    lines = server.log().splitlines()
    assert lines and all(line.startswith('{"time": ') for line in lines)


def test_sighup_applies_the_configuration_files_log_level(token, tmp_path):
    import signal
    import time

    path = write(tmp_path, '[log]\nlevel = "WARNING"\n')
    server = start_keysvc_server(token, f"sqlite:///{tmp_path / 'k.db'}", tmp_path / "server.log",
                                 extra_args=("--config", path))
    try:
        write(tmp_path, '[log]\nlevel = "DEBUG"\n')
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "log level DEBUG" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop_keysvc_server(server)
    assert "log level DEBUG" in server.log()


def test_dual_control_covers_the_operations_the_setting_names_and_always_master_key_delivery():
    from keysvc.authz import OPTIONAL_DUAL_CONTROL, dual_control_methods

    development = {"KEYSVC_HSM_PIN": "123456", "KEYSVC_INSECURE_LOOPBACK": "1"}
    everything, _ = config.load_settings(None, environ=development)
    some, _ = config.load_settings(None, environ={**development,
                                                  "KEYSVC_DUAL_CONTROL_OPERATIONS": " ImportKey , ProposePolicy"})
    assert everything.dual_control_names == tuple(OPTIONAL_DUAL_CONTROL)
    assert some.dual_control_names == ("ImportKey", "ProposePolicy")
    assert dual_control_methods(some.dual_control_names) == {
        "/keysvc.v1.KeyService/ImportKey", "/keysvc.v1.PolicyService/ProposePolicy",
        "/keysvc.v1.MasterKeyService/DeliverMasterKey"}
