// Payload validator in Go: the same behaviour as guests/rust-payload-validator.
//
// Validates an order line (`sku` a non-empty string, `quantity` an integral number in
// 1..=max_quantity, config `max_quantity`, default 1000) and publishes a derived
// `shop.orders.validated` event for each valid one. Bad input fails for good (Fail);
// `"simulate": "transient"` stands for a briefly unreachable dependency (Retry).
//
// Build: `./build.sh` (writes dist/go-payload-validator.wasm); try it:
// `eventbroker run dist/go-payload-validator.wasm --event sample-events.jsonl --manifest manifest.toml`
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"

	"example.com/go-payload-validator/eventbroker"
)

const defaultMaxQuantity = 1000

// The largest integral float64 that converts to int64 exactly (2^53).
const maxExactInteger = 1 << 53

type payloadValidator struct{}

func init() { eventbroker.Register(payloadValidator{}) }

// main is not called: the component is a reactor whose exports the host calls.
func main() {}

func (payloadValidator) Patterns() []string {
	return []string{"shop.orders.create", "shop.orders.update"}
}

func (payloadValidator) Handle(event eventbroker.Event, context eventbroker.Context) error {
	payload, ok := parseObject(event.Payload)
	if !ok {
		return eventbroker.Fail("payload is not a JSON object")
	}
	if payload["simulate"] == "transient" {
		eventbroker.Log(eventbroker.LevelWarn, fmt.Sprintf("inventory service unavailable (attempt %d)", context.Attempt))
		return eventbroker.Retry("inventory service unavailable")
	}
	limit := maxQuantity()
	sku, _ := payload["sku"].(string)
	if sku == "" {
		return eventbroker.Fail(`"sku" is missing or empty`)
	}
	quantity, ok := integer(payload["quantity"])
	if !ok {
		return eventbroker.Fail(`"quantity" is missing or not an integer`)
	}
	if quantity < 1 || quantity > limit {
		return eventbroker.Fail(fmt.Sprintf(`"quantity" %d is outside 1..=%d`, quantity, limit))
	}
	eventbroker.Log(eventbroker.LevelInfo, fmt.Sprintf("order line %s x%d is valid", sku, quantity))
	derived, err := json.Marshal(struct {
		Sku      string `json:"sku"`
		Quantity int64  `json:"quantity"`
	}{sku, quantity})
	if err != nil {
		return eventbroker.Fail(fmt.Sprintf("cannot encode the derived event: %v", err))
	}
	source := eventbroker.SourceInternal
	text := string(derived)
	id, err := eventbroker.Publish(eventbroker.EventDraft{
		EventType: "shop.orders.validated",
		Source:    &source,
		Payload:   &text,
		UserID:    event.UserID,
	})
	if err != nil {
		// A refused publish (budget used up, broker stopping) is transient: retry later.
		return eventbroker.Retry("could not publish shop.orders.validated: " + err.Error())
	}
	eventbroker.Log(eventbroker.LevelInfo, "published shop.orders.validated "+id)
	return nil
}

// parseObject decodes text that must be exactly one JSON object, keeping numbers as text.
func parseObject(text string) (map[string]any, bool) {
	decoder := json.NewDecoder(bytes.NewReader([]byte(text)))
	decoder.UseNumber()
	var object map[string]any
	if err := decoder.Decode(&object); err != nil || object == nil {
		return nil, false
	}
	if _, err := decoder.Token(); err != io.EOF {
		return nil, false
	}
	return object, true
}

// integer reads a JSON number with an integral value (`2` and `2.0` alike), as every
// language reads it.
func integer(value any) (int64, bool) {
	number, ok := value.(json.Number)
	if !ok {
		return 0, false
	}
	if n, err := strconv.ParseInt(string(number), 10, 64); err == nil {
		return n, true
	}
	f, err := strconv.ParseFloat(string(number), 64)
	if err != nil || f != math.Trunc(f) || math.Abs(f) > maxExactInteger {
		return 0, false
	}
	return int64(f), true
}

// maxQuantity is config `max_quantity` when it is an integer, else the default.
func maxQuantity() int64 {
	text, ok := eventbroker.Config("max_quantity")
	if ok && isIntegerText(text) {
		if n, err := strconv.ParseInt(text, 10, 64); err == nil {
			return n
		}
	}
	return defaultMaxQuantity
}

// isIntegerText accepts an optional sign and decimal digits, nothing else (no spaces or `_`).
func isIntegerText(text string) bool {
	digits := strings.TrimPrefix(strings.TrimPrefix(text, "+"), "-")
	if digits == "" || len(text)-len(digits) > 1 {
		return false
	}
	for _, c := range digits {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}
