// Package v2 stands in for moby's plugin/v2, which Debian's golang-github-docker-docker-dev
// does not ship, for daemon/graphdriver/plugin.go to compile: that file only asks whether a
// managed (v2) plugin is a *v2.Plugin, to read its PropagatedMount. The plugin under test is
// a v1 one (IsV1 is true, found by its socket), so it never reaches that branch, and nothing
// makes a Plugin of this type. test_graphtest.py copies it to
// <GOPATH>/src/github.com/docker/docker/plugin/v2.
package v2

import (
	"github.com/docker/docker/api/types"
	"github.com/docker/docker/pkg/plugins"
)

// Plugin has the one field plugin.go reads, and the methods of plugingetter.CompatPlugin
// that its type assertion needs.
type Plugin struct {
	PluginObj types.Plugin
}

func (p *Plugin) Name() string               { return p.PluginObj.Name }
func (p *Plugin) ScopedPath(s string) string { return s }
func (p *Plugin) IsV1() bool                 { return false }
func (p *Plugin) Client() *plugins.Client    { return nil }
