# One image for master and worker: `dist-exec master` or `dist-exec worker` (the default).
#   docker build -t dist-exec:latest .
# deploy/kubernetes/ runs the master as user 10001, the worker as root (with only the
# capabilities it needs) so that its commands run as nobody.
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin dist-exec
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
WORKDIR /home/dist-exec
ENV PYTHONUNBUFFERED=1 DIST_EXEC_DATA_DIR=/home/dist-exec/data
EXPOSE 50051 50052
ENTRYPOINT ["dist-exec"]
CMD ["worker"]
