// The {{name}} handler: greets `payload.name`; a payload that is not a JSON object fails.
// WIT in JavaScript (componentize-js): names are camelCase, enums are strings, an error
// result is thrown ({ tag: 'fail', val: message }).

import { config, log } from 'resolvespec:eventbroker/host@0.1.0';

export const handler = {
  handle(event, context) {
    let payload;
    try {
      payload = JSON.parse(event.payload);
    } catch {
      payload = undefined;
    }
    if (payload === null || typeof payload !== 'object' || Array.isArray(payload)) {
      throw { tag: 'fail', val: 'payload is not a JSON object' };
    }
    const name = typeof payload.name === 'string' ? payload.name : 'stranger';
    const greeting = config('greeting') ?? 'hello';
    log('info', `${greeting}, ${name} (${event.eventType} attempt ${context.attempt})`);
  },
};

export const subscriptions = {
  // Default patterns; the manifest's `patterns` override them.
  patterns() {
    return ['example.greeting.*'];
  },
};
