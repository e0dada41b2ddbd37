"""A user's own LightningCLI script, for tests/test_user_cli.py: prints the pruned layers' zero fraction."""

import json

from lightning.pytorch.cli import LightningCLI

from lightning_prune import PruningCallback
from lightning_prune.demo import DigitsClassifier, DigitsDataModule

if __name__ == "__main__":
    cli = LightningCLI(DigitsClassifier, DigitsDataModule, save_config_callback=None)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, PruningCallback)]
    weights = [t.param.detach() for t in callback.pruner.targets]
    report = {
        "zeros": sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights),
        "two_of_four": all(bool(((w.view(w.shape[0], -1, 4) == 0).sum(-1) == 2).all()) for w in weights),
        "criterion": repr(callback.options.criterion),
    }
    print("REPORT " + json.dumps(report))
