"""The autoregressive stage: LLaMA decoder (`model`), its presets (`config`) and the LightningModule (`module`)."""
