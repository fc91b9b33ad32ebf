"""Alembic environment: the URL comes from the caller or from app.config."""

from alembic import context
from sqlalchemy import create_engine, pool

from app.config import load_settings
from app.models import Base

config = context.config
url = config.attributes.get("database_url") or load_settings().database_url

engine = create_engine(url, poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()
