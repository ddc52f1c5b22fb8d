// Webhook notifier in JavaScript: the same behaviour as guests/rust-webhook-notifier, with
// `fetch`.
//
// POSTs every event it receives to the URL in its `[config] webhook_url`, as
// `{"id": …, "type": …, "source": …, "payload": …}` with `content-type: application/json`.
// A 2xx answer is success; a 5xx answer or a network error is transient (`retry`); any other
// answer (4xx, or a 3xx: redirects are not followed) is `fail`. The manifest's `[http] allow`
// must admit the URL: the host refuses everything else, and `fetch` then rejects with a
// network error.
//
// Build: `./build.sh` (writes dist/javascript-webhook-notifier.wasm); try it against a local
// listener on port 9000: `eventbroker run dist/javascript-webhook-notifier.wasm --manifest
// manifest.toml --event sample-event.json`
//
// `handle` is an async function: componentize-js runs the event loop until its promise
// settles, so `await fetch(…)` works inside it. A `result` error is returned by throwing it.

import { config, log } from 'resolvespec:eventbroker/host@0.1.0';

const fail = (message) => ({ tag: 'fail', val: message });
const retry = (message) => ({ tag: 'retry', val: message });

function parsePayload(text) {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

export const handler = {
  async handle(event, context) {
    const url = config('webhook_url');
    if (url === undefined) {
      throw fail('config has no "webhook_url"');
    }
    const body = JSON.stringify({
      id: event.id,
      type: event.eventType,
      source: event.source,
      payload: parsePayload(event.payload),
    });
    let response;
    try {
      response = await fetch(url, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body,
        redirect: 'manual',
      });
    } catch (error) {
      log('warn', `webhook ${url} unreachable (attempt ${context.attempt}): ${error}`);
      throw retry(`webhook unreachable: ${error}`);
    }
    const status = response.status;
    if (status >= 200 && status < 300) {
      log('info', `delivered ${event.eventType} ${event.id} to ${url}: ${status}`);
      return;
    }
    if (status >= 500) {
      log('warn', `webhook ${url} answered ${status} (attempt ${context.attempt})`);
      throw retry(`webhook answered ${status}`);
    }
    throw fail(`webhook answered ${status}`);
  },
};
