"""What the tests share: the real control plane and its fixtures, the test kubelet, a
Prometheus runner. Not tests themselves."""
