"""Stand-ins and harnesses the tests share: an API server, a pretend cluster of kubelets, a
Prometheus runner, the trainer harness. Not tests themselves (except the stand-in's own)."""
