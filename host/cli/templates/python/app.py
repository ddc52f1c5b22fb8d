"""The {{name}} handler: greets `payload.name`; a payload that is not a JSON object fails."""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import Context, Event, HandlerError_Fail, LogLevel


class Handler(exports.Handler):
    def handle(self, event: Event, context: Context) -> None:
        try:
            payload = json.loads(event.payload)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise Err(HandlerError_Fail("payload is not a JSON object"))
        name = payload.get("name") if isinstance(payload.get("name"), str) else "stranger"
        greeting = host.config("greeting") or "hello"
        host.log(LogLevel.INFO, f"{greeting}, {name} ({event.event_type} attempt {context.attempt})")


class Subscriptions(exports.Subscriptions):
    def patterns(self) -> list[str]:
        """Default patterns; the manifest's `patterns` override them."""
        return ["example.greeting.*"]
