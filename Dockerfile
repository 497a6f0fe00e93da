# The project image (worker and Prefect server): the project installed with its tested, pinned set;
# flows run from /app as an unprivileged user.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY torchcycle torchcycle
COPY flows flows
COPY tasks tasks
COPY models models
COPY configs configs
COPY docker/healthcheck.py docker/healthcheck.py
RUN pip install --no-cache-dir -c constraints.txt -e '.[server]' \
    && useradd --create-home --uid 10001 app \
    && mkdir -p data/incoming data/scored data/training cache checkpoints /home/app/.prefect \
    && chown -R app:app /app /home/app/.prefect
ENV PREFECT_SERVER_ANALYTICS_ENABLED=false
# A named volume mounted on /app/data starts as a copy of this folder: incoming/ exists and belongs to app.
USER app
CMD ["prefect", "worker", "start", "--pool", "torchcycle", "--type", "process", "--with-healthcheck"]
