"""Typed application state: what handlers reach through `request.app[...]`, instead of module globals."""

from __future__ import annotations

from aiohttp import web
from opentelemetry.trace import Tracer

from gateway.config import Settings
from runs.faults import FaultPoints
from runs.live import LiveEvents
from runs.manager import RunManager
from runs.ownership import Ownership
from runs.store import Store
from runs.upstream.router import UpstreamRouter
from runs.webhooks import WebhookSettings

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
ROUTER = web.AppKey("router", UpstreamRouter)
RUN_MANAGER = web.AppKey("run_manager", RunManager)
LIVE_EVENTS = web.AppKey("live_events", LiveEvents)
OWNERSHIP = web.AppKey("ownership", Ownership)
WEBHOOK_SETTINGS = web.AppKey("webhook_settings", WebhookSettings)
# Set before start-up by tests that stop or kill a run between two store steps; absent in production.
FAULTS = web.AppKey("faults", FaultPoints)
# The tracer of the app's own tracer provider, present only when tracing is on (gateway/tracing.py).
TRACER = web.AppKey("tracer", Tracer)
