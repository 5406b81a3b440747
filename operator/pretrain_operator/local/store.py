"""The rendezvous store of a local run: one small process that outlives every worker.

Workers' torchrun agents meet here with ``--rdzv-conf is_host=false``, so losing any worker,
the one with rank 0 included, never takes the store (and the job) down with it.

    python -m pretrain_operator.local.store --port PORT
"""

from __future__ import annotations

import argparse
import signal
import sys
from datetime import timedelta


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import torch.distributed as dist

    store = dist.TCPStore(  # type: ignore[attr-defined]
        "127.0.0.1",
        args.port,
        is_master=True,
        wait_for_workers=False,
        multi_tenant=True,
        timeout=timedelta(seconds=600),
    )
    print(f"rendezvous store listening on 127.0.0.1:{args.port}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    del store  # held until here: the server lives as long as this object
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    sys.exit(main())
