# The worker image: the project installed with its tested, pinned set; flows run from /app.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY torchcycle torchcycle
COPY flows flows
COPY tasks tasks
COPY models models
COPY configs configs
RUN pip install --no-cache-dir -c constraints.txt -e .
ENV PREFECT_SERVER_ANALYTICS_ENABLED=false
CMD ["prefect", "worker", "start", "--pool", "torchcycle", "--type", "process"]
