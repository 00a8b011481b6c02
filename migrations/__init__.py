"""Alembic migrations of the lowrank-lab database (see jobs/migrate.py for the programmatic entry points)."""
