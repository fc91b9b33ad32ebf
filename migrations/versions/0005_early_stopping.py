"""early stopping: a tag may opt in to having clear losers stopped (pruned) before their budget ends

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('tags', sa.Column('early_stopping', sa.Boolean(), nullable=False, server_default=sa.false()))
    op.alter_column('tags', 'early_stopping', server_default=None)


def downgrade() -> None:
    op.drop_column('tags', 'early_stopping')
