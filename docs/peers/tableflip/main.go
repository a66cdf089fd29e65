// The Gin app of examples/gin-hello, restarted by cloudflare/tableflip
// instead of baton, for docs/comparison.md. SIGHUP upgrades.
package main

import (
	"context"
	"flag"
	"log"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"
	"github.com/gin-gonic/gin"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "address")
	startup := flag.Duration("startup", 0, "simulated startup before ready")
	pidFile := flag.String("pid-file", "", "where tableflip writes the current pid")
	flag.Parse()

	upg, err := tableflip.New(tableflip.Options{PIDFile: *pidFile})
	if err != nil {
		log.Fatal(err)
	}
	defer upg.Stop()
	go func() {
		hup := make(chan os.Signal, 1)
		signal.Notify(hup, syscall.SIGHUP)
		for range hup {
			if err := upg.Upgrade(); err != nil {
				log.Printf("tableflip: upgrade failed: %v", err)
			}
		}
	}()

	time.Sleep(*startup)
	ln, err := upg.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	gin.SetMode(gin.ReleaseMode)
	r := gin.New()
	pid := strconv.Itoa(os.Getpid())
	r.GET("/", func(c *gin.Context) {
		c.Header("x-pid", pid)
		c.String(http.StatusOK, "hello\n")
	})
	srv := &http.Server{Handler: r}
	go srv.Serve(ln)
	if err := upg.Ready(); err != nil {
		log.Fatal(err)
	}
	<-upg.Exit()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	srv.Shutdown(ctx)
}
