module coserve.dev/e2e/crds

go 1.26.0

// Releases whose CRDs the e2e tests apply to check the chart's optional objects: the Gateway API Inference
// Extension's InferencePool (config/crd/bases) and the Prometheus Operator's ServiceMonitor and PrometheusRule
// (example/prometheus-operator-crd). Only the module sources are downloaded; nothing is built.
require (
	github.com/prometheus-operator/prometheus-operator v0.89.0
	sigs.k8s.io/gateway-api-inference-extension v1.6.0
)
