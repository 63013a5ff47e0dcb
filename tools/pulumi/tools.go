//go:build tools

// Package tools pins the Pulumi CLI's module: scripts/install-pulumi builds
// github.com/pulumi/pulumi/pkg/v3/cmd/pulumi from this module's go.mod and go.sum, which
// require pkg/v3 and sdk/v3 at one version (pkg/go.mod's replace directives make a plain
// `go install` of the CLI impossible).
package tools

import _ "github.com/pulumi/pulumi/pkg/v3/cmd/pulumi"
