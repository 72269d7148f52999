# Turnout gateway. The model repository is mounted at /models.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NUMBA_CACHE_DIR=/var/cache/turnout/numba \
    TURNOUT_CACHE_DIR=/var/cache/turnout/reference \
    TURNOUT_MODEL_REPOSITORY=/models \
    TURNOUT_HOST=0.0.0.0 \
    TURNOUT_PORT=8000

RUN groupadd --gid 10001 turnout \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin turnout \
    && mkdir -p /var/cache/turnout/numba /var/cache/turnout/reference /models \
    && chown -R turnout:turnout /var/cache/turnout

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY router router
COPY monitors monitors
RUN pip install --no-cache-dir .

USER 10001:10001
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('TURNOUT_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["turnout", "serve"]
