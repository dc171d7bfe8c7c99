# stigg-sidecar: answers Stigg entitlement checks over gRPC (8443), health on HTTP (8080).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY stigg_sidecar ./stigg_sidecar
COPY twisted ./twisted
COPY protos ./protos
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sidecar
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && mkdir -p /var/lib/stigg-sidecar && chown sidecar /var/lib/stigg-sidecar
USER sidecar
# STATE_DIR (write spool, cache snapshot) when set to this path: mount a volume here.
VOLUME /var/lib/stigg-sidecar
WORKDIR /tmp
ENV PORT=8443 HTTP_PORT=8080 PYTHONUNBUFFERED=1
EXPOSE 8443 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/%s' % (os.environ.get('HTTP_PORT', '8080'), os.environ.get('HEALTH_ENDPOINT_URL', 'livez')), timeout=2).status == 200 else 1)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["twistd", "-n", "--pidfile=", "stigg-sidecar"]
