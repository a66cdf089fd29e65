// grpc-hello: a grpc-go service that baton restarts without dropping a call.
//
// It serves the standard gRPC health service (grpc.health.v1.Health, status
// SERVING for ""), takes its listener from baton (or systemd) with go-systemd's
// activation.Listeners(), reports ready with daemon.SdNotify, and drains on
// SIGTERM: open streams end with UNAVAILABLE, then GracefulStop sends GOAWAY
// and finishes the unary calls in flight.
//
//	grpc-hello [-listen ADDR] [-startup DUR] [-drain DUR] [-fail CODE]
//
// Listener, first that applies: the socket baton passed (LISTEN_FDS); in
// baton's proxy mode, 127.0.0.1:$PORT; else -listen.
//
// Every unary answer carries the header metadata x-pid and, under baton,
// x-baton-generation. With -fail CODE (unavailable, internal, ...) every
// unary call fails with that status instead.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

func main() {
	log.SetFlags(0)
	log.SetPrefix("grpc-hello: ")

	listen := flag.String("listen", "127.0.0.1:50051", "address to bind when no socket is inherited and $PORT is unset")
	startup := flag.Duration("startup", 0, "simulated startup before ready (opening pools, warming caches)")
	drain := flag.Duration("drain", 20*time.Second, "how long GracefulStop may take after SIGTERM before Stop")
	failName := flag.String("fail", "ok", "status code every unary call returns (ok: answer normally)")
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "grpc-hello: unexpected argument %q\n", flag.Arg(0))
		os.Exit(2)
	}
	failCode, ok := parseCode(*failName)
	if !ok {
		fmt.Fprintf(os.Stderr, "grpc-hello: -fail %q: not a gRPC status code (ok, unavailable, internal, ...)\n", *failName)
		os.Exit(2)
	}

	// 1. The sockets baton passed (LISTEN_FDS; go-systemd checks LISTEN_PID).
	listeners, err := activation.Listeners()
	if err != nil {
		log.Fatalf("inherited sockets: %v", err)
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, os.Interrupt)

	time.Sleep(*startup)

	var ln net.Listener
	switch {
	case len(listeners) > 0 && listeners[0] != nil:
		ln = listeners[0]
	case os.Getenv("PORT") != "":
		// Proxy mode: baton gives each generation a private port.
		if ln, err = net.Listen("tcp", net.JoinHostPort("127.0.0.1", os.Getenv("PORT"))); err != nil {
			log.Fatalf("%v", err)
		}
		log.Printf("listening on %s ($PORT)", ln.Addr())
	default:
		// Standalone: bind our own address, after initializing.
		if ln, err = net.Listen("tcp", *listen); err != nil {
			log.Fatalf("%v", err)
		}
		log.Printf("listening on %s", ln.Addr())
	}

	pid := strconv.Itoa(os.Getpid())
	generation := os.Getenv("BATON_GENERATION")
	header := metadata.Pairs("x-pid", pid)
	if generation != "" {
		header.Set("x-baton-generation", generation)
	}

	// stopping is closed when SIGTERM arrives; the stream interceptor ends
	// every open stream then.
	stopping := make(chan struct{})

	unary := func(ctx context.Context, req interface{}, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (interface{}, error) {
		if err := grpc.SetHeader(ctx, header); err != nil {
			log.Printf("set header: %v", err)
		}
		if failCode != codes.OK {
			return nil, status.Errorf(failCode, "grpc-hello pid %s fails every call (-fail %s)", pid, *failName)
		}
		return handler(ctx, req)
	}

	srv := grpc.NewServer(
		// A connection that never sends the HTTP/2 preface holds
		// GracefulStop, and even Stop, until this deadline (120 s by
		// default).
		grpc.ConnectionTimeout(handshakeTimeout),
		grpc.UnaryInterceptor(unary),
		grpc.StreamInterceptor(endStreamsWhenStopping(stopping)),
	)
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(srv, hs)

	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	// 2. Ready: baton retires the previous generation only now.
	if _, err := daemon.SdNotify(false, daemon.SdNotifyReady); err != nil {
		log.Printf("notify: %v", err)
	}

	select {
	case err := <-served:
		// Serve returns nil only after Stop or GracefulStop.
		log.Fatalf("serve: %v", err)
	case sig := <-stop:
		log.Printf("pid %s got %v, draining", pid, sig)
	}

	// 3. Drain. GracefulStop waits for every open stream to end, and a
	// health Watch never ends by itself: end them first, with UNAVAILABLE
	// so that clients reconnect at once. Then GOAWAY, and the unary calls
	// in flight finish, within -drain.
	daemon.SdNotify(false, daemon.SdNotifyStopping)
	close(stopping)
	drained := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(drained)
	}()
	select {
	case <-drained:
		log.Printf("pid %s drained", pid)
	case <-time.After(*drain):
		log.Printf("pid %s: drain took longer than %v, closing the remaining connections", pid, *drain)
		// Stop too waits for connections still in their handshake: give
		// it a moment, then exit anyway.
		go srv.Stop()
		select {
		case <-drained:
		case <-time.After(time.Second):
			log.Printf("pid %s: exiting with connections still open", pid)
		}
	}
}

// handshakeTimeout bounds a new connection's HTTP/2 handshake.
const handshakeTimeout = 5 * time.Second

// endStreamsWhenStopping returns a stream interceptor that cancels the
// stream's context once stopping is closed, and then ends the stream with
// UNAVAILABLE "server is stopping" rather than the handler's CANCELLED.
func endStreamsWhenStopping(stopping <-chan struct{}) grpc.StreamServerInterceptor {
	isStopping := func() bool {
		select {
		case <-stopping:
			return true
		default:
			return false
		}
	}
	return func(srv interface{}, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if isStopping() {
			return status.Error(codes.Unavailable, "server is stopping")
		}
		ctx, cancel := context.WithCancel(ss.Context())
		defer cancel()
		var watcher sync.WaitGroup
		watcher.Add(1)
		go func() {
			defer watcher.Done()
			select {
			case <-stopping:
				cancel()
			case <-ctx.Done():
			}
		}()
		err := handler(srv, &stoppableStream{ServerStream: ss, ctx: ctx})
		cancel()
		watcher.Wait()
		// The client's own cancellation or deadline keeps its status (the
		// client does not read it anyway).
		if isStopping() && ss.Context().Err() == nil {
			return status.Error(codes.Unavailable, "server is stopping")
		}
		return err
	}
}

// stoppableStream is a ServerStream whose Context is also cancelled when the
// server begins stopping.
type stoppableStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *stoppableStream) Context() context.Context { return s.ctx }

// parseCode reads a status code by name in any common spelling
// (unavailable, UNAVAILABLE, Unavailable, deadline_exceeded,
// DeadlineExceeded, cancelled) or by number.
func parseCode(s string) (codes.Code, bool) {
	if n, err := strconv.ParseUint(s, 10, 32); err == nil {
		return codes.Code(n), n <= uint64(codes.Unauthenticated)
	}
	norm := func(s string) string {
		s = strings.ToLower(strings.NewReplacer("_", "", "-", "").Replace(s))
		if s == "cancelled" {
			s = "canceled"
		}
		return s
	}
	want := norm(s)
	for c := codes.OK; c <= codes.Unauthenticated; c++ {
		if norm(c.String()) == want {
			return c, true
		}
	}
	return codes.Unknown, false
}
