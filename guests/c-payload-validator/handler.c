// Payload validator in C: the same behaviour as guests/rust-payload-validator.
//
// Validates an order line (`sku` a non-empty string, `quantity` an integral number in
// 1..=max_quantity, config `max_quantity`, default 1000) and publishes a derived
// `shop.orders.validated` event for each valid one. Bad input fails for good (`fail`);
// `"simulate": "transient"` stands for a briefly unreachable dependency (`retry`).
//
// Build: `./build.sh` (writes dist/c-payload-validator.wasm); try it:
// `eventbroker run dist/c-payload-validator.wasm --event sample-events.jsonl --manifest manifest.toml`
//
// The bindings (gen/event_handler.{h,c}) come from `wit-bindgen c`. Their ownership rules:
// an exported function owns its arguments and frees them (`..._free`); strings it returns
// (error messages, patterns) must be malloc'd, and the bindings free them after the host has
// copied them; strings that an import returns (publish's id, config's value) are malloc'd
// for the caller, who frees them; strings passed to an import are only borrowed.

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "event_handler.h"
#include "json.h"

#define DEFAULT_MAX_QUANTITY 1000
// The largest integral double that converts to int64 exactly (2^53).
#define MAX_EXACT_INTEGER 9007199254740992.0

typedef event_handler_string_t string_t;
typedef resolvespec_eventbroker_types_handler_error_t handler_error_t;

// A malloc'd string formatted like printf (NULL when out of memory).
static char *format(const char *fmt, ...) {
  va_list args;
  va_start(args, fmt);
  int n = vsnprintf(NULL, 0, fmt, args);
  va_end(args);
  if (n < 0) return NULL;
  char *text = malloc((size_t)n + 1);
  if (!text) return NULL;
  va_start(args, fmt);
  vsnprintf(text, (size_t)n + 1, fmt, args);
  va_end(args);
  return text;
}

static void log_line(resolvespec_eventbroker_host_log_level_t level, char *message) {
  if (!message) return;
  string_t text = {(uint8_t *)message, strlen(message)};
  resolvespec_eventbroker_host_log(level, &text);
  free(message);
}

// Fills `err` with a `retry` or `fail` error that takes ownership of `message`; returns false
// (the handler's "error" result) so that callers can write `return fail(err, ...)`.
static bool error(handler_error_t *err, uint8_t tag, char *message) {
  if (!message) abort();  // out of memory: trap, the host records it
  err->tag = tag;
  string_t text = {(uint8_t *)message, strlen(message)};
  if (tag == RESOLVESPEC_EVENTBROKER_TYPES_HANDLER_ERROR_RETRY) {
    err->val.retry = text;
  } else {
    err->val.fail = text;
  }
  return false;
}

static bool fail(handler_error_t *err, char *message) {
  return error(err, RESOLVESPEC_EVENTBROKER_TYPES_HANDLER_ERROR_FAIL, message);
}

static bool retry(handler_error_t *err, char *message) {
  return error(err, RESOLVESPEC_EVENTBROKER_TYPES_HANDLER_ERROR_RETRY, message);
}

// `max_quantity` from the manifest's [config], when it is an integer ([+-]digits, in int64).
static long long max_quantity(void) {
  string_t key;
  event_handler_string_set(&key, "max_quantity");
  string_t value;
  long long result = DEFAULT_MAX_QUANTITY;
  if (!resolvespec_eventbroker_host_config(&key, &value)) return result;
  char *text = strndup((const char *)value.ptr, value.len);
  event_handler_string_free(&value);
  if (!text) abort();
  const char *digits = text[0] == '+' || text[0] == '-' ? text + 1 : text;
  bool integer = digits[0] != '\0' && strspn(digits, "0123456789") == strlen(digits);
  if (integer) {
    errno = 0;
    long long parsed = strtoll(text, NULL, 10);
    if (errno == 0) result = parsed;
  }
  free(text);
  return result;
}

// A JSON number with an integral value (`2` and `2.0` alike), as every language reads it.
static bool integer(const json_member *m, long long *out) {
  if (!m || m->kind != JSON_NUMBER) return false;
  if (m->exact) {
    *out = m->integer;
    return true;
  }
  if (m->number != trunc(m->number) || fabs(m->number) > MAX_EXACT_INTEGER) return false;
  *out = (long long)m->number;
  return true;
}

static bool is_string(const json_member *m, const char *value) {
  return m && m->kind == JSON_STRING && m->string_len == strlen(value) &&
         memcmp(m->string, value, m->string_len) == 0;
}

static bool validate(const resolvespec_eventbroker_types_event_t *event,
                     const resolvespec_eventbroker_types_context_t *context, handler_error_t *err) {
  json_object payload;
  if (!json_parse_object((const char *)event->payload.ptr, event->payload.len, &payload)) {
    return fail(err, strdup("payload is not a JSON object"));
  }
  bool ok = false;
  if (is_string(json_get(&payload, "simulate"), "transient")) {
    log_line(RESOLVESPEC_EVENTBROKER_TYPES_LOG_LEVEL_WARN,
             format("inventory service unavailable (attempt %u)", (unsigned)context->attempt));
    retry(err, strdup("inventory service unavailable"));
    goto done;
  }
  long long limit = max_quantity();
  const json_member *sku = json_get(&payload, "sku");
  if (!sku || sku->kind != JSON_STRING || sku->string_len == 0) {
    fail(err, strdup("\"sku\" is missing or empty"));
    goto done;
  }
  long long quantity;
  if (!integer(json_get(&payload, "quantity"), &quantity)) {
    fail(err, strdup("\"quantity\" is missing or not an integer"));
    goto done;
  }
  if (quantity < 1 || quantity > limit) {
    fail(err, format("\"quantity\" %lld is outside 1..=%lld", quantity, limit));
    goto done;
  }
  int sku_len = (int)sku->string_len;
  log_line(RESOLVESPEC_EVENTBROKER_TYPES_LOG_LEVEL_INFO,
           format("order line %.*s x%lld is valid", sku_len, sku->string, quantity));

  // {"sku": SKU, "quantity": Q}
  char *json = strdup("{\"sku\":");
  size_t json_len = json ? strlen(json) : 0;
  char *tail = format(",\"quantity\":%lld}", quantity);
  if (!json || !tail || !json_append_string(&json, &json_len, sku->string, sku->string_len)) abort();
  char *payload_text = format("%s%s", json, tail);
  free(json);
  free(tail);
  if (!payload_text) abort();

  resolvespec_eventbroker_types_event_draft_t draft = {0};
  event_handler_string_set(&draft.event_type, "shop.orders.validated");
  draft.source.is_some = true;
  draft.source.val = RESOLVESPEC_EVENTBROKER_TYPES_SOURCE_INTERNAL;
  draft.payload.is_some = true;
  event_handler_string_set(&draft.payload.val, payload_text);
  draft.user_id = event->user_id;
  string_t id, refused;
  bool published = resolvespec_eventbroker_host_publish(&draft, &id, &refused);
  free(payload_text);
  if (!published) {
    // A refused publish (budget used up, broker stopping) is transient: retry later.
    retry(err, format("could not publish shop.orders.validated: %.*s", (int)refused.len,
                      (const char *)refused.ptr));
    event_handler_string_free(&refused);
    goto done;
  }
  log_line(RESOLVESPEC_EVENTBROKER_TYPES_LOG_LEVEL_INFO,
           format("published shop.orders.validated %.*s", (int)id.len, (const char *)id.ptr));
  event_handler_string_free(&id);
  ok = true;
done:
  json_object_free(&payload);
  return ok;
}

bool exports_resolvespec_eventbroker_handler_handle(exports_resolvespec_eventbroker_handler_event_t *event,
                                                    exports_resolvespec_eventbroker_handler_context_t *context,
                                                    exports_resolvespec_eventbroker_handler_handler_error_t *err) {
  bool ok = validate(event, context, err);
  exports_resolvespec_eventbroker_handler_event_free(event);
  exports_resolvespec_eventbroker_handler_context_free(context);
  return ok;
}

// Not `shop.orders.*`: that would also match the derived `shop.orders.validated` events.
void exports_resolvespec_eventbroker_subscriptions_patterns(event_handler_list_string_t *ret) {
  static const char *const patterns[] = {"shop.orders.create", "shop.orders.update"};
  ret->len = sizeof patterns / sizeof patterns[0];
  ret->ptr = malloc(ret->len * sizeof(string_t));
  if (!ret->ptr) abort();
  for (size_t i = 0; i < ret->len; i++) event_handler_string_dup(&ret->ptr[i], patterns[i]);
}
