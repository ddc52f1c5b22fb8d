// Package eventbroker is the Go side of the eventbroker WIT contract
// (wit/eventbroker.wit, package resolvespec:eventbroker@0.1.0, world event-handler): the
// types, the host imports (Log, Publish, Config) and the registration of the handler whose
// Handle and Patterns the component exports.
//
// It is hand-written canonical-ABI glue for standard Go (GOOS=wasip1, -buildmode=c-shared,
// //go:wasmimport and //go:wasmexport), because the bindings that `wit-bindgen go` generates
// need a runtime module that this machine's registries do not serve. The glue is small:
// abi.go lifts and lowers the few records of the contract at the offsets the canonical ABI
// gives them on wasm32 (written out there, checked by abi_test.go), and wasm.go declares the
// imports and exports. A change to the WIT file needs a matching change here.
package eventbroker

import "errors"

// Source says where an event came from (WIT enum `source`).
type Source uint8

const (
	SourceDatabase Source = iota
	SourceWebsocket
	SourceFrontend
	SourceSystem
	SourceInternal
)

// Status is the processing state of an event (WIT enum `status`).
type Status uint8

const (
	StatusPending Status = iota
	StatusProcessing
	StatusCompleted
	StatusFailed
)

// LogLevel is the severity of a log line (WIT enum `log-level`).
type LogLevel uint8

const (
	LevelTrace LogLevel = iota
	LevelDebug
	LevelInfo
	LevelWarn
	LevelError
)

// Event is an event with every field the host keeps (WIT record `event`). Optional fields
// are nil when absent.
type Event struct {
	ID          string
	Source      Source
	EventType   string
	Status      Status
	Payload     string // JSON text
	UserID      *int64
	SessionID   string
	InstanceID  string
	Schema      string
	Entity      string
	Operation   string
	CreatedAt   string // RFC 3339
	ProcessedAt *string
	CompletedAt *string
	Error       *string
	Metadata    string // JSON object text
	RetryCount  uint32
}

// Context tells about this invocation (WIT record `context`).
type Context struct {
	Attempt    uint32 // 1 for the first attempt, 2 for the first retry, …
	Handler    string
	Version    string
	DeadlineMs uint64 // when the host stops this invocation, in ms since the Unix epoch
}

// EventDraft is a derived event to publish (WIT record `event-draft`). Only EventType is
// required; nil fields take the host's defaults (source internal, payload {}).
type EventDraft struct {
	EventType string
	Source    *Source
	Payload   *string
	UserID    *int64
	SessionID *string
	Schema    *string
	Entity    *string
	Operation *string
	Metadata  *string
}

// ErrorKind tells the host what to do about a failed event (the cases of WIT variant
// `handler-error`).
type ErrorKind uint8

const (
	// KindRetry is a transient problem: retry later, with backoff, within the retry budget.
	KindRetry ErrorKind = iota
	// KindFail means the event can never succeed: it becomes a dead letter.
	KindFail
)

// HandlerError is the error a handler returns to choose between retry and fail.
type HandlerError struct {
	Kind    ErrorKind
	Message string
}

func (e *HandlerError) Error() string { return e.Message }

// Retry returns an error that makes the host retry the event.
func Retry(message string) error { return &HandlerError{Kind: KindRetry, Message: message} }

// Fail returns an error that makes the event a dead letter without retries.
func Fail(message string) error { return &HandlerError{Kind: KindFail, Message: message} }

// Handler is what a Go handler implements.
type Handler interface {
	// Handle handles one event. A nil error means success; a *HandlerError (see Retry and
	// Fail) chooses retry or fail; any other error counts as Fail with its message.
	Handle(event Event, context Context) error
	// Patterns are the default subscription patterns, e.g. "shop.orders.*".
	Patterns() []string
}

var registered Handler

// Register sets the handler that the component's exports call. Call it from an init
// function of package main.
func Register(handler Handler) { registered = handler }

// asHandlerError maps a handler's error to the WIT variant's kind and message.
func asHandlerError(err error) (ErrorKind, string) {
	var handlerError *HandlerError
	if errors.As(err, &handlerError) {
		return handlerError.Kind, handlerError.Message
	}
	return KindFail, err.Error()
}

// PublishError is why the host refused a derived event.
type PublishError struct{ Reason string }

func (e *PublishError) Error() string { return e.Reason }

func publishError(reason string) error { return &PublishError{Reason: reason} }
