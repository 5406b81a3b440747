"""What a job reports about itself beyond its status: goodput accounting and the operator-side
Prometheus metrics, shared by the local runner and the Kubernetes operator."""
