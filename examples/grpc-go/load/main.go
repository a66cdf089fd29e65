// grpc-load: a gRPC load client for tests and benchmarks of grpc-hello (or
// any server of the standard health service).
//
//	grpc-load -addr HOST:PORT [-conns N] [-streams M] [-duration DUR]
//	          [-timeout DUR] [-wait-ready DUR]
//
// N unary clients, each on its own ClientConn (its own HTTP/2 connection),
// call grpc.health.v1.Health/Check in a loop and note the x-pid header of
// each answer. M streaming clients, each on its own ClientConn too, hold a
// Health/Watch open; a Watch that ends with UNAVAILABLE or cleanly is opened
// again at once.
//
// At the end it prints one JSON object on stdout and exits 0, whatever
// failed: the caller judges. Exit 2: bad flags, or the server never
// answered within -wait-ready.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

type pidSeen struct {
	FirstMs int64 `json:"first_ms"`
	LastMs  int64 `json:"last_ms"`
	Count   int64 `json:"count"`
}

type clientReport struct {
	Pids map[string]*pidSeen `json:"pids"`
}

type report struct {
	Rpcs          int64            `json:"rpcs"`
	Failed        int64            `json:"failed"`
	Errors        map[string]int64 `json:"errors"`
	StreamsOpened int64            `json:"streams_opened"`
	StreamsEnded  map[string]int64 `json:"streams_ended"`
	StreamsFailed map[string]int64 `json:"streams_failed"`
	Clients       []clientReport   `json:"clients"`
	FirstErrors   []string         `json:"first_errors"`
	StartedMs     int64            `json:"started_ms"`
	EndedMs       int64            `json:"ended_ms"`
}

// unaryStats and streamStats are owned by one goroutine each while the load
// runs, and merged at the end.
type unaryStats struct {
	rpcs, failed int64
	errors       map[string]int64
	pids         map[string]*pidSeen
}

type streamStats struct {
	opened        int64
	ended, failed map[string]int64
}

// errorLog keeps the first distinct error messages.
type errorLog struct {
	mu   sync.Mutex
	seen map[string]bool
	list []string
}

const maxErrors = 10

func (l *errorLog) add(msg string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.list) >= maxErrors || l.seen[msg] {
		return
	}
	l.seen[msg] = true
	l.list = append(l.list, msg)
}

func usageError(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "grpc-load: "+format+"\n", args...)
	os.Exit(2)
}

func main() {
	addr := flag.String("addr", "", "server address HOST:PORT (required)")
	conns := flag.Int("conns", 8, "unary clients, each with its own connection")
	streams := flag.Int("streams", 4, "open Watch streams, each on its own connection")
	duration := flag.Duration("duration", 10*time.Second, "how long to run (SIGTERM or SIGINT ends it sooner)")
	timeout := flag.Duration("timeout", 5*time.Second, "deadline of each unary call")
	waitReady := flag.Duration("wait-ready", 10*time.Second, "how long to wait for a first successful Check before the load (0: do not wait)")
	seenPath := flag.String("seen", "", "append \"CLIENT PID UNIX_MS\" to this file the first time a unary client is answered by a process")
	flag.Parse() // exits 2 on an unknown flag or a bad value
	switch {
	case flag.NArg() > 0:
		usageError("unexpected argument %q", flag.Arg(0))
	case *addr == "":
		usageError("-addr HOST:PORT is required")
	case *conns < 0 || *streams < 0:
		usageError("-conns and -streams must not be negative")
	case *conns == 0 && *streams == 0:
		usageError("nothing to do: -conns and -streams are both 0")
	case *duration <= 0 || *timeout <= 0 || *waitReady < 0:
		usageError("-duration and -timeout must be positive, -wait-ready not negative")
	}

	// SIGTERM or SIGINT ends the run early; the report is printed anyway.
	run, cancelRun := context.WithCancel(context.Background())
	defer cancelRun()
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, os.Interrupt)
	go func() {
		<-signals
		cancelRun()
	}()

	if *waitReady > 0 && !awaitReady(run, *addr, *waitReady) {
		if run.Err() == nil {
			fmt.Fprintf(os.Stderr, "grpc-load: %s did not answer a health Check within %v\n", *addr, *waitReady)
		}
		os.Exit(2)
	}

	// One ClientConn per client: grpc-go never shares a connection between
	// ClientConns, so each client has its own TCP connection and HTTP/2
	// session, and a reload is seen by each of them separately.
	dial := func() *grpc.ClientConn {
		cc, err := grpc.Dial(*addr, dialOptions()...)
		if err != nil { // only for a malformed target or options
			usageError("dial %s: %v", *addr, err)
		}
		return cc
	}
	unaryConns := make([]*grpc.ClientConn, *conns)
	for i := range unaryConns {
		unaryConns[i] = dial()
	}
	streamConns := make([]*grpc.ClientConn, *streams)
	for i := range streamConns {
		streamConns[i] = dial()
	}

	errs := &errorLog{seen: map[string]bool{}}
	var seen *seenLog
	if *seenPath != "" {
		f, err := os.OpenFile(*seenPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err != nil {
			usageError("-seen: %v", err)
		}
		defer f.Close()
		seen = &seenLog{file: f}
	}
	started := time.Now()
	load, endLoad := context.WithTimeout(run, *duration)
	defer endLoad()

	var wg sync.WaitGroup
	unary := make([]*unaryStats, *conns)
	for i, cc := range unaryConns {
		unary[i] = &unaryStats{errors: map[string]int64{}, pids: map[string]*pidSeen{}}
		wg.Add(1)
		go func(client int, cc *grpc.ClientConn, st *unaryStats) {
			defer wg.Done()
			callLoop(load, cc, *timeout, st, errs, func(pid string, ms int64) { seen.add(client, pid, ms) })
		}(i, cc, unary[i])
	}
	watches := make([]*streamStats, *streams)
	for i, cc := range streamConns {
		watches[i] = &streamStats{ended: map[string]int64{}, failed: map[string]int64{}}
		wg.Add(1)
		go func(cc *grpc.ClientConn, st *streamStats) {
			defer wg.Done()
			watchLoop(load, cc, st, errs)
		}(cc, watches[i])
	}
	wg.Wait()
	ended := time.Now()
	for _, cc := range append(unaryConns, streamConns...) {
		cc.Close()
	}

	r := report{
		Errors:        map[string]int64{},
		StreamsEnded:  map[string]int64{},
		StreamsFailed: map[string]int64{},
		Clients:       []clientReport{},
		FirstErrors:   append([]string{}, errs.list...),
		StartedMs:     started.UnixMilli(),
		EndedMs:       ended.UnixMilli(),
	}
	for _, st := range unary {
		r.Rpcs += st.rpcs
		r.Failed += st.failed
		for k, n := range st.errors {
			r.Errors[k] += n
		}
		r.Clients = append(r.Clients, clientReport{Pids: st.pids})
	}
	for _, st := range watches {
		r.StreamsOpened += st.opened
		for k, n := range st.ended {
			r.StreamsEnded[k] += n
		}
		for k, n := range st.failed {
			r.StreamsFailed[k] += n
		}
	}
	out, err := json.Marshal(r)
	if err != nil {
		fmt.Fprintf(os.Stderr, "grpc-load: %v\n", err)
		os.Exit(1)
	}
	fmt.Println(string(out))
}

func dialOptions() []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithInsecure(),
		// Connect to the address as given, even with $https_proxy set.
		grpc.WithNoProxy(),
		// grpc-go waits 1 s after a failed connection attempt, doubling
		// up to 2 min: far too long for a server that restarts.
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: backoff.Config{
				BaseDelay:  50 * time.Millisecond,
				Multiplier: 1.6,
				Jitter:     0.2,
				MaxDelay:   time.Second,
			},
			MinConnectTimeout: 5 * time.Second,
		}),
	}
}

// awaitReady calls Check until it answers SERVING, on a connection of its
// own that it closes before the load starts.
func awaitReady(run context.Context, addr string, wait time.Duration) bool {
	cc, err := grpc.Dial(addr, dialOptions()...)
	if err != nil {
		usageError("dial %s: %v", addr, err)
	}
	defer cc.Close()
	client := healthpb.NewHealthClient(cc)
	ctx, cancel := context.WithTimeout(run, wait)
	defer cancel()
	for {
		// WaitForReady: wait for the connection instead of failing at
		// once while it is down; the context bounds the wait.
		resp, err := client.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
		if err == nil && resp.Status == healthpb.HealthCheckResponse_SERVING {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// failurePause is how long a unary client waits after a failed call.
const failurePause = 10 * time.Millisecond

// callLoop calls Check until the load ends; a call in flight then finishes
// (within its own deadline) and is counted.
// seenLog records, as it happens, which client met which process first
// when: a test waits on it rather than on time.
type seenLog struct {
	mu   sync.Mutex
	file *os.File
}

func (s *seenLog) add(client int, pid string, ms int64) {
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	fmt.Fprintf(s.file, "%d %s %d\n", client, pid, ms)
}

func callLoop(load context.Context, cc *grpc.ClientConn, timeout time.Duration, st *unaryStats, errs *errorLog, first func(pid string, ms int64)) {
	client := healthpb.NewHealthClient(cc)
	for load.Err() == nil {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		var md metadata.MD
		resp, err := client.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.Header(&md))
		cancel()
		now := time.Now().UnixMilli()
		st.rpcs++
		if err == nil && resp.Status != healthpb.HealthCheckResponse_SERVING {
			err = fmt.Errorf("health status %v", resp.Status)
			st.errors[resp.Status.String()]++
			st.failed++
			errs.add(err.Error())
		} else if err != nil {
			st.errors[status.Code(err).String()]++
			st.failed++
			errs.add(err.Error())
		}
		// The pid of whoever answered, failure or not.
		if pids := md.Get("x-pid"); len(pids) > 0 {
			p := st.pids[pids[0]]
			if p == nil {
				p = &pidSeen{FirstMs: now}
				st.pids[pids[0]] = p
				first(pids[0], now)
			}
			p.LastMs = now
			p.Count++
		}
		if err != nil {
			// A connection that is down fails each call at once: pause
			// rather than spin (and starve the server on a small machine).
			pause(load, failurePause)
		}
	}
}

// watchLoop keeps one Watch open until the load ends.
func watchLoop(load context.Context, cc *grpc.ClientConn, st *streamStats, errs *errorLog) {
	client := healthpb.NewHealthClient(cc)
	// Not the load's context itself: grpc-go would send its deadline to the
	// server, whose own copy of it can end the stream (CANCELLED) just before
	// the client sees its deadline pass. Cancelling resets the stream
	// instead, and the client alone decides.
	streams, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		<-load.Done()
		cancel()
	}()
	for load.Err() == nil {
		stream, err := client.Watch(streams, &healthpb.HealthCheckRequest{})
		if err != nil {
			if load.Err() != nil {
				return
			}
			st.failed[status.Code(err).String()]++
			errs.add("watch: " + err.Error())
			pause(load, 50*time.Millisecond)
			continue
		}
		st.opened++
		received := 0
		for {
			if _, err = stream.Recv(); err != nil {
				break
			}
			received++
		}
		if load.Err() != nil {
			return // ended by us: not counted
		}
		code := status.Code(err)
		if errors.Is(err, io.EOF) {
			code = codes.OK
		}
		switch code {
		case codes.OK, codes.Unavailable:
			st.ended[code.String()]++
		default:
			st.failed[code.String()]++
			errs.add("watch: " + err.Error())
		}
		if received == 0 {
			// Ended before its first message (a server already
			// stopping): do not spin against it.
			pause(load, 10*time.Millisecond)
		}
	}
}

func pause(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}
