# One image for every role: api, worker, beat, consumer, flower, migrate.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY setup.cfg pyproject.toml README.md celeryconfig.py alembic.ini ./
COPY outbox ./outbox
COPY consumer ./consumer
COPY tasks ./tasks
COPY api ./api
COPY migrations ./migrations
RUN pip install . && useradd --system --uid 10001 --no-create-home outbox
USER outbox
EXPOSE 8000 5555
CMD ["gunicorn", "--bind", "0.0.0.0:8000", "--workers", "4", "--logger-class", "api.gunicorn_logging.Logger", "api:create_app()"]
