"""staged start: when a run got its GPU (a staged run is claimed before), and how it was staged

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('runs', sa.Column('gpu_granted_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('runs', sa.Column('staging', sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column('runs', 'staging')
    op.drop_column('runs', 'gpu_granted_at')
