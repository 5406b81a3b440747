"""The Kubernetes backend: object builders, observation, the API client, reconcile and
the kopf handlers."""
