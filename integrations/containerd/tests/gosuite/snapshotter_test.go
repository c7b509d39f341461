// containerd's own snapshotter test suite (snapshots/testsuite, as Debian's
// golang-github-containerd-containerd-dev ships it) against graphdriver's proxy snapshotter.
//
// Every case gets its own proxy: `$GRAPHDRIVER --root <case root>/store --driver $GD_DRIVER
// serve containerd --address <case root>/gd.sock`, dialled over the unix socket through
// containerd's snapshots/proxy client, as containerd's proxy plugins are. Built in GOPATH mode
// (GO111MODULE=off, GOPATH=<tmp>:/usr/share/gocode) by test_gosuite.py; the case roots are
// under $TMPDIR, which that test puts on the filesystem the driver runs on.
package gosuite

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func env(t *testing.T, name string) string {
	value := os.Getenv(name)
	if value == "" {
		t.Fatalf("%s is not set (test_gosuite.py sets it)", name)
	}
	return value
}

func graphdriver(bin, store, driver string, args ...string) *exec.Cmd {
	full := []string{"--root", store, "--driver", driver}
	if opts := os.Getenv("GD_OPTS"); opts != "" {
		for _, opt := range strings.Split(opts, ",") {
			full = append(full, "--opt", opt)
		}
	}
	return exec.Command(bin, append(full, args...)...)
}

func TestGraphdriverSnapshotter(t *testing.T) {
	bin := env(t, "GRAPHDRIVER")
	driver := env(t, "GD_DRIVER")
	testsuite.SnapshotterSuite(t, "graphdriver-"+driver, func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		store := filepath.Join(root, "store")
		sock := filepath.Join(root, "gd.sock")
		logPath := filepath.Join(filepath.Dir(root), "proxy.log")
		logFile, err := os.Create(logPath)
		if err != nil {
			return nil, nil, err
		}
		cmd := graphdriver(bin, store, driver, "serve", "containerd", "--address", sock)
		cmd.Stdout = logFile
		cmd.Stderr = logFile
		if err := cmd.Start(); err != nil {
			logFile.Close()
			return nil, nil, err
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		stop := func() error {
			var problems []string
			select {
			case <-exited:
				problems = append(problems, "the proxy had stopped on its own")
			default:
				_ = cmd.Process.Signal(syscall.SIGTERM)
				select {
				case err := <-exited:
					if err != nil {
						problems = append(problems, fmt.Sprintf("the proxy ended with %v", err))
					}
				case <-time.After(30 * time.Second):
					// the proxy prints its threads' stacks on SIGUSR1: the log says where it hung
					_ = cmd.Process.Signal(syscall.SIGUSR1)
					time.Sleep(time.Second)
					_ = cmd.Process.Kill()
					<-exited
					problems = append(problems, "the proxy did not stop within 30 s of SIGTERM")
				}
			}
			// what the proxy held (binds of vfs/btrfs dirs, deep overlay chains) goes with it
			if out, err := graphdriver(bin, store, driver, "cleanup").CombinedOutput(); err != nil {
				problems = append(problems, fmt.Sprintf("graphdriver cleanup: %v: %s", err, out))
			}
			logFile.Close()
			if data, err := os.ReadFile(logPath); err == nil && len(problems) > 0 {
				problems = append(problems, "proxy log:\n"+string(data))
			}
			if len(problems) > 0 {
				return fmt.Errorf("%s", strings.Join(problems, "; "))
			}
			return nil
		}
		deadline := time.Now().Add(60 * time.Second)
		for {
			c, err := net.Dial("unix", sock)
			if err == nil {
				c.Close()
				break
			}
			select {
			case <-exited:
				data, _ := os.ReadFile(logPath)
				return nil, nil, fmt.Errorf("the proxy exited before serving: %s", data)
			default:
			}
			if time.Now().After(deadline) {
				_ = stop()
				return nil, nil, fmt.Errorf("the proxy did not listen on %s within 60 s", sock)
			}
			time.Sleep(20 * time.Millisecond)
		}
		// Debian 12's grpc-go is 1.33: no credentials/insecure package yet
		conn, err := grpc.Dial(sock, grpc.WithInsecure(), grpc.WithContextDialer(
			func(ctx context.Context, addr string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, "unix", addr)
			}))
		if err != nil {
			_ = stop()
			return nil, nil, err
		}
		sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "graphdriver")
		return sn, func() error {
			conn.Close()
			return stop()
		}, nil
	})
}
