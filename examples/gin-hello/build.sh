#!/bin/sh
# Builds gin-hello (and plain/) offline from Debian's packaged Go sources:
#   apt-get install golang-go golang-github-gin-gonic-gin-dev golang-github-coreos-go-systemd-dev
#   ./build.sh [OUT_DIR]            (default: ./bin)
# Debian installs go-systemd v22 under github.com/coreos/go-systemd, without the
# /v22 its import path has; a small GOPATH overlay adds that path.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/bin}
mkdir -p "$out"
overlay=$(mktemp -d)
trap 'rm -rf "$overlay"' EXIT
mkdir -p "$overlay/src/github.com/coreos/go-systemd"
ln -s /usr/share/gocode/src/github.com/coreos/go-systemd "$overlay/src/github.com/coreos/go-systemd/v22"
export GO111MODULE=off GOPATH="$overlay:/usr/share/gocode" GOFLAGS=
export GOCACHE="${GOCACHE:-$out/.gocache}"
cd "$here"
go vet . ./plain
go build -o "$out/gin-hello" .
go build -o "$out/gin-plain" ./plain
echo "built $out/gin-hello $out/gin-plain"
