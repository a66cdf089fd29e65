// The Gin app of examples/gin-hello, restarted by facebookgo/grace
// (gracehttp) instead of baton, for docs/comparison.md. SIGUSR2 restarts.
package main

import (
	"flag"
	"log"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/facebookgo/grace/gracehttp"
	"github.com/gin-gonic/gin"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "address")
	startup := flag.Duration("startup", 0, "simulated startup before serving")
	flag.Parse()
	time.Sleep(*startup)
	gin.SetMode(gin.ReleaseMode)
	r := gin.New()
	pid := strconv.Itoa(os.Getpid())
	r.GET("/", func(c *gin.Context) {
		c.Header("x-pid", pid)
		c.String(http.StatusOK, "hello\n")
	})
	if err := gracehttp.Serve(&http.Server{Addr: *listen, Handler: r}); err != nil {
		log.Fatal(err)
	}
}
