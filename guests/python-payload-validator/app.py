"""Payload validator in Python: the same behaviour as guests/rust-payload-validator.

Validates an order line (`sku` a non-empty string, `quantity` an integral number in
1..=max_quantity, config `max_quantity`, default 1000) and publishes a derived
`shop.orders.validated` event for each valid one. Bad input fails for good (`fail`);
`"simulate": "transient"` stands for a briefly unreachable dependency (`retry`).

Build: `./build.sh` (writes dist/python-payload-validator.wasm); try it:
`eventbroker run dist/python-payload-validator.wasm --event sample-events.jsonl --manifest manifest.toml`
"""

import json
import re

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import (
    Context,
    Event,
    EventDraft,
    HandlerError_Fail,
    HandlerError_Retry,
    LogLevel,
    Source,
)

DEFAULT_MAX_QUANTITY = 1000
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
MAX_EXACT_INTEGER = 2**53
INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")


def fail(message: str) -> Err:
    return Err(HandlerError_Fail(message))


def retry(message: str) -> Err:
    return Err(HandlerError_Retry(message))


def integer(value: object) -> int | None:
    """A JSON number with an integral value (`2` and `2.0` alike), as every language reads it."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if I64_MIN <= value <= I64_MAX else None
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_EXACT_INTEGER:
        return int(value)
    return None


def max_quantity() -> int:
    text = host.config("max_quantity")
    if text is not None and INTEGER_TEXT.fullmatch(text):
        value = int(text)
        if I64_MIN <= value <= I64_MAX:
            return value
    return DEFAULT_MAX_QUANTITY


class Handler(exports.Handler):
    def handle(self, event: Event, context: Context) -> None:
        try:
            payload = json.loads(event.payload)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise fail("payload is not a JSON object")
        if payload.get("simulate") == "transient":
            host.log(LogLevel.WARN, f"inventory service unavailable (attempt {context.attempt})")
            raise retry("inventory service unavailable")
        limit = max_quantity()
        sku = payload.get("sku")
        if not isinstance(sku, str) or sku == "":
            raise fail('"sku" is missing or empty')
        quantity = integer(payload.get("quantity"))
        if quantity is None:
            raise fail('"quantity" is missing or not an integer')
        if not 1 <= quantity <= limit:
            raise fail(f'"quantity" {quantity} is outside 1..={limit}')
        host.log(LogLevel.INFO, f"order line {sku} x{quantity} is valid")
        draft = EventDraft(
            event_type="shop.orders.validated",
            source=Source.INTERNAL,
            payload=json.dumps({"sku": sku, "quantity": quantity}, ensure_ascii=False),
            user_id=event.user_id,
            session_id=None,
            schema=None,
            entity=None,
            operation=None,
            metadata=None,
        )
        try:
            event_id = host.publish(draft)
        except Err as refused:
            # A refused publish (budget used up, broker stopping) is transient: retry later.
            raise retry(f"could not publish shop.orders.validated: {refused.value}")
        host.log(LogLevel.INFO, f"published shop.orders.validated {event_id}")


class Subscriptions(exports.Subscriptions):
    def patterns(self) -> list[str]:
        return ["shop.orders.create", "shop.orders.update"]
