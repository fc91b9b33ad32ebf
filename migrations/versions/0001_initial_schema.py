"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('gpus',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('gpu_index', sa.Integer(), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('gpu_name', sa.String(length=255), nullable=False),
    sa.Column('vram_mb', sa.Float(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('current_experiment_id', sa.String(length=40), nullable=True),
    sa.Column('registered_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('last_heartbeat', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('telemetry', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_gpus_status_index', 'gpus', ['status', 'gpu_index'], unique=False)
    op.create_table('tags',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('branch', sa.String(length=96), nullable=False),
    sa.Column('profile', sa.String(length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('best_val_bpb', sa.Float(), nullable=True),
    sa.Column('best_experiment_id', sa.String(length=40), nullable=True),
    sa.Column('total_experiments', sa.Integer(), nullable=False),
    sa.Column('kept_experiments', sa.Integer(), nullable=False),
    sa.Column('discarded_experiments', sa.Integer(), nullable=False),
    sa.Column('crashed_experiments', sa.Integer(), nullable=False),
    sa.Column('consecutive_crashes', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('experiments',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tag', sa.String(length=64), nullable=False),
    sa.Column('parent_id', sa.String(length=40), nullable=True),
    sa.Column('commit_sha', sa.String(length=64), nullable=False),
    sa.Column('train_py', sa.Text(), nullable=True),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('hypothesis', sa.Text(), nullable=False),
    sa.Column('category', sa.String(length=32), nullable=False),
    sa.Column('diff_summary', sa.Text(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('profile', sa.String(length=32), nullable=True),
    sa.Column('val_bpb', sa.Float(), nullable=True),
    sa.Column('training_seconds', sa.Float(), nullable=True),
    sa.Column('total_seconds', sa.Float(), nullable=True),
    sa.Column('peak_vram_mb', sa.Float(), nullable=True),
    sa.Column('mfu_percent', sa.Float(), nullable=True),
    sa.Column('total_tokens_m', sa.Float(), nullable=True),
    sa.Column('num_steps', sa.Integer(), nullable=True),
    sa.Column('num_params_m', sa.Float(), nullable=True),
    sa.Column('depth', sa.Integer(), nullable=True),
    sa.Column('delta', sa.Float(), nullable=True),
    sa.Column('near_miss', sa.Boolean(), nullable=False),
    sa.Column('gpu_id', sa.String(length=128), nullable=True),
    sa.Column('gpu_index', sa.Integer(), nullable=True),
    sa.Column('pinned_gpu', sa.Integer(), nullable=True),
    sa.Column('task_id', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('log_path', sa.Text(), nullable=True),
    sa.Column('progress', sa.JSON(), nullable=True),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['tag'], ['tags.name'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_experiments_near_miss', 'experiments', ['tag', 'delta'], unique=False, postgresql_where=sa.text('near_miss IS true'))
    op.create_index('ix_experiments_status_gpu', 'experiments', ['status', 'gpu_index'], unique=False)
    op.create_index('ix_experiments_tag_created', 'experiments', ['tag', 'created_at'], unique=False)
    op.create_index('ix_experiments_tag_status', 'experiments', ['tag', 'status'], unique=False)
    op.create_index('ix_experiments_finished', 'experiments', ['finished_at'], unique=False)
    op.create_table('strategies',
    sa.Column('tag', sa.String(length=64), nullable=False),
    sa.Column('mode', sa.String(length=16), nullable=False),
    sa.Column('explore_ratio', sa.Float(), nullable=False),
    sa.Column('temperature', sa.Float(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['tag'], ['tags.name'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('tag')
    )


def downgrade() -> None:
    op.drop_table('strategies')
    op.drop_index('ix_experiments_tag_status', table_name='experiments')
    op.drop_index('ix_experiments_finished', table_name='experiments')
    op.drop_index('ix_experiments_tag_created', table_name='experiments')
    op.drop_index('ix_experiments_status_gpu', table_name='experiments')
    op.drop_index('ix_experiments_near_miss', table_name='experiments', postgresql_where=sa.text('near_miss IS true'))
    op.drop_table('experiments')
    op.drop_table('tags')
    op.drop_index('ix_gpus_status_index', table_name='gpus')
    op.drop_table('gpus')
