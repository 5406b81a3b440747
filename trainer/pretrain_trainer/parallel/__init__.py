"""Parallel layouts beyond ZeRO data parallelism (``config.parallel`` says which ranks hold
what): pipeline parallelism through DeepSpeed's pipeline engine (:mod:`.pipeline`)."""
