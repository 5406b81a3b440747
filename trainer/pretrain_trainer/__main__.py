import sys

if sys.argv[1:2] == ["export"]:  # a one-off export (pretrain_trainer.export), not a trainer
    from .export import main as export

    sys.exit(export(sys.argv[2:]))

from .main import main

sys.exit(main())
