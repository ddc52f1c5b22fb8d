// A small JSON reader: enough to validate a payload and read the members of its top-level
// object, with no dependency beyond the C library. Strings are decoded to UTF-8 (escapes and
// surrogate pairs included); numbers keep both their double value and, when written without
// fraction or exponent and within int64, their exact integer value.
#ifndef PAYLOAD_VALIDATOR_JSON_H
#define PAYLOAD_VALIDATOR_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } json_kind;

// A member of the top-level object. Nested arrays and objects are validated and skipped:
// only their kind is kept.
typedef struct {
  char *key;
  json_kind kind;
  char *string;       // JSON_STRING: decoded UTF-8, NUL-terminated (may contain NULs: see len)
  size_t string_len;  // JSON_STRING: length in bytes
  double number;      // JSON_NUMBER
  bool exact;         // JSON_NUMBER: `integer` holds the literal exactly
  int64_t integer;    // JSON_NUMBER, when `exact`
} json_member;

typedef struct {
  json_member *members;
  size_t len;
} json_object;

// Parses `text` (`len` bytes), which must be exactly one JSON object (surrounding whitespace
// allowed). Returns false if it is not valid JSON or not an object.
bool json_parse_object(const char *text, size_t len, json_object *out);

// The member named `key` (the last one, if repeated), or NULL.
const json_member *json_get(const json_object *object, const char *key);

void json_object_free(json_object *object);

// Appends `s` as a JSON string literal (quotes and escapes included) to a malloc'd buffer.
// Returns false when out of memory.
bool json_append_string(char **buffer, size_t *len, const char *s, size_t s_len);

#endif
