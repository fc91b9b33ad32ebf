"""compile seconds: each run's step-0 wall time, which torch.compile dominates

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('runs', sa.Column('compile_seconds', sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column('runs', 'compile_seconds')
