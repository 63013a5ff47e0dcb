// pulumi-language-python is the Python language host that the Pulumi engine starts to run a
// Python program (our Pulumi.yaml's infra/): a gRPC LanguageRuntime server that runs the SDK's own
// executor script, pulumi-language-python-exec, under the project's Python toolchain.
//
// Why it is ours: Pulumi's host lives in the nested module
// github.com/pulumi/pulumi/sdk/python/cmd/pulumi-language-python/v3, which has no tags of its own and
// which the Go module proxy our machines reach does not serve at any version (pulumi/pulumi's
// sdk/python/cmd/pulumi-language-python/main.go is the reference). This one keeps to what running a
// program needs and leans on the SDK for the rest: the toolchain (pip, uv, poetry; PULUMI_PYTHON_CMD;
// the `virtualenv` runtime option) is the SDK's python/toolchain package, and the executor script is
// the one the SDK ships beside this binary. It reports no required plugins: the program's providers
// are dynamic (pulumi-python), which the engine resolves without a plugin install.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/pulumi/pulumi/sdk/v3/go/common/util/cmdutil"
	"github.com/pulumi/pulumi/sdk/v3/go/common/util/rpcutil"
	"github.com/pulumi/pulumi/sdk/v3/go/common/version"
	pulumirpc "github.com/pulumi/pulumi/sdk/v3/proto/go"
	"github.com/pulumi/pulumi/sdk/v3/python/toolchain"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/emptypb"
)

// The executor exits with this code after it has shown the user an actionable message: the
// engine then bails without adding an error of its own (as Pulumi's host does).
const shownToUser = 32

func main() {
	tracing := flag.String("tracing", "", "Emit tracing to a Zipkin-compatible tracing endpoint")
	executor := flag.String("use-executor", "", "The executor script to run (default: <this binary>-exec)")
	flag.String("root", "", "The project's root directory (the engine also sends it with each request)")
	flag.Parse()

	executorPath := *executor
	if executorPath == "" {
		self, err := os.Executable()
		if err != nil {
			cmdutil.Exit(fmt.Errorf("finding this binary: %w", err))
		}
		executorPath = self + "-exec"
	}
	if _, err := os.Stat(executorPath); err != nil {
		cmdutil.Exit(fmt.Errorf("the executor %s is missing: install it beside this binary (it ships in the sdk/v3 module's python/cmd/)", executorPath))
	}
	// When the engine is gone (kill -9 of `pulumi up`), stop serving and end the program we run,
	// as Pulumi's own hosts do: nothing of a killed run keeps working on the user's machine.
	ctx, cancel := context.WithCancel(context.Background())
	stop := make(chan bool)
	go func() {
		<-ctx.Done()
		close(stop)
	}()
	host := &languageHost{exec: executorPath, tracing: *tracing, ctx: ctx, cancel: cancel}
	if args := flag.Args(); len(args) > 0 {
		host.watchEngine(args[0])
	}

	handle, err := rpcutil.ServeWithOptions(rpcutil.ServeOptions{
		Init: func(srv *grpc.Server) error {
			pulumirpc.RegisterLanguageRuntimeServer(srv, host)
			return nil
		},
		Cancel:  stop,
		Options: rpcutil.OpenTracingServerInterceptorOptions(nil),
	})
	if err != nil {
		cmdutil.Exit(fmt.Errorf("could not start the language host's RPC server: %w", err))
	}
	// The engine reads the port from our first line of output.
	fmt.Printf("%d\n", handle.Port)
	if err := <-handle.Done; err != nil {
		cmdutil.Exit(fmt.Errorf("the language host's RPC server stopped: %w", err))
	}
}

type languageHost struct {
	pulumirpc.UnimplementedLanguageRuntimeServer

	exec          string
	engineAddress string
	tracing       string
	ctx           context.Context // done when the engine stops answering
	cancel        context.CancelFunc
	watching      sync.Once
}

// How often the engine is asked whether it is alive.
const engineCheckInterval = 2 * time.Second

// watchEngine ends this host (and the program it runs) when the engine at addr stops answering.
func (h *languageHost) watchEngine(addr string) {
	h.engineAddress = addr
	h.watching.Do(func() {
		if err := rpcutil.Healthcheck(h.ctx, addr, engineCheckInterval, h.cancel); err != nil {
			fmt.Fprintf(os.Stderr, "cannot watch the engine at %s: %v\n", addr, err)
		}
	})
}

// programToolchain is the Python toolchain of a program: Pulumi.yaml's runtime options (toolchain,
// virtualenv) read as Pulumi's host reads them, resolved by the SDK (pip and PULUMI_PYTHON_CMD by default).
// A nil info (an About without a program) gives the default.
func programToolchain(info *pulumirpc.ProgramInfo) (toolchain.Toolchain, error) {
	opts := toolchain.PythonOptions{Root: info.GetRootDirectory(), ProgramDir: info.GetProgramDirectory(), Toolchain: toolchain.Pip}
	raw := info.GetOptions().AsMap()
	if v, ok := raw["virtualenv"].(string); ok {
		opts.Virtualenv = v
		if !filepath.IsAbs(v) {
			opts.Virtualenv = filepath.Join(opts.Root, v)
		}
	}
	switch raw["toolchain"] {
	case nil, "pip":
	case "uv":
		opts.Toolchain = toolchain.Uv
	case "poetry":
		opts.Toolchain = toolchain.Poetry
	default:
		return nil, fmt.Errorf("unsupported toolchain %v: use pip, uv or poetry", raw["toolchain"])
	}
	return toolchain.ResolveToolchain(opts)
}

func (h *languageHost) Handshake(_ context.Context, req *pulumirpc.LanguageHandshakeRequest) (*pulumirpc.LanguageHandshakeResponse, error) {
	h.watchEngine(req.GetEngineAddress())
	return &pulumirpc.LanguageHandshakeResponse{}, nil
}

func (h *languageHost) GetPluginInfo(context.Context, *emptypb.Empty) (*pulumirpc.PluginInfo, error) {
	return &pulumirpc.PluginInfo{Version: version.Version}, nil
}

func (h *languageHost) GetRequiredPlugins(context.Context, *pulumirpc.GetRequiredPluginsRequest) (*pulumirpc.GetRequiredPluginsResponse, error) {
	return &pulumirpc.GetRequiredPluginsResponse{}, nil
}

func (h *languageHost) GetRequiredPackages(context.Context, *pulumirpc.GetRequiredPackagesRequest) (*pulumirpc.GetRequiredPackagesResponse, error) {
	return &pulumirpc.GetRequiredPackagesResponse{}, nil
}

func (h *languageHost) RuntimeOptionsPrompts(context.Context, *pulumirpc.RuntimeOptionsRequest) (*pulumirpc.RuntimeOptionsResponse, error) {
	return &pulumirpc.RuntimeOptionsResponse{}, nil
}

func (h *languageHost) About(ctx context.Context, req *pulumirpc.AboutRequest) (*pulumirpc.AboutResponse, error) {
	tc, err := programToolchain(req.GetInfo())
	if err != nil {
		return nil, err
	}
	about, err := tc.About(ctx)
	if err != nil {
		return nil, err
	}
	return &pulumirpc.AboutResponse{Executable: about.PythonExecutable, Version: about.PythonVersion.String()}, nil
}

func (h *languageHost) GetProgramDependencies(
	ctx context.Context, req *pulumirpc.GetProgramDependenciesRequest,
) (*pulumirpc.GetProgramDependenciesResponse, error) {
	tc, err := programToolchain(req.GetInfo())
	if err != nil {
		return nil, err
	}
	packages, err := tc.ListPackages(ctx, req.GetTransitiveDependencies())
	if err != nil {
		return nil, fmt.Errorf("listing the program's Python packages: %w", err)
	}
	deps := make([]*pulumirpc.DependencyInfo, len(packages))
	for i, p := range packages {
		deps[i] = &pulumirpc.DependencyInfo{Name: p.Name, Version: p.Version}
	}
	return &pulumirpc.GetProgramDependenciesResponse{Dependencies: deps}, nil
}

func (h *languageHost) InstallDependencies(
	req *pulumirpc.InstallDependenciesRequest, server pulumirpc.LanguageRuntime_InstallDependenciesServer,
) error {
	tc, err := programToolchain(req.GetInfo())
	if err != nil {
		return err
	}
	closer, stdout, stderr, err := rpcutil.MakeInstallDependenciesStreams(server, req.GetIsTerminal())
	if err != nil {
		return err
	}
	defer closer.Close()
	if err := tc.InstallDependencies(server.Context(), req.GetInfo().GetProgramDirectory(), req.GetUseLanguageVersionTools(),
		true, stdout, stderr); err != nil {
		return err
	}
	return closer.Close()
}

// Run runs the program: the executor script under the project's Python, with the stack's config
// (and which of its keys are secrets) in the environment, where the SDK reads them.
func (h *languageHost) Run(ctx context.Context, req *pulumirpc.RunRequest) (*pulumirpc.RunResponse, error) {
	tc, err := programToolchain(req.GetInfo())
	if err != nil {
		return nil, err
	}
	if err := tc.ValidateVenv(ctx); err != nil {
		return nil, err
	}
	// The program ends with the request or with the engine, whichever goes first.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-h.ctx.Done():
			cancel()
		case <-ctx.Done():
		}
	}()
	cmd, err := tc.Command(ctx, append([]string{h.exec}, h.arguments(req)...)...)
	if err != nil {
		return nil, err
	}
	config, err := json.Marshal(req.GetConfig())
	if err != nil {
		return nil, fmt.Errorf("serialising the config: %w", err)
	}
	secretKeys, err := json.Marshal(append([]string{}, req.GetConfigSecretKeys()...))
	if err != nil {
		return nil, fmt.Errorf("serialising the config's secret keys: %w", err)
	}
	if cmd.Env == nil {
		cmd.Env = os.Environ()
	}
	cmd.Env = append(cmd.Env, "PULUMI_CONFIG="+string(config), "PULUMI_CONFIG_SECRET_KEYS="+string(secretKeys))
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr

	err = cmd.Run()
	// Python does not flush on an abnormal exit; the engine reads what it wrote through ours.
	_ = os.Stdout.Sync()
	_ = os.Stderr.Sync()
	var exitErr *exec.ExitError
	switch {
	case err == nil:
		return &pulumirpc.RunResponse{}, nil
	case errors.As(err, &exitErr):
		if status, ok := exitErr.Sys().(syscall.WaitStatus); ok && status.ExitStatus() == shownToUser {
			return &pulumirpc.RunResponse{Bail: true}, nil
		}
		return &pulumirpc.RunResponse{Error: fmt.Sprintf("program exited with non-zero exit code: %d", exitErr.ExitCode())}, nil
	default:
		return &pulumirpc.RunResponse{Error: fmt.Sprintf("could not run the language executor %s: %v", h.exec, err)}, nil
	}
}

// arguments are the executor's command line, as pulumi-language-python-exec parses it.
func (h *languageHost) arguments(req *pulumirpc.RunRequest) []string {
	var args []string
	add := func(flag, value string) {
		if value != "" {
			args = append(args, "--"+flag, value)
		}
	}
	add("monitor", req.GetMonitorAddress())
	add("engine", h.engineAddress)
	add("project", req.GetProject())
	add("root_directory", req.GetInfo().GetRootDirectory())
	add("stack", req.GetStack())
	add("pwd", req.GetPwd())
	add("dry_run", strconv.FormatBool(req.GetDryRun()))
	add("parallel", strconv.Itoa(int(req.GetParallel())))
	add("tracing", h.tracing)
	add("organization", req.GetOrganization())
	entry := req.GetInfo().GetEntryPoint()
	if entry == "" {
		entry = "."
	}
	return append(append(args, entry), req.GetArgs()...)
}
