"""Alembic environment: keysvc passes an open connection in config.attributes."""

from alembic import context
from sqlalchemy import create_engine

from keysvc.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # run by hand with the alembic command
    connection = create_engine(context.config.get_main_option("sqlalchemy.url")).connect()

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
