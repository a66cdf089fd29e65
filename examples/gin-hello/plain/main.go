// plain: an unmodified Gin app, as most are written: it binds its own port
// with r.Run() (which reads $PORT). It does not know about LISTEN_FDS, so
// under `baton run` every generation tries to bind the same port; baton
// detects this and says so. Run it with `baton run --proxy http` instead
// (proxy mode), or adopt the three calls of ../main.go.
package main

import (
	"io"
	"net/http"
	"os"

	"github.com/gin-gonic/gin"
)

func main() {
	gin.SetMode(gin.ReleaseMode)
	r := gin.New()
	r.GET("/", func(c *gin.Context) {
		c.Header("x-pid", itoa(os.Getpid()))
		c.Header("ETag", `"v1"`)
		// A conditional GET for what the client has: no body.
		if c.GetHeader("If-None-Match") == `"v1"` {
			c.Status(http.StatusNotModified)
			return
		}
		c.String(http.StatusOK, "hello\n")
	})
	r.POST("/", func(c *gin.Context) {
		n, _ := io.Copy(io.Discard, c.Request.Body)
		c.Header("x-pid", itoa(os.Getpid()))
		c.String(http.StatusOK, "got "+itoa(int(n))+" bytes\n")
	})
	if err := r.Run(); err != nil {
		os.Stderr.WriteString("plain: " + err.Error() + "\n")
		os.Exit(1)
	}
}

func itoa(n int) string {
	if n == 0 {
		return "0"
	}
	var b [20]byte
	i := len(b)
	for ; n > 0; n /= 10 {
		i--
		b[i] = byte('0' + n%10)
	}
	return string(b[i:])
}
