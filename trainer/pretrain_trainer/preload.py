"""What a worker agent's fork server imports once, so that no trainer process pays for it:
torch, DeepSpeed (its accelerator chosen and its unused shared-memory op disabled, as
:func:`.main.init_distributed` would) and the trainer's own runtime. Importing this module
starts no thread and initialises no GPU, so forking after it is safe."""

from __future__ import annotations

import os

from .agent import AGENT_PID
from .lifetime import die_with_parent

# The fork server dies with its agent (and, through the same setting, each trainer with the
# fork server): a crashed agent leaves no trainer behind holding its GPUs.
if os.environ.get(AGENT_PID) == str(os.getppid()):
    die_with_parent()

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # is_available() without a context

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
import deepspeed.checkpoint.ds_to_universal
import deepspeed.module_inject.auto_ep_config
import deepspeed.runtime.engine
import deepspeed.runtime.zero.muon.muon_optimizer  # imported lazily by initialize()
import deepspeed.runtime.zero.stage3
import deepspeed.runtime.zero.stage_1_and_2
import torch._dynamo  # imported lazily by the first optimizer

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

from . import main, train  # noqa: E402, F401
from .ckpt import manager, recall  # noqa: E402, F401
from .data import loader  # noqa: E402, F401
