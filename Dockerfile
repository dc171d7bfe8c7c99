# stigg-sidecar: answers Stigg entitlement checks over gRPC (8443), health on HTTP (8080).
# Dependencies are the pinned versions of requirements.lock, so a rebuild installs the same ones.
FROM python:3.11-slim AS build
WORKDIR /src
COPY requirements.lock pyproject.toml README.md LICENSE ./
COPY stigg_sidecar ./stigg_sidecar
COPY twisted ./twisted
RUN pip wheel --no-cache-dir --wheel-dir /wheels -r requirements.lock \
    && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin sidecar
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --no-deps /wheels/*.whl && rm -rf /wheels \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && mkdir -p /var/lib/stigg-sidecar && chown 10001:10001 /var/lib/stigg-sidecar
# Numeric, so Kubernetes' runAsNonRoot can verify that the user is not root.
USER 10001:10001
# STATE_DIR (write spool, cache snapshot) when set to this path: mount a volume here.
VOLUME /var/lib/stigg-sidecar
WORKDIR /tmp
ENV PORT=8443 HTTP_PORT=8080 PYTHONUNBUFFERED=1
EXPOSE 8443 8080
# Reads BIND_ADDRESS, HTTP_BIND_ADDRESS, HTTP_PORT and HEALTH_ENDPOINT_URL like the sidecar does.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-m", "stigg_sidecar.healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["twistd", "-n", "--pidfile=", "stigg-sidecar"]
