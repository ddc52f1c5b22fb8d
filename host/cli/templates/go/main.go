// The {{name}} handler: greets `payload.name`; a payload that is not a JSON object fails.
// eventbroker/ is the canonical-ABI glue for the WIT contract (types, Log, Publish, Config).
package main

import (
	"encoding/json"
	"fmt"

	"{{module}}/eventbroker"
)

type handler struct{}

func init() { eventbroker.Register(handler{}) }

// main is not called: the component is a reactor whose exports the host calls.
func main() {}

// Patterns are the defaults; the manifest's `patterns` override them.
func (handler) Patterns() []string { return []string{"example.greeting.*"} }

func (handler) Handle(event eventbroker.Event, context eventbroker.Context) error {
	var payload map[string]any
	if err := json.Unmarshal([]byte(event.Payload), &payload); err != nil || payload == nil {
		return eventbroker.Fail("payload is not a JSON object")
	}
	name, ok := payload["name"].(string)
	if !ok {
		name = "stranger"
	}
	greeting, ok := eventbroker.Config("greeting")
	if !ok {
		greeting = "hello"
	}
	eventbroker.Log(eventbroker.LevelInfo, fmt.Sprintf("%s, %s (%s attempt %d)", greeting, name, event.EventType, context.Attempt))
	return nil
}
