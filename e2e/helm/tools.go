//go:build tools

// Package tools pins the Helm release that renders and lints charts/coserve in the tests.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
