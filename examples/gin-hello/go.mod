module github.com/baton-rs/baton/examples/gin-hello

go 1.19

require (
	github.com/coreos/go-systemd/v22 v22.3.2
	github.com/gin-gonic/gin v1.8.1
)
