"""The job's rendezvous store: one small process that outlives every worker (docs/design.md,
"How a job runs").

Workers' torchrun agents meet here with ``--rdzv-conf is_host=false``, so losing any worker,
the one with rank 0 included, never takes the store (and the job) down with it. On Kubernetes
it is the job's rendezvous pod; on one machine, a child of ``pretrainctl run``.

    python -m pretrain_trainer.rendezvous --port PORT [--host ADDRESS]
"""

from __future__ import annotations

import argparse
import signal
import sys
from datetime import timedelta


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    args = parser.parse_args()
    import torch.distributed as dist

    store = dist.TCPStore(  # type: ignore[attr-defined]
        args.host,
        args.port,
        is_master=True,
        wait_for_workers=False,
        multi_tenant=True,
        timeout=timedelta(seconds=600),
    )
    print(f"rendezvous store listening on {args.host}:{args.port}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    del store  # held until here: the server lives as long as this object
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    sys.exit(main())
