#!/bin/sh
# Builds grpc-hello and grpc-load offline from Debian's packaged Go sources:
#   apt-get install golang-go golang-google-grpc-dev golang-github-coreos-go-systemd-dev
#   ./build.sh [OUT_DIR]            (default: ./bin)
# Debian installs go-systemd v22 under github.com/coreos/go-systemd, without the
# /v22 its import path has; a small GOPATH overlay adds that path.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/bin}
mkdir -p "$out"
out=$(cd "$out" && pwd)
overlay=$(mktemp -d)
trap 'rm -rf "$overlay"' EXIT
mkdir -p "$overlay/src/github.com/coreos/go-systemd"
ln -s /usr/share/gocode/src/github.com/coreos/go-systemd "$overlay/src/github.com/coreos/go-systemd/v22"
export GO111MODULE=off GOPATH="$overlay:/usr/share/gocode" GOFLAGS=
export GOCACHE="${GOCACHE:-$out/.gocache}"
cd "$here"
go vet . ./load
go build -o "$out/grpc-hello" .
go build -o "$out/grpc-load" ./load
echo "built $out/grpc-hello $out/grpc-load"
