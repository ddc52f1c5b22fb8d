"""Webhook notifier in Python: the same behaviour as guests/rust-webhook-notifier.

POSTs every event it receives to the URL in its `[config] webhook_url`, as
`{"id": ..., "type": ..., "source": ..., "payload": ...}` with `content-type: application/json`,
through `wasi:http/outgoing-handler` with the bindings componentize-py generates from `wit/`.
A 2xx answer is success; a 5xx answer or a transport error is transient (`retry`); any other
answer (4xx, or a 3xx: redirects are not followed) is `fail`. The manifest's `[http] allow`
must admit the URL: the host refuses everything else with an error code this handler sees.

Build: `./build.sh` (writes dist/python-webhook-notifier.wasm); try it against a local
listener on port 9000:
`eventbroker run dist/python-webhook-notifier.wasm --manifest manifest.toml --event sample-event.json`
"""

import json
from urllib.parse import urlsplit

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host, outgoing_handler
from wit_world.imports.resolvespec_eventbroker_types import (
    Context,
    Event,
    HandlerError_Fail,
    HandlerError_Retry,
    LogLevel,
    Source,
)
from wit_world.imports.wasi_http_types import (
    Fields,
    Method_Post,
    OutgoingBody,
    OutgoingRequest,
    Scheme_Http,
    Scheme_Https,
)

# wasi:io output streams take at most 4096 bytes per blocking write.
WRITE_CHUNK = 4096

SOURCE_NAMES = {
    Source.DATABASE: "database",
    Source.WEBSOCKET: "websocket",
    Source.FRONTEND: "frontend",
    Source.SYSTEM: "system",
    Source.INTERNAL: "internal",
}


class TransportError(Exception):
    """The request did not get an answer (refused by the host, unreachable, timed out)."""


def post_json(url: str, body: bytes) -> int:
    """POSTs `body` to `url` and returns the answer's status code."""
    parts = urlsplit(url)
    headers = [("content-type", b"application/json"), ("content-length", str(len(body)).encode())]
    request = OutgoingRequest(Fields.from_list(headers))
    request.set_method(Method_Post())
    request.set_scheme(Scheme_Https() if parts.scheme == "https" else Scheme_Http())
    request.set_authority(parts.netloc)
    request.set_path_with_query((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
    # The whole body is written before the request is handed to the host (the host buffers
    # up to 1 MiB, more than http.max_request_body allows by default): a request the host
    # refuses then never leaves a body stream half-written.
    outgoing = request.body()
    with outgoing.write() as stream:
        rest = body
        while rest:
            permitted = stream.check_write()
            if permitted == 0:
                with stream.subscribe() as writable:
                    writable.block()
                continue
            stream.write(rest[:permitted])
            rest = rest[permitted:]
        stream.blocking_flush()
    OutgoingBody.finish(outgoing, None)
    try:
        future = outgoing_handler.handle(request, None)
    except Err as refused:
        raise TransportError(f"refused: {refused.value}") from None
    with future:
        with future.subscribe() as ready:
            ready.block()
        answer = future.get()
    if answer is None or isinstance(answer, Err):
        raise TransportError("no answer")
    if isinstance(answer.value, Err):
        raise TransportError(str(answer.value.value))
    with answer.value.value as response:
        return response.status()


class Handler(exports.Handler):
    def handle(self, event: Event, context: Context) -> None:
        url = host.config("webhook_url")
        if url is None:
            raise Err(HandlerError_Fail('config has no "webhook_url"'))
        try:
            payload = json.loads(event.payload)
        except ValueError:
            payload = event.payload
        body = json.dumps(
            {
                "id": event.id,
                "type": event.event_type,
                "source": SOURCE_NAMES.get(event.source, "internal"),
                "payload": payload,
            }
        ).encode()
        try:
            status = post_json(url, body)
        except TransportError as error:
            host.log(LogLevel.WARN, f"webhook {url} unreachable (attempt {context.attempt}): {error}")
            raise Err(HandlerError_Retry(f"webhook unreachable: {error}")) from None
        if 200 <= status < 300:
            host.log(LogLevel.INFO, f"delivered {event.event_type} {event.id} to {url}: {status}")
            return
        if status >= 500:
            host.log(LogLevel.WARN, f"webhook {url} answered {status} (attempt {context.attempt})")
            raise Err(HandlerError_Retry(f"webhook answered {status}"))
        raise Err(HandlerError_Fail(f"webhook answered {status}"))
