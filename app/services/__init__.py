"""Domain logic: plain functions over a SQLAlchemy session. HTTP and Celery only call these."""
