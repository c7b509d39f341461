// Package quota stands in for moby's quota package, which Debian's
// golang-github-docker-docker-dev does not ship, for graphtest to compile: graphtest only
// compares a CreateReadWrite error with ErrQuotaNotSupported (to skip its quota case), which
// an error that came back through the plugin protocol never is. test_graphtest.py copies it
// to <GOPATH>/src/github.com/docker/docker/quota.
package quota

import "errors"

// ErrQuotaNotSupported is what moby's own drivers return for a size limit they cannot set.
var ErrQuotaNotSupported = errors.New("quotas are not supported on this filesystem")
