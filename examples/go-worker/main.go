// Command go-worker is a Terranoha worker written in Go, from the task protocol in the
// README alone: it consumes task commands from <prefix>.tasks.<queue>, runs its tool and
// writes a CompleteTask or FailTask command to <prefix>.run-inputs.
//
// It uses franz-go for Kafka and hamba/avro for Avro. The schemas and their ids are read
// from the repository's schemas/ folder (catalogue.json), never written into the code.
//
// Delivery is at least once, as with the Python SDK: a task's offset is committed only
// after its result has been acknowledged by the broker, so a crash redelivers the task.
// The tool here has no side effect, so running it twice is harmless; a tool that writes
// somewhere passes the task's idempotency_key to that system.
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/hamba/avro/v2"
	"github.com/twmb/franz-go/pkg/kgo"
)

// TaskCommand is schemas/outbox/TaskCommand.v1.avsc.
type TaskCommand struct {
	Queue          string `avro:"queue"`
	TaskID         string `avro:"task_id"`
	RunID          string `avro:"run_id"`
	Step           string `avro:"step"`
	Phase          string `avro:"phase"`
	Attempt        int64  `avro:"attempt"`
	IdempotencyKey string `avro:"idempotency_key"`
	Input          string `avro:"input"`
	Deadline       int64  `avro:"deadline"`
	Tenant         string `avro:"tenant"`
	CorrelationID  string `avro:"correlation_id"`
	Workflow       string `avro:"workflow"`
}

// CompleteTask is schemas/commands/CompleteTask.v1.avsc.
type CompleteTask struct {
	CommandID     string   `avro:"command_id"`
	RunID         string   `avro:"run_id"`
	Tenant        string   `avro:"tenant"`
	CorrelationID string   `avro:"correlation_id"`
	Step          string   `avro:"step"`
	TaskID        string   `avro:"task_id"`
	Result        string   `avro:"result"`
	Cost          float64  `avro:"cost"`
	Confidence    *float64 `avro:"confidence"`
}

// FailTask is schemas/commands/FailTask.v1.avsc.
type FailTask struct {
	CommandID     string  `avro:"command_id"`
	RunID         string  `avro:"run_id"`
	Tenant        string  `avro:"tenant"`
	CorrelationID string  `avro:"correlation_id"`
	Step          string  `avro:"step"`
	TaskID        string  `avro:"task_id"`
	ErrorClass    string  `avro:"error_class"`
	Code          string  `avro:"code"`
	Message       string  `avro:"message"`
	Field         *string `avro:"field"`
	Cost          float64 `avro:"cost"`
}

// schemaRef is one Avro schema with its id from schemas/catalogue.json.
type schemaRef struct {
	id     uint32
	schema avro.Schema
}

// loadSchema finds file (e.g. "outbox/TaskCommand.v1.avsc") in the catalogue and parses it.
func loadSchema(dir, file string) (schemaRef, error) {
	raw, err := os.ReadFile(filepath.Join(dir, "catalogue.json"))
	if err != nil {
		return schemaRef{}, err
	}
	var catalogue struct {
		Schemas []struct {
			ID   uint32 `json:"id"`
			File string `json:"file"`
		} `json:"schemas"`
	}
	if err := json.Unmarshal(raw, &catalogue); err != nil {
		return schemaRef{}, fmt.Errorf("%s/catalogue.json: %w", dir, err)
	}
	for _, entry := range catalogue.Schemas {
		if entry.File == file {
			text, err := os.ReadFile(filepath.Join(dir, file))
			if err != nil {
				return schemaRef{}, err
			}
			schema, err := avro.Parse(string(text))
			if err != nil {
				return schemaRef{}, fmt.Errorf("%s: %w", file, err)
			}
			return schemaRef{entry.ID, schema}, nil
		}
	}
	return schemaRef{}, fmt.Errorf("%s is not in %s/catalogue.json", file, dir)
}

// encode frames an Avro body the Confluent way: magic byte 0, the 4-byte big-endian
// schema id, then the Avro binary encoding.
func (s schemaRef) encode(value any) ([]byte, error) {
	body, err := avro.Marshal(s.schema, value)
	if err != nil {
		return nil, err
	}
	out := make([]byte, 5, 5+len(body))
	binary.BigEndian.PutUint32(out[1:], s.id)
	return append(out, body...), nil
}

func (s schemaRef) decode(data []byte, into any) error {
	if len(data) < 5 || data[0] != 0 {
		return errors.New("not a Terranoha record (no magic byte 0)")
	}
	if id := binary.BigEndian.Uint32(data[1:5]); id != s.id {
		return fmt.Errorf("schema id %d is not a TaskCommand (%d)", id, s.id)
	}
	return avro.Unmarshal(s.schema, data[5:], into)
}

// toolError is a failure of a given class: transient, permanent or business.
type toolError struct {
	class, code, message, field string
}

func (e *toolError) Error() string { return e.code + ": " + e.message }

// countWords is the tool of queue text.count: {"text": "..."} in,
// {"words": N, "upper": "..."} out. An empty text is a business error the spec can
// route; a missing text is a permanent error naming the field.
func countWords(_ context.Context, task TaskCommand) (any, error) {
	var input struct {
		Text *string `json:"text"`
	}
	if err := json.Unmarshal([]byte(task.Input), &input); err != nil || input.Text == nil {
		return nil, &toolError{"permanent", "BAD_INPUT", "text.count needs {\"text\": string}", "text"}
	}
	words := strings.Fields(*input.Text)
	if len(words) == 0 {
		return nil, &toolError{"business", "EMPTY_TEXT", "there is nothing to count", "text"}
	}
	return map[string]any{"words": len(words), "upper": strings.ToUpper(*input.Text)}, nil
}

type worker struct {
	client   *kgo.Client
	inputs   string
	task     schemaRef
	complete schemaRef
	fail     schemaRef
	tools    map[string]func(context.Context, TaskCommand) (any, error)
}

// report runs the tool for one task and returns the encoded result command, or nil when
// the task is to be dropped (not a task, or past its deadline: the engine's timeout has
// already decided what happens next).
func (w *worker) report(ctx context.Context, record *kgo.Record) (*kgo.Record, error) {
	var task TaskCommand
	if err := w.task.decode(record.Value, &task); err != nil {
		log.Printf("skipping %s/%d/%d: %v", record.Topic, record.Partition, record.Offset, err)
		return nil, nil
	}
	deadline := time.UnixMilli(task.Deadline)
	if !time.Now().Before(deadline) {
		log.Printf("task %s is past its deadline; dropped", task.TaskID)
		return nil, nil
	}
	base := struct{ id, run, tenant, corr, step, task string }{
		"result:" + task.TaskID, task.RunID, task.Tenant, task.CorrelationID, task.Step, task.TaskID,
	}
	var value []byte
	var err error
	tool := w.tools[task.Queue]
	result, toolErr := any(nil), error(&toolError{"permanent", "UNKNOWN_TOOL",
		"no tool for queue " + task.Queue, ""})
	if tool != nil {
		toolCtx, cancel := context.WithDeadline(ctx, deadline)
		result, toolErr = tool(toolCtx, task)
		cancel()
	}
	var failure *toolError
	if toolErr != nil && !errors.As(toolErr, &failure) {
		failure = &toolError{"transient", "UNEXPECTED_ERROR", toolErr.Error(), ""}
	}
	if failure != nil {
		var field *string
		if failure.field != "" {
			field = &failure.field
		}
		value, err = w.fail.encode(FailTask{base.id, base.run, base.tenant, base.corr, base.step,
			base.task, failure.class, failure.code, failure.message, field, 0})
	} else {
		text, jsonErr := json.Marshal(result)
		if jsonErr != nil {
			return nil, jsonErr
		}
		value, err = w.complete.encode(CompleteTask{base.id, base.run, base.tenant, base.corr,
			base.step, base.task, string(text), 0, nil})
	}
	if err != nil {
		return nil, err
	}
	correlation := task.CorrelationID
	if correlation == "" {
		correlation = task.RunID
	}
	headers := []kgo.RecordHeader{
		{Key: "correlation_id", Value: []byte(correlation)},
		{Key: "causation_id", Value: []byte(base.id)},
		{Key: "tenant", Value: []byte(task.Tenant)},
	}
	for _, h := range record.Headers { // keep the run's trace
		if h.Key == "traceparent" {
			headers = append(headers, h)
		}
	}
	// Keyed by run id: the producer's partitioner (murmur2, as Kafka's) puts the result
	// on its run's partition of the run inputs.
	return &kgo.Record{Topic: w.inputs, Key: []byte(task.RunID), Value: value, Headers: headers}, nil
}

// deliver sends a result command until the broker acknowledges it; false when ctx ends
// first. A result delivered twice is harmless: the engine ignores a result it has.
func (w *worker) deliver(ctx context.Context, out *kgo.Record) bool {
	for backoff := 100 * time.Millisecond; ; backoff = min(2*backoff, 5*time.Second) {
		err := w.client.ProduceSync(ctx, out).FirstErr()
		if err == nil {
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		log.Printf("result delivery failed (%v); retrying in %s", err, backoff)
		time.Sleep(backoff)
	}
}

// run polls tasks until ctx is cancelled. Each poll's results are produced and
// acknowledged before the poll's offsets are committed.
func (w *worker) run(ctx context.Context) {
	// Polling blocks rebalances until AllowRebalance; leaving the group on Close needs one.
	defer w.client.AllowRebalance()
	for {
		fetches := w.client.PollFetches(ctx)
		if ctx.Err() != nil {
			return
		}
		fetches.EachError(func(topic string, partition int32, err error) {
			log.Printf("fetch %s/%d: %v", topic, partition, err)
		})
		var done []*kgo.Record
		fetches.EachRecord(func(record *kgo.Record) {
			if ctx.Err() != nil {
				return
			}
			out, err := w.report(ctx, record)
			if err != nil {
				log.Printf("task at %s/%d/%d: %v; left to the step's timeout", record.Topic,
					record.Partition, record.Offset, err)
			} else if out != nil && !w.deliver(ctx, out) {
				return // not acknowledged: not committed, so delivered again
			}
			done = append(done, record)
		})
		if len(done) > 0 {
			if err := w.client.CommitRecords(context.Background(), done...); err != nil {
				log.Printf("commit failed (%v); those tasks will be delivered again", err)
			}
		}
		w.client.AllowRebalance()
	}
}

func main() {
	bootstrap := flag.String("kafka", "127.0.0.1:29092", "Kafka bootstrap servers")
	prefix := flag.String("topic-prefix", "terranoha", "the deployment's topic prefix")
	group := flag.String("group", "", "consumer group (default <prefix>-go-worker)")
	schemas := flag.String("schemas", "schemas", "the repository's schemas/ folder")
	flag.Parse()
	if *group == "" {
		*group = *prefix + "-go-worker"
	}
	var w worker
	var err error
	for ref, file := range map[*schemaRef]string{&w.task: "outbox/TaskCommand.v1.avsc",
		&w.complete: "commands/CompleteTask.v1.avsc", &w.fail: "commands/FailTask.v1.avsc"} {
		if *ref, err = loadSchema(*schemas, file); err != nil {
			log.Fatalf("loading schemas (pass --schemas DIR): %v", err)
		}
	}
	w.tools = map[string]func(context.Context, TaskCommand) (any, error){"text.count": countWords}
	w.inputs = *prefix + ".run-inputs"
	topics := make([]string, 0, len(w.tools))
	for queue := range w.tools {
		topics = append(topics, *prefix+".tasks."+queue)
	}
	w.client, err = kgo.NewClient(
		kgo.SeedBrokers(strings.Split(*bootstrap, ",")...),
		kgo.ConsumerGroup(*group),
		kgo.ConsumeTopics(topics...),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()), // tasks are written in transactions
		kgo.DisableAutoCommit(),
		kgo.BlockRebalanceOnPoll(),
		kgo.RecordPartitioner(kgo.StickyKeyPartitioner(nil)), // murmur2, as Kafka's default
	)
	if err != nil {
		log.Fatalf("kafka client: %v", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	fmt.Printf("go worker on %s: %s\n", *bootstrap, strings.Join(topics, ", "))
	w.run(ctx)
	w.client.Close() // leaves the group
}
