"""The test suite. Hypothesis runs under one profile here: its wall-clock checks (a per-example
deadline, the "input generation is slow" health check) measure the machine, not the code, and
fail on a loaded CI box; the properties themselves are unchanged."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "stigg-sidecar",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("stigg-sidecar")
