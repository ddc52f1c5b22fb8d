// Payload validator in JavaScript: the same behaviour as guests/rust-payload-validator.
//
// Validates an order line (`sku` a non-empty string, `quantity` an integral number in
// 1..=max_quantity, config `max_quantity`, default 1000) and publishes a derived
// `shop.orders.validated` event for each valid one. Bad input fails for good (`fail`);
// `"simulate": "transient"` stands for a briefly unreachable dependency (`retry`).
//
// Build: `./build.sh` (writes dist/javascript-payload-validator.wasm); try it:
// `eventbroker run dist/javascript-payload-validator.wasm --event sample-events.jsonl --manifest manifest.toml`
//
// How WIT maps to JavaScript here (componentize-js): interfaces are modules and exported
// objects, names are camelCase, enums and variant tags are strings, `option<T>` is the value
// or `undefined`, `s64` is a BigInt, and a `result` error is returned by throwing it (an
// imported function that returns an error throws an object whose `payload` is the error).

import { config, log, publish } from 'resolvespec:eventbroker/host@0.1.0';

const DEFAULT_MAX_QUANTITY = 1000n;
const INTEGER_TEXT = /^[+-]?[0-9]+$/;
const I64_MIN = -(2n ** 63n);
const I64_MAX = 2n ** 63n - 1n;

const fail = (message) => ({ tag: 'fail', val: message });
const retry = (message) => ({ tag: 'retry', val: message });

// A JSON number with an integral value (`2` and `2.0` alike), as every language reads it.
// JSON numbers are doubles here, so integers beyond 2^53 are not exact (they are out of
// range for any sensible `max_quantity` anyway).
function integer(value) {
  if (typeof value !== 'number' || !Number.isInteger(value) || Math.abs(value) > 2 ** 53) {
    return undefined;
  }
  return BigInt(value);
}

function maxQuantity() {
  const text = config('max_quantity');
  if (text !== undefined && INTEGER_TEXT.test(text)) {
    const value = BigInt(text);
    if (value >= I64_MIN && value <= I64_MAX) {
      return value;
    }
  }
  return DEFAULT_MAX_QUANTITY;
}

function parseObject(text) {
  try {
    const value = JSON.parse(text);
    return value !== null && typeof value === 'object' && !Array.isArray(value) ? value : undefined;
  } catch {
    return undefined;
  }
}

export const handler = {
  handle(event, context) {
    const payload = parseObject(event.payload);
    if (payload === undefined) {
      throw fail('payload is not a JSON object');
    }
    if (payload.simulate === 'transient') {
      log('warn', `inventory service unavailable (attempt ${context.attempt})`);
      throw retry('inventory service unavailable');
    }
    const limit = maxQuantity();
    const sku = payload.sku;
    if (typeof sku !== 'string' || sku === '') {
      throw fail('"sku" is missing or empty');
    }
    const quantity = integer(payload.quantity);
    if (quantity === undefined) {
      throw fail('"quantity" is missing or not an integer');
    }
    if (quantity < 1n || quantity > limit) {
      throw fail(`"quantity" ${quantity} is outside 1..=${limit}`);
    }
    log('info', `order line ${sku} x${quantity} is valid`);
    let id;
    try {
      id = publish({
        eventType: 'shop.orders.validated',
        source: 'internal',
        payload: JSON.stringify({ sku, quantity: Number(quantity) }),
        userId: event.userId,
      });
    } catch (refused) {
      // A refused publish (budget used up, broker stopping) is transient: retry later.
      throw retry(`could not publish shop.orders.validated: ${refused.payload ?? refused}`);
    }
    log('info', `published shop.orders.validated ${id}`);
  },
};

export const subscriptions = {
  patterns() {
    return ['shop.orders.create', 'shop.orders.update'];
  },
};
