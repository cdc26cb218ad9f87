# Leadpipe image: one image for every role (api, worker, migrate, flower); the role is the command.
# Build stage: install the project and its runtime dependencies (no test extra) into a venv.
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/leadpipe

WORKDIR /src
COPY pyproject.toml README.md ./
COPY ingest/ ingest/
COPY workers/ workers/
COPY sinks/ sinks/
COPY config/ config/
COPY migrations/ migrations/
RUN /opt/leadpipe/bin/pip install .

# Runtime stage: the venv only (no sources, no build tools), run by an unprivileged user.
FROM python:3.11-slim

ENV PATH=/opt/leadpipe/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN groupadd --system --gid 10001 leadpipe \
 && useradd --system --uid 10001 --gid leadpipe --create-home --home-dir /home/leadpipe leadpipe

COPY --from=build /opt/leadpipe /opt/leadpipe

USER 10001:10001
WORKDIR /home/leadpipe

# 8000: ingest API (`leadpipe api`); 5555: Flower (`leadpipe flower`)
EXPOSE 8000 5555

CMD ["leadpipe", "api", "--host", "0.0.0.0", "--port", "8000"]
