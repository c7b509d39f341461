// moby's own graph driver test suite (daemon/graphdriver/graphtest, as Debian's
// golang-github-docker-docker-dev ships it: Docker 20.10, Debian's docker.io) against
// `graphdriver serve docker-graphdriver`, through moby's own plugin client.
//
// graphtest gets its driver with graphdriver.GetDriver(name, nil, {Root: <fresh tmp dir>}),
// which finds built-in drivers only: "gdplugin" is registered here as one. Its init starts
// `$GRAPHDRIVER --root <home>/store --driver $GD_DRIVER [--opt ...] serve docker-graphdriver
// --name <unique> --socket /run/docker/plugins/<unique>.sock` (<unique>: $GD_PLUGIN_PREFIX-N)
// and hands back what dockerd would use for a graphdriver plugin: graphdriver.GetDriver(<unique>, getter, {Root: home,
// ExperimentalEnabled: true}), i.e. moby's graphDriverProxy (proxy.go) over the plugin found
// and activated by pkg/plugins discovery, as dockerd finds unmanaged (v1) plugins. Every call
// of the suite goes over the plugin HTTP protocol to the plugin process; only Cleanup is
// wrapped: after the proxy's Cleanup it stops the plugin and runs `graphdriver cleanup`, so
// graphtest's os.RemoveAll of the root finds nothing mounted.
//
// As moby's overlay2 tests do, TestSetup makes the driver and TestTeardown puts it: the cases
// run in order on one plugin (one store), so they also reuse ids that cases before them
// removed. Built in GOPATH mode (GO111MODULE=off, GOPATH=<tmp>:/usr/share/gocode) by
// test_graphtest.py; graphtest's roots are under $TMPDIR, which that test puts on the
// filesystem the driver runs on.
package gdgraphtest

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/docker/docker/daemon/graphdriver"
	"github.com/docker/docker/daemon/graphdriver/graphtest"
	"github.com/docker/docker/pkg/idtools"
	"github.com/docker/docker/pkg/plugingetter"
	"github.com/docker/docker/pkg/plugins"
)

// the name graphtest knows the driver by
const registered = "gdplugin"

// where pkg/plugins discovery looks for sockets (its socketsPath)
const pluginDir = "/run/docker/plugins"

var started int

func init() {
	if err := graphdriver.Register(registered, initPlugin); err != nil {
		panic(err)
	}
}

// getter is the part of dockerd's plugin store that a v1 graphdriver plugin goes through:
// pkg/plugins' discovery (the socket in /run/docker/plugins) and activation.
type getter struct{}

func (getter) Get(name, capability string, _ int) (plugingetter.CompatPlugin, error) {
	return plugins.Get(name, capability)
}

func (getter) GetAllByCap(string) ([]plugingetter.CompatPlugin, error) {
	return nil, fmt.Errorf("not used by graphdriver plugins")
}

func (getter) GetAllManagedPluginsByCap(string) []plugingetter.CompatPlugin { return nil }

func (getter) Handle(string, func(string, *plugins.Client)) {}

// pluginDriver is moby's graphDriverProxy; its Cleanup also stops the plugin process.
type pluginDriver struct {
	graphdriver.Driver
	stop func() error
}

func (d *pluginDriver) Cleanup() error {
	err := d.Driver.Cleanup()
	if stopErr := d.stop(); stopErr != nil {
		if err != nil {
			return fmt.Errorf("%v; %v", err, stopErr)
		}
		return stopErr
	}
	return err
}

func graphdriverCmd(store string, args ...string) *exec.Cmd {
	full := []string{"--root", store, "--driver", os.Getenv("GD_DRIVER")}
	if opts := os.Getenv("GD_OPTS"); opts != "" {
		for _, opt := range strings.Split(opts, ",") {
			full = append(full, "--opt", opt)
		}
	}
	return exec.Command(os.Getenv("GRAPHDRIVER"), append(full, args...)...)
}

func initPlugin(home string, options []string, uidMaps, gidMaps []idtools.IDMap) (graphdriver.Driver, error) {
	prefix := os.Getenv("GD_PLUGIN_PREFIX")
	if os.Getenv("GRAPHDRIVER") == "" || os.Getenv("GD_DRIVER") == "" || prefix == "" {
		return nil, fmt.Errorf("GRAPHDRIVER, GD_DRIVER and GD_PLUGIN_PREFIX are not set (test_graphtest.py sets them)")
	}
	started++
	// a name of its own (pkg/plugins keeps every plugin it found, by name, for good)
	name := fmt.Sprintf("%s-%d", prefix, started)
	store := filepath.Join(home, "store")
	sock := filepath.Join(pluginDir, name+".sock")
	// next to graphtest's root, which graphtest removes at the end
	logPath := filepath.Join(os.TempDir(), name+".log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := graphdriverCmd(store, "serve", "docker-graphdriver", "--name", name, "--socket", sock)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop := func() error {
		var problems []string
		select {
		case <-exited:
			problems = append(problems, "the plugin had stopped on its own")
		default:
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case err := <-exited:
				if err != nil {
					problems = append(problems, fmt.Sprintf("the plugin ended with %v", err))
				}
			case <-time.After(30 * time.Second):
				// the plugin prints its threads' stacks on SIGUSR1: the log says where it hung
				_ = cmd.Process.Signal(syscall.SIGUSR1)
				time.Sleep(time.Second)
				_ = cmd.Process.Kill()
				<-exited
				problems = append(problems, "the plugin did not stop within 30 s of SIGTERM")
			}
		}
		// the mounts the plugin leaves (Cleanup keeps them, as for a live-restored dockerd)
		if out, err := graphdriverCmd(store, "cleanup").CombinedOutput(); err != nil {
			problems = append(problems, fmt.Sprintf("graphdriver cleanup: %v: %s", err, out))
		}
		_ = os.Remove(sock)
		logFile.Close()
		if data, err := os.ReadFile(logPath); err == nil && len(problems) > 0 {
			problems = append(problems, "plugin log:\n"+string(data))
		}
		_ = os.Remove(logPath)
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
			logFile.Close()
			return nil, fmt.Errorf("the plugin exited before serving: %s", data)
		default:
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("the plugin did not listen on %s within 60 s; %v", sock, stop())
		}
		time.Sleep(20 * time.Millisecond)
	}
	proxy, err := graphdriver.GetDriver(name, getter{}, graphdriver.Options{
		Root:                home,
		DriverOptions:       options,
		UIDMaps:             uidMaps,
		GIDMaps:             gidMaps,
		ExperimentalEnabled: true,
	})
	if err != nil {
		// not graphdriver.ErrNotSupported itself, which graphtest would take for a skip
		return nil, fmt.Errorf("the plugin as dockerd gets it: %v (logged above); %v", err, stop())
	}
	return &pluginDriver{proxy, stop}, nil
}

func TestSetup(t *testing.T) {
	graphtest.GetDriver(t, registered)
}

func TestCreateEmpty(t *testing.T) {
	graphtest.DriverTestCreateEmpty(t, registered)
}

func TestCreateBase(t *testing.T) {
	graphtest.DriverTestCreateBase(t, registered)
}

func TestCreateSnap(t *testing.T) {
	graphtest.DriverTestCreateSnap(t, registered)
}

// as moby's overlay2 tests (128: the most layers overlay2 stacks)
func Test128LayerRead(t *testing.T) {
	graphtest.DriverTestDeepLayerRead(t, 128, registered)
}

func TestDiffApply10Files(t *testing.T) {
	graphtest.DriverTestDiffApply(t, 10, registered)
}

func TestChanges(t *testing.T) {
	graphtest.DriverTestChanges(t, registered)
}

// graphtest skips only on quota.ErrQuotaNotSupported itself, which no plugin can give back
// (proxy.go makes every Err a new error): where the driver has no size limit test_graphtest.py
// says why in GD_NO_QUOTA, and the case is skipped with that reason; elsewhere it is required.
func TestSetQuota(t *testing.T) {
	if why := os.Getenv("GD_NO_QUOTA"); why != "" {
		t.Skipf("no quota: %s", why)
	}
	graphtest.DriverTestSetQuota(t, registered, true)
}

func TestTeardown(t *testing.T) {
	graphtest.PutDriver(t)
}
