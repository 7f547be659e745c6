"""The OpenTelemetry API's global tracer provider for the tracing tests: reset around a test
(the API sets it once per process; its own tests reset it this way), or an SDK provider that
exports the test's spans to memory."""

from __future__ import annotations

import pytest

trace = pytest.importorskip("opentelemetry.trace")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.util._once import Once  # noqa: E402


def reset_provider() -> None:
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@pytest.fixture
def no_provider():
    reset_provider()
    yield
    reset_provider()


@pytest.fixture
def spans():
    """A global SDK tracer provider exporting to memory for the test (reset after it)."""
    reset_provider()
    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    reset_provider()
