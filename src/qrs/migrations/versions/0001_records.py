"""The first records schema: models, inspections, reviews.

Revision ID: 0001
Revises: none
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", ID, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("resize", sa.String(16), nullable=False),
        sa.Column("backend", sa.String(16), nullable=False),
        sa.Column("arch", sa.String(64), nullable=False),
        sa.Column("img_height", sa.Integer(), nullable=False),
        sa.Column("img_width", sa.Integer(), nullable=False),
        sa.Column("scale", sa.Float(), nullable=True),
        sa.Column("anchor", sa.String(16), nullable=True),
        sa.Column("quantile", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("first_seen", TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_models"),
        sa.UniqueConstraint("sha256", "resize", "backend", name="uq_models_sha256_resize_backend"),
    )
    op.create_table(
        "inspections",
        sa.Column("id", ID, nullable=False),
        sa.Column("time", TIME, nullable=False),
        sa.Column("station", sa.String(255), nullable=False),
        sa.Column("part_id", sa.String(255), nullable=False),
        sa.Column("file", sa.String(1024), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=True),
        sa.Column("model_id", ID, nullable=False),
        sa.Column("prediction", sa.SmallInteger(), nullable=True),
        sa.Column("p_defective", sa.Float(), nullable=True),
        sa.Column("qrs", sa.Float(), nullable=True),
        sa.Column("risk_level", sa.String(8), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("image_key", sa.String(80), nullable=True),
        sa.Column("overlay_key", sa.String(80), nullable=True),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_inspections_model_id_models"),
        sa.PrimaryKeyConstraint("id", name="pk_inspections"),
    )
    for columns in (["time"], ["station"], ["image_sha256"], ["image_key"], ["overlay_key"], ["model_id", "id"]):
        op.create_index(f"ix_inspections_{'_'.join(columns)}", "inspections", columns)
    op.create_table(
        "reviews",
        sa.Column("id", ID, nullable=False),
        sa.Column("inspection_id", ID, nullable=False),
        sa.Column("time", TIME, nullable=False),
        sa.Column("reviewer", sa.String(255), nullable=False),
        sa.Column("truth", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["inspection_id"], ["inspections.id"], name="fk_reviews_inspection_id_inspections"),
        sa.PrimaryKeyConstraint("id", name="pk_reviews"),
    )
    op.create_index("ix_reviews_inspection_id", "reviews", ["inspection_id"])


def downgrade() -> None:
    op.drop_table("reviews")
    op.drop_table("inspections")
    op.drop_table("models")
