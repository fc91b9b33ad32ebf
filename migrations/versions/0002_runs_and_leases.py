"""runs as rows with leases; verdict uncertainty; status constraints

Every experiment becomes one run with the same id, so a training message sent before the
upgrade (it names the experiment id) claims the run that replaced it. A run that was
`running` gets an expired lease: the sweep requeues it as a new attempt.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

EXPERIMENT_STATUSES = ('queued', 'running', 'confirming', 'keep', 'discard', 'crash', 'timeout', 'cancelled',
                       'pruned')
RUN_STATUSES = ('queued', 'running', 'finished', 'crash', 'timeout', 'cancelled', 'lost', 'released', 'pruned')
METRICS = ('profile', 'val_bpb', 'training_seconds', 'total_seconds', 'peak_vram_mb', 'mfu_percent',
           'total_tokens_m', 'num_steps', 'num_params_m', 'depth')


def _check(table, column, values):
    allowed = ", ".join(f"'{v}'" for v in values)
    op.create_check_constraint(f'ck_{table}_{column}', table, f'{column} IN ({allowed})')


def upgrade() -> None:
    op.create_table('runs',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('experiment_id', sa.String(length=40), nullable=False),
    sa.Column('replicate', sa.Integer(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('purpose', sa.String(length=16), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('scored_by', sa.String(length=16), nullable=False),
    sa.Column('gpu_id', sa.String(length=128), nullable=True),
    sa.Column('gpu_index', sa.Integer(), nullable=True),
    sa.Column('gpu_model', sa.String(length=255), nullable=True),
    sa.Column('host', sa.String(length=255), nullable=True),
    sa.Column('lease_holder', sa.String(length=128), nullable=True),
    sa.Column('lease_token', sa.String(length=64), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('task_id', sa.String(length=64), nullable=True),
    sa.Column('queue', sa.String(length=200), nullable=True),
    sa.Column('queued_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('training_started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('profile', sa.String(length=32), nullable=True),
    sa.Column('val_bpb', sa.Float(), nullable=True),
    sa.Column('reported_val_bpb', sa.Float(), nullable=True),
    sa.Column('training_seconds', sa.Float(), nullable=True),
    sa.Column('total_seconds', sa.Float(), nullable=True),
    sa.Column('peak_vram_mb', sa.Float(), nullable=True),
    sa.Column('mfu_percent', sa.Float(), nullable=True),
    sa.Column('total_tokens_m', sa.Float(), nullable=True),
    sa.Column('num_steps', sa.Integer(), nullable=True),
    sa.Column('num_params_m', sa.Float(), nullable=True),
    sa.Column('depth', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('log_path', sa.Text(), nullable=True),
    sa.Column('log_tail', sa.Text(), nullable=True),
    sa.Column('progress', sa.JSON(), nullable=True),
    sa.Column('curve', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['experiment_id'], ['experiments.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_runs_experiment', 'runs', ['experiment_id', 'replicate', 'attempt'], unique=False)
    op.create_index('ix_runs_status_lease', 'runs', ['status', 'lease_expires_at'], unique=False)
    op.create_index('ix_runs_holder', 'runs', ['lease_holder', 'status'], unique=False)
    _check('runs', 'status', RUN_STATUSES)
    _check('runs', 'purpose', ('first', 'baseline', 'confirm'))
    _check('runs', 'scored_by', ('worker', 'agent'))

    metrics = ", ".join(METRICS)
    op.execute(f"""
        INSERT INTO runs (id, experiment_id, replicate, attempt, purpose, seed, status, scored_by, gpu_id, gpu_index,
                          lease_holder, lease_token, lease_expires_at, task_id, queue, queued_at, claimed_at,
                          finished_at, {metrics}, error, log_path, progress)
        SELECT id, id, 0,
               CASE WHEN status = 'queued' THEN attempts + 1 ELSE GREATEST(attempts, 1) END,
               'first', 42,
               CASE WHEN status IN ('keep', 'discard') THEN 'finished' ELSE status END,
               CASE WHEN train_py IS NULL THEN 'agent' ELSE 'worker' END,
               gpu_id, gpu_index,
               CASE WHEN status = 'running' AND train_py IS NOT NULL THEN gpu_id END,
               CASE WHEN status = 'running' AND train_py IS NOT NULL THEN 'before-leases' END,
               CASE WHEN status = 'running' AND train_py IS NOT NULL THEN now() END,
               task_id,
               CASE WHEN pinned_gpu IS NULL THEN 'train' ELSE 'gpu.' || pinned_gpu END,
               created_at, started_at, finished_at, {metrics}, error, log_path, progress
        FROM experiments
    """)

    op.add_column('experiments', sa.Column('dispatched', sa.Boolean(), nullable=False, server_default=sa.false()))
    op.execute("UPDATE experiments SET dispatched = (train_py IS NOT NULL)")
    op.alter_column('experiments', 'dispatched', server_default=None)
    op.add_column('experiments', sa.Column('sigma', sa.Float(), nullable=True))
    op.add_column('experiments', sa.Column('z', sa.Float(), nullable=True))
    op.add_column('experiments', sa.Column('pinned_gpu_id', sa.String(length=128), nullable=True))
    op.drop_index('ix_experiments_status_gpu', table_name='experiments')
    for column in ('gpu_id', 'gpu_index', 'task_id', 'log_path', 'progress', 'attempts'):
        op.drop_column('experiments', column)
    _check('experiments', 'status', EXPERIMENT_STATUSES)

    op.add_column('gpus', sa.Column('kind', sa.String(length=16), nullable=False, server_default='manual'))
    op.alter_column('gpus', 'kind', server_default=None)
    op.add_column('gpus', sa.Column('current_run_id', sa.String(length=40), nullable=True))
    _check('gpus', 'status', ('idle', 'training', 'offline'))
    _check('gpus', 'kind', ('worker', 'manual'))


def downgrade() -> None:
    op.drop_constraint('ck_gpus_kind', 'gpus')
    op.drop_constraint('ck_gpus_status', 'gpus')
    op.drop_column('gpus', 'current_run_id')
    op.drop_column('gpus', 'kind')
    op.drop_constraint('ck_experiments_status', 'experiments')
    op.add_column('experiments', sa.Column('attempts', sa.Integer(), nullable=False, server_default='0'))
    op.add_column('experiments', sa.Column('progress', sa.JSON(), nullable=True))
    op.add_column('experiments', sa.Column('log_path', sa.Text(), nullable=True))
    op.add_column('experiments', sa.Column('task_id', sa.String(length=64), nullable=True))
    op.add_column('experiments', sa.Column('gpu_index', sa.Integer(), nullable=True))
    op.add_column('experiments', sa.Column('gpu_id', sa.String(length=128), nullable=True))
    op.create_index('ix_experiments_status_gpu', 'experiments', ['status', 'gpu_index'], unique=False)
    op.drop_column('experiments', 'pinned_gpu_id')
    op.drop_column('experiments', 'z')
    op.drop_column('experiments', 'sigma')
    op.drop_column('experiments', 'dispatched')
    op.drop_table('runs')
