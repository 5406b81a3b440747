"""The data plane: what runs inside every worker (a pod, or a local process).

The control plane depends only on the torch-free kernel of this package:
:mod:`pretrain_trainer.config`, :mod:`pretrain_trainer.contract`, :mod:`pretrain_trainer.errors`,
:mod:`pretrain_trainer.fsio` and :mod:`pretrain_trainer.ckpt.layout` (docs/design.md, "Layers").
"""
