// The {{name}} handler: greets `payload.name`; a payload that is not a JSON object fails.
// The bindings (gen/event_handler.{h,c}) come from `wit-bindgen c` (see build.sh); json.{c,h}
// is a small JSON object reader. Ownership: an exported function frees its arguments; strings
// it returns must be malloc'd; strings an import returns are malloc'd for the caller; strings
// passed to an import are borrowed.

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "event_handler.h"
#include "json.h"

typedef event_handler_string_t string_t;

// A malloc'd copy of the config value `key`, or of `fallback` when it is not set.
static char *config_or(const char *key, const char *fallback) {
  string_t name, value;
  event_handler_string_set(&name, key);
  if (!resolvespec_eventbroker_host_config(&name, &value)) return strdup(fallback);
  char *text = strndup((const char *)value.ptr, value.len);
  event_handler_string_free(&value);
  return text;
}

bool exports_resolvespec_eventbroker_handler_handle(exports_resolvespec_eventbroker_handler_event_t *event,
                                                    exports_resolvespec_eventbroker_handler_context_t *context,
                                                    exports_resolvespec_eventbroker_handler_handler_error_t *err) {
  bool ok = true;
  json_object payload;
  if (!json_parse_object((const char *)event->payload.ptr, event->payload.len, &payload)) {
    err->tag = RESOLVESPEC_EVENTBROKER_TYPES_HANDLER_ERROR_FAIL;
    event_handler_string_dup(&err->val.fail, "payload is not a JSON object");
    ok = false;
  } else {
    const json_member *member = json_get(&payload, "name");
    const char *name = member && member->kind == JSON_STRING ? member->string : "stranger";
    char *greeting = config_or("greeting", "hello");
    if (!greeting) abort();  // out of memory: trap, the host records it
    const char *format = "%s, %s (%.*s attempt %u)";
    int type_len = (int)event->event_type.len;
    const char *type = (const char *)event->event_type.ptr;
    int n = snprintf(NULL, 0, format, greeting, name, type_len, type, (unsigned)context->attempt);
    char *line = malloc((size_t)n + 1);
    if (!line) abort();
    snprintf(line, (size_t)n + 1, format, greeting, name, type_len, type, (unsigned)context->attempt);
    string_t text = {(uint8_t *)line, strlen(line)};
    resolvespec_eventbroker_host_log(RESOLVESPEC_EVENTBROKER_TYPES_LOG_LEVEL_INFO, &text);
    free(line);
    free(greeting);
    json_object_free(&payload);
  }
  exports_resolvespec_eventbroker_handler_event_free(event);
  exports_resolvespec_eventbroker_handler_context_free(context);
  return ok;
}

// Default patterns; the manifest's `patterns` override them.
void exports_resolvespec_eventbroker_subscriptions_patterns(event_handler_list_string_t *ret) {
  ret->len = 1;
  ret->ptr = malloc(sizeof(string_t));
  if (!ret->ptr) abort();
  event_handler_string_dup(&ret->ptr[0], "example.greeting.*");
}
