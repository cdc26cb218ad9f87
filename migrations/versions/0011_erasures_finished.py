"""erasures: a record left `{}` by an erasure whose second step failed, and finished since by
another erasure of the same person, is marked `{"finished_by": id}`.

While a record is `{}` the erasure counts as running: every body naming the person is dropped
whenever received. Erasures made before this marking was written finished their failed ones
without saying so.

Revision ID: 0011
Revises: 0010
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    UPDATE erasures e SET touched = jsonb_build_object('finished_by', later.id)
      FROM (SELECT DISTINCT ON (f.id) f.id AS failed, l.id
              FROM erasures f JOIN erasures l
                ON l.email_sha256 = f.email_sha256 AND l.id > f.id AND l.touched <> '{}'
             WHERE f.touched = '{}' ORDER BY f.id, l.id) AS later
     WHERE e.id = later.failed
    """)


def downgrade() -> None:
    pass  # the marks stay: they are true under 0010 too, which writes them itself
