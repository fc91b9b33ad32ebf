"""scoring: how the worker's trusted evaluator scored each run

`scoring` holds the evaluator's account (tokens scored, batch size, device, the causality
check's largest change of an earlier logit, timings); `score_mismatch` is true when train.py's
own val_bpb (reported_val_bpb) differs from the evaluator's by more than bf16 rounding.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('runs', sa.Column('scoring', sa.JSON(), nullable=True))
    op.add_column('runs', sa.Column('score_mismatch', sa.Boolean(), nullable=True))


def downgrade() -> None:
    op.drop_column('runs', 'score_mismatch')
    op.drop_column('runs', 'scoring')
