"""The Celery workers: validate, decode, name and archive spooled instances."""
