"""The local backend: a PretrainJob's workers as processes on this machine."""
