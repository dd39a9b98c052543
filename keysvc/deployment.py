"""A token's place in a deployment: several replicas, each with its own HSM, sharing
one database. The HSMs share only the master key; the binding key and the import key
pair are made once per database in an HSM, stored wrapped under the master key
(table shared_keys) and installed by every serving process.

The database also records the master key's long check value (row "master") the first
time a replica starts on it: a replica whose token holds another master key is refused
at start, before it could wrap anything under it.

Nothing in the database is trusted for what the HSM can check itself: the import
public key that merchants wrap secrets to is read from the unwrapped import private
key, and the stored copy must agree with it (hsm.Hsm.install_shared_keys).
"""

from __future__ import annotations

import logging

import sqlalchemy as sa

import hsm
from keysvc.config import ConfigurationError
from keysvc.store.shared_keys import BINDING, IMPORT, MASTER, SharedKeyStore

log = logging.getLogger("keysvc.deployment")


def _hsm_failure(error: hsm.HsmError) -> ConfigurationError:
    return ConfigurationError(f"hsm: {error}")


def prepare_token(token: hsm.Hsm, engine: sa.Engine) -> None:
    """Makes the token ready to serve the database (once per start, before the
    serving processes): creates the master key on an empty token when the database
    records none (the first replica), records or checks its check value, and creates
    the shared keys if the database has none yet. Callers on one host take turns
    (keysvc.service.prepare holds a lock), so a fresh token never gets two master keys.

    Raises ConfigurationError when the token's master key is not the database's, or
    the token has none while the database records one (enroll it, or restore a backup).
    """
    store = SharedKeyStore(engine)
    try:
        if not token.has_master_key:
            recorded = store.get(MASTER)
            if recorded is not None:
                raise ConfigurationError(
                    f"hsm: the token holds no keysvc master key, and this database's master key has check value "
                    f"{recorded.check_value[:hsm.MASTER_CHECK_VALUE_DIGITS]}: enroll this replica (keysvc replica "
                    "enroll) or restore a backup (keysvc master-key restore)")
            token.ensure_master_key()
            log.info("created the token's master key")
        check_master_key(token, store)
        if store.get(BINDING) is None and store.get(IMPORT) is None and token.has_token_held_shared_keys:
            return  # an older token: load_shared_keys_into uses its own keys
        if store.get(BINDING) is None or store.get(IMPORT) is None:
            # A process already holding shared keys (a token used alone before) lends
            # them, so that what it bound stays valid; otherwise new ones are made.
            shared = token.installed_shared_keys or token.make_shared_keys()
            store.insert_or_get(BINDING, wrapped_key=shared.binding_key)
            store.insert_or_get(IMPORT, wrapped_key=shared.import_private_key, public_key=shared.import_public_key)
    except hsm.HsmError as error:
        raise _hsm_failure(error) from None


def check_master_key(token: hsm.Hsm, store: SharedKeyStore) -> str:
    """Records the token's master key long check value if the database has none, and
    returns it. Raises ConfigurationError when the database records another one."""
    check_value = token.master_key_long_check_value()
    recorded = store.insert_or_get(MASTER, check_value=check_value)
    if recorded.check_value != check_value:
        short = hsm.MASTER_CHECK_VALUE_DIGITS
        raise ConfigurationError(
            f"hsm: this token's master key has check value {check_value[:short]} (long {check_value}), but the "
            f"database's master key has check value {recorded.check_value[:short]} (long {recorded.check_value}): "
            "this token belongs to another deployment. Use a token enrolled into this one (keysvc replica enroll) "
            "or restored from its backup (keysvc master-key restore)")
    return check_value


def load_shared_keys_into(token: hsm.Hsm, engine: sa.Engine) -> None:
    """Installs the database's shared keys in this process's token (each serving
    process, after prepare_token), having checked that the token's master key is the
    database's. The import public key served is the HSM's reading of the import
    private key; the database's copy must agree with it. Raises ConfigurationError
    when the master key is not the database's, when the database has no shared keys
    yet (prepare_token makes them), or when its import public key is not the import
    private key's (the row was altered)."""
    store = SharedKeyStore(engine)
    try:
        check_master_key(token, store)
        binding, imported = store.get(BINDING), store.get(IMPORT)
        if binding is None and imported is None and token.has_token_held_shared_keys:
            log.warning("this token holds its own binding and import keys (made before shared keys): they are "
                        "used, and no other HSM can serve this database")
            token.use_token_held_shared_keys()
            return
        if binding is None or imported is None:
            raise ConfigurationError("database: it has no shared keys yet: start keysvc serve once to make them")
        token.install_shared_keys(hsm.WrappedSharedKeys(
            binding.wrapped_key, imported.wrapped_key, imported.public_key))
    except hsm.HsmUnwrapFailed:
        raise ConfigurationError(
            "hsm: the database's shared keys do not unwrap under this token's master key") from None
    except hsm.HsmKeyCheckFailed:
        raise ConfigurationError(
            f"database: the import public key in shared_keys (row {IMPORT!r}) is not the public half of the import "
            "private key beside it: the row was altered, and merchants would wrap their secrets to another key. "
            "Nothing is served: restore the row from a database backup") from None
    except hsm.HsmError as error:
        raise _hsm_failure(error) from None
