"""initial schema: jobs, sweeps, job_tags, metrics, artifacts, uploads, api_tokens

Revision ID: 0001
Revises:
Create Date: 2026-11-26 17:08:48.347575+00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here (not imported from jobs.models) so later model changes never alter this revision.
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table('api_tokens',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('admin', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_tokens')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_api_tokens_token_hash'))
    )
    op.create_index(op.f('ix_api_tokens_name'), 'api_tokens', ['name'], unique=False)
    op.create_table('sweeps',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=True),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('base', JSON, nullable=False),
    sa.Column('grid', JSON, nullable=False),
    sa.Column('seeds', JSON, nullable=False),
    sa.Column('early_stopping', JSON, nullable=True),
    sa.Column('n_points', sa.Integer(), nullable=False),
    sa.Column('n_jobs', sa.Integer(), nullable=False),
    sa.Column('idempotency_key', sa.String(length=255), nullable=True),
    sa.Column('owner', sa.String(length=128), nullable=True),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("kind IN ('approx', 'learn', 'train')", name=op.f('ck_sweeps_kind')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_sweeps')),
    sa.UniqueConstraint('idempotency_key', name=op.f('uq_sweeps_idempotency_key'))
    )
    op.create_index(op.f('ix_sweeps_created_at_id'), 'sweeps', ['created_at', 'id'], unique=False)
    op.create_index(op.f('ix_sweeps_owner'), 'sweeps', ['owner'], unique=False)
    op.create_table('uploads',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('filename', sa.String(length=255), nullable=False),
    sa.Column('format', sa.String(length=16), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('arrays', JSON, nullable=True),
    sa.Column('owner', sa.String(length=128), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("format IN ('npy', 'npz', 'safetensors', 'pt')", name=op.f('ck_uploads_format')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_uploads'))
    )
    op.create_index(op.f('ix_uploads_created_at_id'), 'uploads', ['created_at', 'id'], unique=False)
    op.create_table('jobs',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('spec', JSON, nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('priority', sa.String(length=8), nullable=False),
    sa.Column('queue', sa.String(length=8), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=True),
    sa.Column('tags', JSON, nullable=False),
    sa.Column('owner', sa.String(length=128), nullable=True),
    sa.Column('idempotency_key', sa.String(length=255), nullable=True),
    sa.Column('sweep_id', sa.Uuid(), nullable=True),
    sa.Column('sweep_point', JSON, nullable=True),
    sa.Column('sweep_point_index', sa.Integer(), nullable=True),
    sa.Column('seed', sa.BigInteger(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('worker', sa.String(length=255), nullable=True),
    sa.Column('progress', sa.Double(), nullable=True),
    sa.Column('result', JSON, nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("kind IN ('approx', 'learn', 'train')", name=op.f('ck_jobs_kind')),
    sa.CheckConstraint("priority IN ('high', 'normal', 'low')", name=op.f('ck_jobs_priority')),
    sa.CheckConstraint("queue IN ('cpu', 'gpu')", name=op.f('ck_jobs_queue')),
    sa.CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name=op.f('ck_jobs_status')),
    sa.ForeignKeyConstraint(['sweep_id'], ['sweeps.id'], name=op.f('fk_jobs_sweep_id_sweeps'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs')),
    sa.UniqueConstraint('idempotency_key', name=op.f('uq_jobs_idempotency_key')),
    sa.UniqueConstraint('sweep_id', 'sweep_point_index', 'seed', name=op.f('uq_jobs_sweep_id_sweep_point_index_seed'))
    )
    op.create_index(op.f('ix_jobs_created_at_id'), 'jobs', ['created_at', 'id'], unique=False)
    op.create_index(op.f('ix_jobs_kind_created_at_id'), 'jobs', ['kind', 'created_at', 'id'], unique=False)
    op.create_index(op.f('ix_jobs_owner_created_at_id'), 'jobs', ['owner', 'created_at', 'id'], unique=False)
    op.create_index(op.f('ix_jobs_status_created_at_id'), 'jobs', ['status', 'created_at', 'id'], unique=False)
    op.create_index(op.f('ix_jobs_status_heartbeat_at'), 'jobs', ['status', 'heartbeat_at'], unique=False)
    op.create_index(op.f('ix_jobs_sweep_id_created_at_id'), 'jobs', ['sweep_id', 'created_at', 'id'], unique=False)
    op.create_table('artifacts',
    sa.Column('job_id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_artifacts_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', 'name', name=op.f('pk_artifacts'))
    )
    op.create_table('job_tags',
    sa.Column('job_id', sa.Uuid(), nullable=False),
    sa.Column('tag', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_tags_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', 'tag', name=op.f('pk_job_tags'))
    )
    op.create_index(op.f('ix_job_tags_tag_job_id'), 'job_tags', ['tag', 'job_id'], unique=False)
    op.create_table('metrics',
    sa.Column('job_id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('step', sa.BigInteger(), nullable=False),
    sa.Column('value', sa.Double(), nullable=True),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_metrics_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', 'name', 'step', name=op.f('pk_metrics'))
    )


def downgrade() -> None:
    op.drop_table('metrics')
    op.drop_index(op.f('ix_job_tags_tag_job_id'), table_name='job_tags')
    op.drop_table('job_tags')
    op.drop_table('artifacts')
    op.drop_index(op.f('ix_jobs_sweep_id_created_at_id'), table_name='jobs')
    op.drop_index(op.f('ix_jobs_status_heartbeat_at'), table_name='jobs')
    op.drop_index(op.f('ix_jobs_status_created_at_id'), table_name='jobs')
    op.drop_index(op.f('ix_jobs_owner_created_at_id'), table_name='jobs')
    op.drop_index(op.f('ix_jobs_kind_created_at_id'), table_name='jobs')
    op.drop_index(op.f('ix_jobs_created_at_id'), table_name='jobs')
    op.drop_table('jobs')
    op.drop_index(op.f('ix_uploads_created_at_id'), table_name='uploads')
    op.drop_table('uploads')
    op.drop_index(op.f('ix_sweeps_owner'), table_name='sweeps')
    op.drop_index(op.f('ix_sweeps_created_at_id'), table_name='sweeps')
    op.drop_table('sweeps')
    op.drop_index(op.f('ix_api_tokens_name'), table_name='api_tokens')
    op.drop_table('api_tokens')
