"""Lightning plug-in: ``Trainer(plugins=[TesseraCheckpointIO()])`` saves Tessera checkpoints.

Importing this package needs no Lightning; making a :class:`TesseraCheckpointIO` without
``lightning`` or ``pytorch_lightning`` installed raises :class:`LightningUnavailableError`,
one line naming the extra to install.
"""

from .checkpoint_io import LightningUnavailableError, TesseraCheckpointIO

__all__ = ["LightningUnavailableError", "TesseraCheckpointIO"]
