"""initial timeline schema

Revision ID: 0001
Revises: 
Create Date: 2026-12-03 16:49:26.558107
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('blobs',
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('stored_size', sa.BigInteger(), nullable=False),
    sa.Column('created', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('digest')
    )
    op.create_table('cycles',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('snapshot', sa.String(length=64), nullable=False),
    sa.Column('pre_rewind_snapshot', sa.String(length=64), nullable=True),
    sa.Column('rewind_to_seq', sa.BigInteger(), nullable=False),
    sa.Column('base_seq', sa.BigInteger(), nullable=False),
    sa.Column('end_seq', sa.BigInteger(), nullable=False),
    sa.Column('skipped', sa.JSON(), nullable=False),
    sa.Column('notes', sa.JSON(), nullable=False),
    sa.Column('replayed', sa.Integer(), nullable=False),
    sa.Column('to_replay', sa.Integer(), nullable=False),
    sa.Column('opened', sa.DateTime(timezone=True), nullable=False),
    sa.Column('closed', sa.DateTime(timezone=True), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('snapshots',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('after_seq', sa.BigInteger(), nullable=False),
    sa.Column('label', sa.Text(), nullable=True),
    sa.Column('backend', sa.String(length=16), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('valid', sa.Boolean(), nullable=False),
    sa.Column('duration_ms', sa.Float(), nullable=False),
    sa.Column('pause_ms', sa.Float(), nullable=False),
    sa.Column('deleted', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('inconsistencies',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('cycle', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('seq', sa.BigInteger(), nullable=False),
    sa.Column('replay_seq', sa.BigInteger(), nullable=True),
    sa.Column('verb', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.Column('compensation', sa.String(length=16), nullable=False),
    sa.Column('compensation_detail', sa.Text(), nullable=True),
    sa.Column('created', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['cycle'], ['cycles.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('inconsistencies', schema=None) as batch_op:
        batch_op.create_index('ix_inconsistencies_cycle', ['cycle'], unique=False)

    op.create_table('verbs',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('protocol', sa.String(length=16), nullable=False),
    sa.Column('frontend', sa.String(length=64), nullable=False),
    sa.Column('verb', sa.String(length=64), nullable=False),
    sa.Column('targets', sa.JSON(), nullable=False),
    sa.Column('mutates', sa.Boolean(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('origin', sa.String(length=16), nullable=False),
    sa.Column('cycle', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('original_seq', sa.BigInteger(), nullable=True),
    sa.Column('summary', sa.Text(), nullable=False),
    sa.Column('request', sa.JSON(), nullable=False),
    sa.Column('output', sa.JSON(), nullable=True),
    sa.Column('finished', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['cycle'], ['cycles.id'], ),
    sa.PrimaryKeyConstraint('seq')
    )
    with op.batch_alter_table('verbs', schema=None) as batch_op:
        batch_op.create_index('ix_verbs_cycle', ['cycle'], unique=False)
        batch_op.create_index('ix_verbs_status', ['status'], unique=False)
        batch_op.create_index('ix_verbs_verb', ['verb'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('verbs', schema=None) as batch_op:
        batch_op.drop_index('ix_verbs_verb')
        batch_op.drop_index('ix_verbs_status')
        batch_op.drop_index('ix_verbs_cycle')

    op.drop_table('verbs')
    with op.batch_alter_table('inconsistencies', schema=None) as batch_op:
        batch_op.drop_index('ix_inconsistencies_cycle')

    op.drop_table('inconsistencies')
    op.drop_table('snapshots')
    op.drop_table('cycles')
    op.drop_table('blobs')
