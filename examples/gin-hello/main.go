// gin-hello: a Gin service that baton restarts without dropping a request.
//
// It takes its listener from baton (or systemd) with go-systemd's
// activation.Listeners(), reports ready with daemon.SdNotify, and drains with
// http.Server.Shutdown on SIGTERM. Run alone, it binds -listen itself.
//
//	gin-hello [-listen ADDR] [-startup DUR] [-drain DUR]
//
// Routes: / (headers x-pid and x-baton-generation) and /slow?ms=N.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/gin-gonic/gin"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "address to bind when no socket is inherited")
	startup := flag.Duration("startup", 0, "simulated startup before ready (opening pools, warming caches)")
	drain := flag.Duration("drain", 20*time.Second, "how long the drain may take after SIGTERM")
	flag.Parse()

	// 1. The sockets baton passed (LISTEN_FDS; go-systemd checks LISTEN_PID).
	listeners, err := activation.Listeners()
	if err != nil {
		log.Fatalf("gin-hello: inherited sockets: %v", err)
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, os.Interrupt)

	time.Sleep(*startup)

	var ln net.Listener
	if len(listeners) > 0 && listeners[0] != nil {
		ln = listeners[0]
	} else {
		// Standalone: bind our own address, after initializing.
		if ln, err = net.Listen("tcp", *listen); err != nil {
			log.Fatalf("gin-hello: %v", err)
		}
		log.Printf("gin-hello: listening on %s", ln.Addr())
	}

	gin.SetMode(gin.ReleaseMode)
	r := gin.New()
	pid := strconv.Itoa(os.Getpid())
	generation := os.Getenv("BATON_GENERATION")
	r.Use(func(c *gin.Context) {
		c.Header("x-pid", pid)
		if generation != "" {
			c.Header("x-baton-generation", generation)
		}
	})
	r.GET("/", func(c *gin.Context) {
		c.String(http.StatusOK, "hello from generation %s (pid %s)\n", generation, pid)
	})
	r.GET("/slow", func(c *gin.Context) {
		ms, err := strconv.Atoi(c.DefaultQuery("ms", "1000"))
		if err != nil || ms < 0 || ms > 600000 {
			ms = 1000
		}
		log.Printf("gin-hello: pid %s started a %d ms request", pid, ms)
		time.Sleep(time.Duration(ms) * time.Millisecond)
		c.String(http.StatusOK, "slept %d ms\n", ms)
	})

	srv := &http.Server{Handler: r}
	go func() {
		if err := srv.Serve(ln); err != nil && err != http.ErrServerClosed {
			log.Fatalf("gin-hello: %v", err)
		}
	}()

	// 2. Ready: baton retires the previous generation only now.
	if _, err := daemon.SdNotify(false, daemon.SdNotifyReady); err != nil {
		log.Printf("gin-hello: notify: %v", err)
	}

	// 3. Drain on SIGTERM: stop accepting, finish in-flight requests.
	<-stop
	daemon.SdNotify(false, daemon.SdNotifyStopping)
	ctx, cancel := context.WithTimeout(context.Background(), *drain)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "gin-hello: drain: %v\n", err)
		os.Exit(1)
	}
}
