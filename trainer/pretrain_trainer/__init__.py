"""The data plane: what runs inside every worker (a pod, or a local process).

Only :mod:`pretrain_trainer.config` and :mod:`pretrain_trainer.contract` are importable
without torch; the control plane depends on nothing else from this package.
"""
