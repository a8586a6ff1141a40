"""The ``lit-llmtime`` command: LightningCLI runs, sweeps, ``forecast``, reports and the console."""
