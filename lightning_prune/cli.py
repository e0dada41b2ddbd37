"""``lightning-prune``: LightningCLI with the pruning callback as its own ``--pruning.*`` argument group.

    lightning-prune fit --config conf/cli/digits.yaml --pruning.target_sparsity 0.8 --pruning.pattern 2:4

Any LightningModule and LightningDataModule can be named by ``class_path``; the defaults are the
digits demo (``lightning_prune.demo``), which needs no download.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_prune.callback import PruningCallback


class PruningCLI(LightningCLI):
    """LightningCLI that always adds a :class:`PruningCallback` configured by ``--pruning.*``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(PruningCallback, "pruning")


def main(args: list[str] | None = None) -> PruningCLI:
    """Run the CLI (``args`` default to ``sys.argv[1:]``) and return it, trainer and model included."""
    from lightning_prune.demo import DigitsClassifier, DigitsDataModule

    return PruningCLI(
        DigitsClassifier,
        DigitsDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
