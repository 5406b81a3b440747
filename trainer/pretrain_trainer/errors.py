"""The trainer's error taxonomy: what retrying cannot fix derives from :class:`PermanentError`.

The entry point catches this one base and exits with ``ExitCode.PERMANENT`` (the job fails
with the message); everything else is retryable (``ExitCode.RETRYABLE``): the control plane
restarts from the newest checkpoint.
"""

from __future__ import annotations


class PermanentError(Exception):
    """Retrying cannot help: the configuration, the data, the storage or the world size is
    wrong. The message says which, on one line."""
