// Command controlplane is one binary that is every part of the test suite's Kubernetes control
// plane, chosen by its first argument (or by the name it is run as, so a link named kubectl is
// kubectl):
//
//	controlplane pki --dir D --server https://127.0.0.1:PORT   certificates, keys, kubeconfigs
//	controlplane etcd --data-dir D --client-port P --peer-port Q  embedded etcd
//	controlplane kube-apiserver|kube-scheduler|kube-controller-manager [flags]
//	controlplane kubectl [args]
//
// The Kubernetes components are the released commands themselves (their cobra commands, run as
// their own main functions run them); the test fixture starts each as its own process, so one
// can be restarted while the others keep running.
package main

import (
	"fmt"
	"os"
	"path/filepath"
	_ "time/tzdata"

	"github.com/spf13/cobra"
	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	kubectl "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

func main() {
	name, args := filepath.Base(os.Args[0]), os.Args[1:]
	if name == "controlplane" {
		if len(args) == 0 {
			fmt.Fprintln(os.Stderr, "usage: controlplane pki|etcd|kube-apiserver|kube-scheduler|kube-controller-manager|kubectl [args]")
			os.Exit(2)
		}
		name, args = args[0], args[1:]
	}
	switch name {
	case "pki":
		exitOn(writePKI(args))
	case "etcd":
		exitOn(runEtcd(args))
	case "kube-apiserver":
		os.Exit(run(apiserver.NewAPIServerCommand(), args))
	case "kube-scheduler":
		os.Exit(run(scheduler.NewSchedulerCommand(), args))
	case "kube-controller-manager":
		os.Exit(run(controllermanager.NewControllerManagerCommand(), args))
	case "kubectl":
		os.Args = append([]string{"kubectl"}, args...)
		logs.GlogSetter(kubectl.GetLogVerbosity(os.Args)) // nolint:errcheck
		command := kubectl.NewDefaultKubectlCommand()
		command.SetArgs(args)
		if err := cli.RunNoErrOutput(command); err != nil {
			kubectlutil.CheckErr(err)
		}
	default:
		fmt.Fprintf(os.Stderr, "controlplane: unknown component %q\n", name)
		os.Exit(2)
	}
}

func run(command *cobra.Command, args []string) int {
	command.SetArgs(args)
	return cli.Run(command)
}

func exitOn(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "controlplane:", err)
		os.Exit(1)
	}
}
