// See json.h.
#include "json.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

// Nesting deeper than this is rejected rather than risking the stack.
#define MAX_DEPTH 64

typedef struct {
  const char *p;
  const char *end;
} reader;

static void skip_ws(reader *r) {
  while (r->p < r->end && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r')) r->p++;
}

static bool literal(reader *r, const char *word) {
  size_t n = strlen(word);
  if ((size_t)(r->end - r->p) < n || memcmp(r->p, word, n) != 0) return false;
  r->p += n;
  return true;
}

typedef struct {
  char *data;
  size_t len, cap;
} buffer;

static bool push(buffer *b, const char *bytes, size_t n) {
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap * 2 : 32;
    while (cap < b->len + n + 1) cap *= 2;
    char *data = realloc(b->data, cap);
    if (!data) return false;
    b->data = data;
    b->cap = cap;
  }
  memcpy(b->data + b->len, bytes, n);
  b->len += n;
  b->data[b->len] = '\0';
  return true;
}

static bool push_utf8(buffer *b, uint32_t c) {
  char out[4];
  size_t n;
  if (c < 0x80) {
    out[0] = (char)c;
    n = 1;
  } else if (c < 0x800) {
    out[0] = (char)(0xC0 | (c >> 6));
    out[1] = (char)(0x80 | (c & 0x3F));
    n = 2;
  } else if (c < 0x10000) {
    out[0] = (char)(0xE0 | (c >> 12));
    out[1] = (char)(0x80 | ((c >> 6) & 0x3F));
    out[2] = (char)(0x80 | (c & 0x3F));
    n = 3;
  } else {
    out[0] = (char)(0xF0 | (c >> 18));
    out[1] = (char)(0x80 | ((c >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((c >> 6) & 0x3F));
    out[3] = (char)(0x80 | (c & 0x3F));
    n = 4;
  }
  return push(b, out, n);
}

static bool hex4(reader *r, uint32_t *out) {
  if (r->end - r->p < 4) return false;
  uint32_t v = 0;
  for (int i = 0; i < 4; i++) {
    char c = *r->p++;
    v <<= 4;
    if (c >= '0' && c <= '9') v |= (uint32_t)(c - '0');
    else if (c >= 'a' && c <= 'f') v |= (uint32_t)(c - 'a' + 10);
    else if (c >= 'A' && c <= 'F') v |= (uint32_t)(c - 'A' + 10);
    else return false;
  }
  *out = v;
  return true;
}

// Reads a string literal; with `out` NULL it only validates. The opening quote is at r->p.
static bool read_string(reader *r, buffer *out) {
  buffer scratch = {0};
  buffer *b = out ? out : &scratch;
  r->p++;
  while (r->p < r->end) {
    unsigned char c = (unsigned char)*r->p;
    if (c == '"') {
      r->p++;
      if (!b->data && !push(b, "", 0)) return false;
      free(scratch.data);
      return true;
    }
    if (c < 0x20) break;
    if (c != '\\') {
      const char *start = r->p;
      while (r->p < r->end && *r->p != '"' && *r->p != '\\' && (unsigned char)*r->p >= 0x20) r->p++;
      if (!push(b, start, (size_t)(r->p - start))) break;
      continue;
    }
    r->p++;
    if (r->p >= r->end) break;
    char e = *r->p++;
    const char *simple = strchr("\"\\/bfnrt", e);
    if (e != '\0' && simple) {
      static const char decoded[] = "\"\\/\b\f\n\r\t";
      if (!push(b, &decoded[simple - "\"\\/bfnrt"], 1)) break;
    } else if (e == 'u') {
      uint32_t code;
      if (!hex4(r, &code)) break;
      if (code >= 0xD800 && code < 0xDC00) {
        uint32_t low;
        if (r->end - r->p < 6 || r->p[0] != '\\' || r->p[1] != 'u') break;
        r->p += 2;
        if (!hex4(r, &low) || low < 0xDC00 || low > 0xDFFF) break;
        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
      } else if (code >= 0xDC00 && code < 0xE000) {
        break;
      }
      if (!push_utf8(b, code)) break;
    } else {
      break;
    }
  }
  free(scratch.data);
  if (out) {
    free(out->data);
    out->data = NULL;
  }
  return false;
}

static bool read_number(reader *r, json_member *m) {
  const char *start = r->p;
  bool integral = true;
  if (r->p < r->end && *r->p == '-') r->p++;
  if (r->p >= r->end) return false;
  if (*r->p == '0') {
    r->p++;
  } else if (*r->p >= '1' && *r->p <= '9') {
    while (r->p < r->end && *r->p >= '0' && *r->p <= '9') r->p++;
  } else {
    return false;
  }
  if (r->p < r->end && *r->p == '.') {
    integral = false;
    r->p++;
    if (r->p >= r->end || *r->p < '0' || *r->p > '9') return false;
    while (r->p < r->end && *r->p >= '0' && *r->p <= '9') r->p++;
  }
  if (r->p < r->end && (*r->p == 'e' || *r->p == 'E')) {
    integral = false;
    r->p++;
    if (r->p < r->end && (*r->p == '+' || *r->p == '-')) r->p++;
    if (r->p >= r->end || *r->p < '0' || *r->p > '9') return false;
    while (r->p < r->end && *r->p >= '0' && *r->p <= '9') r->p++;
  }
  if (m) {
    size_t n = (size_t)(r->p - start);
    char literal_text[400];
    if (n >= sizeof literal_text) {
      // Absurdly long literals are still numbers; only their double value is kept.
      n = sizeof literal_text - 1;
      integral = false;
    }
    memcpy(literal_text, start, n);
    literal_text[n] = '\0';
    m->kind = JSON_NUMBER;
    m->number = strtod(literal_text, NULL);
    m->exact = false;
    if (integral) {
      errno = 0;
      long long v = strtoll(literal_text, NULL, 10);
      if (errno == 0) {
        m->exact = true;
        m->integer = v;
      }
    }
  }
  return true;
}

static bool skip_value(reader *r, int depth);

static bool skip_container(reader *r, int depth, char close, bool keys) {
  if (depth > MAX_DEPTH) return false;
  r->p++;
  skip_ws(r);
  if (r->p < r->end && *r->p == close) {
    r->p++;
    return true;
  }
  for (;;) {
    skip_ws(r);
    if (keys) {
      if (r->p >= r->end || *r->p != '"' || !read_string(r, NULL)) return false;
      skip_ws(r);
      if (r->p >= r->end || *r->p != ':') return false;
      r->p++;
    }
    if (!skip_value(r, depth + 1)) return false;
    skip_ws(r);
    if (r->p >= r->end) return false;
    if (*r->p == ',') {
      r->p++;
      continue;
    }
    if (*r->p == close) {
      r->p++;
      return true;
    }
    return false;
  }
}

static bool skip_value(reader *r, int depth) {
  skip_ws(r);
  if (r->p >= r->end) return false;
  switch (*r->p) {
    case '{': return skip_container(r, depth, '}', true);
    case '[': return skip_container(r, depth, ']', false);
    case '"': return read_string(r, NULL);
    case 't': return literal(r, "true");
    case 'f': return literal(r, "false");
    case 'n': return literal(r, "null");
    default: return read_number(r, NULL);
  }
}

// Reads a member's value into `m` (kind and, for strings and numbers, the value).
static bool read_member_value(reader *r, json_member *m) {
  skip_ws(r);
  if (r->p >= r->end) return false;
  switch (*r->p) {
    case '{':
      m->kind = JSON_OBJECT;
      return skip_container(r, 1, '}', true);
    case '[':
      m->kind = JSON_ARRAY;
      return skip_container(r, 1, ']', false);
    case '"': {
      buffer b = {0};
      if (!read_string(r, &b)) return false;
      m->kind = JSON_STRING;
      m->string = b.data;
      m->string_len = b.len;
      return true;
    }
    case 't':
    case 'f':
      m->kind = JSON_BOOL;
      return literal(r, *r->p == 't' ? "true" : "false");
    case 'n':
      m->kind = JSON_NULL;
      return literal(r, "null");
    default:
      return read_number(r, m);
  }
}

bool json_parse_object(const char *text, size_t len, json_object *out) {
  reader r = {text, text + len};
  out->members = NULL;
  out->len = 0;
  size_t cap = 0;
  skip_ws(&r);
  if (r.p >= r.end || *r.p != '{') return false;
  r.p++;
  skip_ws(&r);
  bool empty = r.p < r.end && *r.p == '}';
  if (empty) r.p++;
  while (!empty) {
    skip_ws(&r);
    if (out->len == cap) {
      cap = cap ? cap * 2 : 8;
      json_member *grown = realloc(out->members, cap * sizeof *grown);
      if (!grown) goto invalid;
      out->members = grown;
    }
    json_member *m = &out->members[out->len];
    memset(m, 0, sizeof *m);
    buffer key = {0};
    if (r.p >= r.end || *r.p != '"' || !read_string(&r, &key)) goto invalid;
    m->key = key.data;
    out->len++;
    skip_ws(&r);
    if (r.p >= r.end || *r.p != ':') goto invalid;
    r.p++;
    if (!read_member_value(&r, m)) goto invalid;
    skip_ws(&r);
    if (r.p >= r.end) goto invalid;
    if (*r.p == ',') {
      r.p++;
      continue;
    }
    if (*r.p != '}') goto invalid;
    r.p++;
    break;
  }
  skip_ws(&r);
  if (r.p == r.end) return true;
invalid:
  json_object_free(out);
  return false;
}

const json_member *json_get(const json_object *object, const char *key) {
  size_t key_len = strlen(key);
  for (size_t i = object->len; i > 0; i--) {
    const json_member *m = &object->members[i - 1];
    if (strlen(m->key) == key_len && memcmp(m->key, key, key_len) == 0) return m;
  }
  return NULL;
}

void json_object_free(json_object *object) {
  for (size_t i = 0; i < object->len; i++) {
    free(object->members[i].key);
    free(object->members[i].string);
  }
  free(object->members);
  object->members = NULL;
  object->len = 0;
}

bool json_append_string(char **data, size_t *len, const char *s, size_t s_len) {
  buffer b = {*data, *len, *data ? *len + 1 : 0};
  bool ok = push(&b, "\"", 1);
  for (size_t i = 0; ok && i < s_len; i++) {
    unsigned char c = (unsigned char)s[i];
    char escaped[8];
    if (c == '"' || c == '\\') {
      escaped[0] = '\\';
      escaped[1] = (char)c;
      ok = push(&b, escaped, 2);
    } else if (c < 0x20) {
      static const char hex[] = "0123456789abcdef";
      memcpy(escaped, "\\u00", 4);
      escaped[4] = hex[c >> 4];
      escaped[5] = hex[c & 0xF];
      ok = push(&b, escaped, 6);
    } else {
      ok = push(&b, (const char *)&s[i], 1);
    }
  }
  ok = ok && push(&b, "\"", 1);
  *data = b.data;
  *len = b.len;
  return ok;
}
