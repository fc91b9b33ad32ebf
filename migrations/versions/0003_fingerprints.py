"""fingerprints: the setup each run was scored with, and the one each tag is pinned to

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('runs', sa.Column('fingerprint', sa.JSON(), nullable=True))
    op.add_column('tags', sa.Column('fingerprint', sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column('tags', 'fingerprint')
    op.drop_column('runs', 'fingerprint')
