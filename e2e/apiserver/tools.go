//go:build tools

// Package tools pins the kube-apiserver command that the e2e harness builds.
package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
