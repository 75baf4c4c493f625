# The router (and `pdmesh bench`): no torch, no CUDA, non-root.
#   docker build -f deploy/docker/router.Dockerfile -t pdmesh-router .
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services services
COPY proto proto
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[router]"

FROM python:3.12-slim
RUN useradd --uid 10001 --user-group --create-home pdmesh
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels pdmesh && rm -rf /wheels
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["pdmesh"]
CMD ["router", "--help"]
