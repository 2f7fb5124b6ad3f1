"""Alembic migrations of the outbox schema."""
